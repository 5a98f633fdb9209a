"""adapters/spade inside the official NVlabs/SPADE (a copy of ``../shared/official/SPADE`` or
``GANSLIM_SPADE_REPO``), run in its own environment (``.venv-official``; ``make setup-official``).

The test builds a ``--dataset_mode custom`` data set (label maps from the cartoon renderings of
scikit-image's photos, the photos as images), trains the teacher with SPADE's ``train.py``, runs the
README's command lines as written (only sizes appended; the ganslim flags before ``--``), resumes with
``--continue_train``, and checks without SPADE's code that the ``.safetensors`` loads with
``ganslim.load``, has 1/10 of the teacher's MACs and its output shape.
"""
import shutil

import pytest
import torch

import ganslim
import official_helpers as H
from ganslim.adapters import strip_spectral_norm
from ganslim.zoo import create_model

REASON = H.missing("spade")
pytestmark = [pytest.mark.slow, pytest.mark.official,
              pytest.mark.skipif(REASON is not None, reason=f"official-code test skipped: {REASON}")]

TARGET, LABEL_NC, SIZE, NGF = 0.1, 8, 64, 8
# test sizes appended to SPADE's flags; --gpu_ids -1 --nThreads 0: CPU; --no_vgg_loss: VGG-19 weights need a download
SMALL = ["--gpu_ids", "-1", "--nThreads", "0", "--no_vgg_loss", "--ngf", str(NGF), "--ndf", "8",
         "--load_size", str(SIZE), "--crop_size", str(SIZE), "--save_epoch_freq", "1", "--display_freq", "1000",
         "--print_freq", "4", "--no_html"]


def _ours(cmd: str, *flags: str) -> str:
    """Test sizes for ganslim's own flags, which go before ``--``."""
    head, sep, tail = cmd.partition(" -- ")
    assert sep, cmd
    return f"{head} {' '.join(flags)} -- {tail}"


def test_spade_custom_dataset(tmp_path):
    repo = H.copy_repo("spade", tmp_path / "SPADE")
    sh = H.Shell(repo, tmp_path / "commands.log", subst={"/path/to/SPADE": repo})
    data = H.make_spade_custom(tmp_path / "mydata", SIZE, LABEL_NC)[0].parent
    shutil.copytree(data, repo / "datasets" / "mydata")
    blocks = [cmds for _, cmds in H.readme_blocks("spade")]
    assert len(blocks) == 2, blocks
    (cd, teacher_cmd, slim_cmd), (resume_cmd,) = blocks
    assert cd == "cd /path/to/SPADE"  # the shell runs in the copy
    assert teacher_cmd.startswith("python train.py") and "train_ganslim.py" in slim_cmd
    assert f"--label_nc {LABEL_NC}" in teacher_cmd and "--continue_train" in resume_cmd
    ck = repo / "checkpoints"

    sh(teacher_cmd, *SMALL, "--niter", "2")  # 8 iterations
    assert (ck / "mydata" / "latest_net_G.pth").is_file()
    sh(_ours(slim_cmd, "--slim_iters", "4"), *SMALL, "--niter", "2", "--niter_decay", "0")
    out = ck / "mydata_slim"
    assert {"latest_net_G.safetensors", "latest_net_G_ganslim.pth", "latest_net_D.pth", "2_net_G.safetensors"} \
        <= {p.name for p in out.iterdir()}
    state = torch.load(out / "latest_net_G_ganslim.pth", map_location="cpu", weights_only=False)["session"]
    assert state["iteration"] == 8 and state["final"]
    run = sh(_ours(resume_cmd, "--slim_iters", "4"), *SMALL, "--niter", "3", "--niter_decay", "0")
    assert "Resuming from epoch 3" in run.output
    state = torch.load(out / "latest_net_G_ganslim.pth", map_location="cpu", weights_only=False)["session"]
    assert state["iteration"] == 12 and state["final"], "the resumed run did not continue the saved session"

    # checks without SPADE's code: the teacher rebuilt with ganslim's reference SPADE generator (same keys)
    teacher = create_model("spade", label_nc=LABEL_NC, ngf=NGF, crop_size=SIZE, no_instance=True)
    teacher.load_state_dict(torch.load(ck / "mydata" / "latest_net_G.pth", map_location="cpu", weights_only=True))
    strip_spectral_norm(teacher)
    teacher.eval()
    labels = torch.from_numpy(H.load_image_gray(data / "labels" / "astronaut.png")).long()
    seg = torch.nn.functional.one_hot(labels, LABEL_NC).permute(2, 0, 1)[None].float()
    for f in ("2_net_G.safetensors", "latest_net_G.safetensors"):
        slim = ganslim.load(out / f).eval()
        H.check_macs(slim, teacher, seg, TARGET, f)
        with torch.no_grad():
            y, t = slim(seg), teacher(seg)
        assert y.shape == t.shape == (1, 3, SIZE, SIZE) and torch.isfinite(y).all()
    H.assert_no_official_modules(repo)
