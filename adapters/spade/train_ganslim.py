"""Compress a trained SPADE generator with the repository's own train.py, data and losses.

Run from the root of your NVlabs/SPADE checkout (nothing in it changes):

    python /path/to/ganslim/adapters/spade/train_ganslim.py --teacher_checkpoint checkpoints/coco_pretrained/latest_net_G.pth \
        --target_macs 0.1 --slim_iters 5000 -- \
        --name coco_slim --dataset_mode coco --dataroot datasets/coco_stuff --gpu_ids 0 --niter 10

Flags before ``--`` are ganslim's; everything after goes to SPADE's train.py unchanged (use the
same generator flags as the teacher: --ngf, --norm_G, --num_upsampling_layers, --label_nc ...).
"""
import argparse
import os
import runpy
import sys


def main() -> None:
    argv = sys.argv[1:]
    ours, theirs = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    from ganslim.adapters.spade import add_arguments, make_trainer_class

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    slim_opt = p.parse_args(ours)
    if not os.path.isfile("train.py") or not os.path.isdir("trainers"):
        sys.exit("error: run this from the root of your NVlabs/SPADE checkout (train.py and trainers/ not found here)")
    sys.path.insert(0, os.getcwd())
    import trainers.pix2pix_trainer as host  # the repository's module; train.py imports the name from it

    host.Pix2PixTrainer = make_trainer_class(host.Pix2PixTrainer, slim_opt)
    sys.argv = ["train.py"] + theirs
    runpy.run_path("train.py", run_name="__main__")


if __name__ == "__main__":
    main()
