"""adapters/pix2pix inside the official junyanz/pytorch-CycleGAN-and-pix2pix (a copy of
``../shared/official/pytorch-CycleGAN-and-pix2pix`` or ``GANSLIM_PIX2PIX_REPO``), run in its own
environment (``.venv-official``: torch + torchvision; ``make setup-official``).

Each test copies the repository, adds the plug-in with the README's ``cp`` line, builds tiny data from
scikit-image's photos, trains the teacher with the repository's ``train.py``, then runs every command
of the README section as written (only sizes appended) and checks, in this process and without any
official code, that the written ``.safetensors`` load with ``ganslim.load``, have 1/10 of the teacher's
MACs and its output shape, and that ``test.py`` wrote exactly what the slim network computes.
"""
import pathlib
import shutil

import numpy as np
import pytest
import torch

import ganslim
import official_helpers as H
from ganslim.zoo import create_model

REASON = H.missing("pix2pix")
pytestmark = [pytest.mark.slow, pytest.mark.official,
              pytest.mark.skipif(REASON is not None, reason=f"official-code test skipped: {REASON}")]

TARGET = 0.1
# test sizes appended to the README's command lines (everything else is as written there)
TRAIN = ["--gpu_ids", "-1", "--display_id", "0", "--no_html", "--num_threads", "0", "--ndf", "8",
         "--save_epoch_freq", "1", "--print_freq", "4"]
SECTION_PIX2PIX = "pix2pix (U-Net or ResNet generator)"
SECTION_CYCLEGAN = "CycleGAN (both generators)"


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("pix2pix_data")
    return {"facades_128": H.make_aligned(root / "facades_128", 128),
            "facades_64": H.make_aligned(root / "facades_64", 64),
            "horse2zebra": H.make_unaligned(root / "horse2zebra", 64)}


def _repo(tmp_path: pathlib.Path, datasets: dict) -> tuple[pathlib.Path, H.Shell]:
    """A copy of the repository with the plug-in added as the README says, and the data in datasets/."""
    repo = H.copy_repo("pix2pix", tmp_path / "pytorch-CycleGAN-and-pix2pix")
    sh = H.Shell(repo, tmp_path / "commands.log")
    install = H.readme_commands("pix2pix", "ganslim in junyanz/pytorch-CycleGAN-and-pix2pix")
    assert install[0] == "pip install -e /path/to/ganslim"  # done by `make setup-official` (test_official_install.py)
    sh(H.find_command(install, "cp ", "ganslim_model.py"))
    assert (repo / "models" / "ganslim_model.py").is_file()
    for name, src in datasets.items():
        shutil.copytree(src, repo / "datasets" / name)
    return repo, sh


def _teacher(netG, ngf, norm, dropout, path) -> torch.nn.Module:
    """The teacher from its official checkpoint, rebuilt with ganslim's reference network (same keys)."""
    net = create_model(netG, ngf=ngf, norm=norm, use_dropout=dropout)
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    return net.eval()


def _check_slim(slim_path, teacher, x) -> torch.nn.Module:
    """Loads without the repository, 1/10 of the teacher's MACs, the teacher's output shape."""
    slim = ganslim.load(slim_path).eval()
    H.check_macs(slim, teacher, x, TARGET, slim_path.name)
    with torch.no_grad():
        y, t = slim(x), teacher(x)
    assert y.shape == t.shape == x.shape and torch.isfinite(y).all()
    return slim


def _check_test_image(slim, image: np.ndarray, written: pathlib.Path) -> None:
    """``test.py`` saved ``util.tensor2im(slim(input))``: the same pixels up to float rounding."""
    with torch.no_grad():
        y = slim(H.to_input(image))[0].numpy()
    expect = ((np.transpose(y, (1, 2, 0)) + 1) / 2.0 * 255.0).astype(np.uint8)
    got = H.load_image(written)
    assert got.shape == expect.shape
    diff = np.abs(got.astype(int) - expect.astype(int))
    assert diff.max() <= 2 and diff.mean() < 0.05, f"{written.name}: max |diff| {diff.max()}, mean {diff.mean():.3f}"


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=False)["session"]


@pytest.mark.parametrize("netG,size", [("unet_128", 128), ("resnet_9blocks", 64)])
def test_pix2pix_train_compress_test_resume(tmp_path, data, netG, size):
    repo, sh = _repo(tmp_path, {"facades": data[f"facades_{size}"]})
    gen = ["--netG", netG, "--ngf", "8", "--load_size", str(size), "--crop_size", str(size)]
    cmds = H.readme_commands("pix2pix", SECTION_PIX2PIX)
    assert len(cmds) == 4, cmds
    teacher_cmd, slim_cmd, test_cmd, resume_cmd = cmds
    assert "--model pix2pix" in teacher_cmd and "--model ganslim" in slim_cmd and "test.py" in test_cmd
    assert "--continue_train" in resume_cmd
    ck = repo / "checkpoints"

    sh(teacher_cmd, *TRAIN, *gen, "--n_epochs", "2", "--n_epochs_decay", "2")  # 16 iterations
    assert (ck / "facades_pix2pix" / "latest_net_G.pth").is_file()
    sh(slim_cmd, *TRAIN, *gen, "--n_epochs", "2", "--n_epochs_decay", "1", "--slim_iters", "6")  # 12 iterations
    out = ck / "facades_slim"
    assert {"latest_net_G.safetensors", "latest_net_G_ganslim.pth", "latest_net_D.pth", "3_net_G.safetensors"} \
        <= {p.name for p in out.iterdir()}
    s = _state(out / "latest_net_G_ganslim.pth")
    assert s["iteration"] == 12 and s["final"]

    sh(test_cmd, "--gpu_ids", "-1", "--load_size", str(size), "--crop_size", str(size))
    images = repo / "results" / "facades_slim" / "test_latest" / "images"
    assert {"chelsea_real_A.png", "chelsea_fake_B.png"} <= {p.name for p in images.iterdir()}

    # --continue_train: epoch 4 continues student, gates, mappings and discriminator
    sh(resume_cmd, *TRAIN, *gen, "--n_epochs", "2", "--n_epochs_decay", "2", "--epoch_count", "4")
    s = _state(out / "latest_net_G_ganslim.pth")
    assert s["iteration"] == 16 and s["final"], "the resumed run did not continue the saved session"
    assert (out / "4_net_G.safetensors").is_file()

    # checks without the repository's code
    dropout = True  # pix2pix trains with dropout unless --no_dropout
    teacher = _teacher(netG, 8, "batch", dropout, ck / "facades_pix2pix" / "latest_net_G.pth")
    photo = H.load_image(data[f"facades_{size}"] / "test" / "chelsea.png")[:, size:]  # A | B: B is the photo
    slim = _check_slim(out / "3_net_G.safetensors", teacher, H.to_input(photo))
    _check_test_image(slim, photo, images / "chelsea_fake_B.png")
    _check_slim(out / "latest_net_G.safetensors", teacher, H.to_input(photo))
    H.assert_no_official_modules(repo)


def test_cyclegan_both_generators(tmp_path, data):
    repo, sh = _repo(tmp_path, {"horse2zebra": data["horse2zebra"]})
    gen = ["--ngf", "8", "--load_size", "64", "--crop_size", "64"]
    cmds = H.readme_commands("pix2pix", SECTION_CYCLEGAN)
    assert len(cmds) == 4, cmds
    teacher_cmd, slim_cmd, test_a, test_b = cmds
    assert "--model cycle_gan" in teacher_cmd and "--teacher_model cycle_gan" in slim_cmd
    assert "--direction AtoB" in test_a and "testA" in test_a and "--direction BtoA" in test_b and "testB" in test_b
    ck = repo / "checkpoints"

    sh(teacher_cmd, *TRAIN, *gen, "--n_epochs", "1", "--n_epochs_decay", "1")  # 8 iterations
    sh(slim_cmd, *TRAIN, *gen, "--n_epochs", "1", "--n_epochs_decay", "1", "--slim_iters", "4")
    out = ck / "h2z_slim"
    names = {p.name for p in out.iterdir()}
    assert {"latest_net_G_A.safetensors", "latest_net_G_B.safetensors", "latest_net_G_A_ganslim.pth",
            "latest_net_D_A.pth", "latest_net_D_B.pth"} <= names
    for cmd in (test_a, test_b):
        sh(cmd, "--gpu_ids", "-1", "--load_size", "64", "--crop_size", "64")
    images = repo / "results" / "h2z_slim" / "test_latest" / "images"

    # checks without the repository's code: CycleGAN = instance norm, no dropout
    photo = H.load_image(data["horse2zebra"] / "testA" / "chelsea.png")
    cartoon = H.load_image(data["horse2zebra"] / "testB" / "chelsea_cartoon.png")
    for g, image, written in (("G_A", photo, "chelsea_fake_B.png"), ("G_B", cartoon, "chelsea_cartoon_fake_B.png")):
        teacher = _teacher("resnet_9blocks", 8, "instance", False, ck / "horse2zebra" / f"latest_net_{g}.pth")
        slim = _check_slim(out / f"latest_net_{g}.safetensors", teacher, H.to_input(image))
        _check_test_image(slim, image, images / written)
    H.assert_no_official_modules(repo)
