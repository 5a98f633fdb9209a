"""Compress a CartoonGAN checkpoint with a folder of photos.

    python adapters/cartoongan/compress.py --checkpoint pretrained_model/Hayao_net_G_float.pth \
        --photos my_photos/ --out Hayao_slim.safetensors --target_macs 0.1
    # --repo /path/to/CartoonGAN-Test-Pytorch-Torch  builds the teacher from the official class

Needs no cartoon images: the pretrained network's own outputs are the targets.
"""
import argparse
import sys

from ganslim.adapters import AdapterError, isolated_imports
from ganslim.adapters.cartoongan import compress_folder


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a released *_net_G_float.pth")
    p.add_argument("--photos", required=True, help="folder of photos (.jpg/.png)")
    p.add_argument("--out", required=True, help="output .safetensors (ganslim.load reads it without any class)")
    p.add_argument("--target_macs", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=600, help="gated steps")
    p.add_argument("--finetune_steps", type=int, default=2000)
    p.add_argument("--crop", type=int, default=128)
    p.add_argument("--batch_size", type=int, default=4)
    p.add_argument("--device", default="cuda" if __import__("torch").cuda.is_available() else "cpu")
    p.add_argument("--repo", default=None, help="checkout of CartoonGAN-Test-Pytorch-Torch: use its Transformer class")
    a = p.parse_args(argv)
    try:
        model = None
        if a.repo:
            with isolated_imports(a.repo, marker="network/Transformer.py"):
                from network.Transformer import Transformer
            model = Transformer()
        r = compress_folder(a.checkpoint, a.photos, a.out, target_macs=a.target_macs, crop=a.crop,
                            batch_size=a.batch_size, model=model, steps=a.steps, finetune_steps=a.finetune_steps,
                            device=a.device)
    except AdapterError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(r.report)
    print(f"saved {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
