"""adapters/cartoongan inside the official Yijunmaverick/CartoonGAN-Test-Pytorch-Torch (a copy of
``../shared/official/CartoonGAN-Test-Pytorch-Torch`` or ``GANSLIM_CARTOONGAN_REPO``), run in its own
environment (``.venv-official``; ``make setup-official``).

The repository has no training code and its released weights cannot be downloaded here, so the
teacher is its own ``Transformer`` fitted for a few steps to the released model's outputs that ship in
the checkout (``test_img/`` -> ``test_output/*_Hayao``; ``tests/official_cartoongan_teacher.py``), saved
where the README puts the released file. Then the README's command lines run as written (only sizes
appended): ``compress.py`` on a folder of scikit-image photos with the official class (``--repo .``),
``stylize.py`` on ``test_img/``. Checked without the repository's code: ``ganslim.load``, 1/10 of the
teacher's MACs, output shape, and one stylized image per photo at the size of ``--load_size``.
"""
import os

import numpy as np
import pytest
import torch

import ganslim
import official_helpers as H
from ganslim.adapters.cartoongan import load_transformer

REASON = H.missing("cartoongan")
pytestmark = [pytest.mark.slow, pytest.mark.official,
              pytest.mark.skipif(REASON is not None, reason=f"official-code test skipped: {REASON}")]

TARGET, LOAD_SIZE = 0.1, 64


def test_cartoongan_compress_and_stylize(tmp_path):
    repo = H.copy_repo("cartoongan", tmp_path / "CartoonGAN-Test-Pytorch-Torch")
    sh = H.Shell(repo, tmp_path / "commands.log", subst={"/path/to/CartoonGAN-Test-Pytorch-Torch": repo})
    H.make_photo_folder(repo / "my_photos", 64)
    sh(f"python {H.ROOT}/tests/official_cartoongan_teacher.py --style Hayao --size 64 --steps 12")
    assert (repo / "pretrained_model" / "Hayao_net_G_float.pth").is_file()

    cd, compress_cmd, stylize_cmd = H.readme_commands("cartoongan")
    assert cd == "cd /path/to/CartoonGAN-Test-Pytorch-Torch"  # the shell runs in the copy
    assert "compress.py" in compress_cmd and "--repo ." in compress_cmd and "stylize.py" in stylize_cmd
    run = sh(compress_cmd, "--steps", "4", "--finetune_steps", "4", "--crop", "32", "--batch_size", "2",
             "--device", "cpu")
    assert "saved Hayao_slim.safetensors" in run.output
    before = set(os.listdir(repo / "test_output"))
    run = sh(stylize_cmd, "--load_size", str(LOAD_SIZE))
    photos = sorted(f for f in os.listdir(repo / "test_img") if f.lower().endswith((".jpg", ".png")))
    assert f"stylized {len(photos)} image(s)" in run.output
    written = set(os.listdir(repo / "test_output")) - before
    assert written == {os.path.splitext(f)[0] + "_slim.jpg" for f in photos}

    # checks without the repository's code (ganslim's Transformer has the official keys)
    teacher = load_transformer(str(repo / "pretrained_model" / "Hayao_net_G_float.pth"))
    slim = ganslim.load(repo / "Hayao_slim.safetensors").eval()
    x = torch.rand(1, 3, 64, 64) * 2 - 1
    H.check_macs(slim, teacher, x, TARGET, "Hayao_slim.safetensors")
    with torch.no_grad():
        y, t = slim(x), teacher(x)
    assert y.shape == t.shape == x.shape and torch.isfinite(y).all()
    for f in photos:
        w, h = H.load_image(repo / "test_img" / f).shape[1::-1]
        out = H.load_image(repo / "test_output" / (os.path.splitext(f)[0] + "_slim.jpg"))
        assert max(out.shape[:2]) == LOAD_SIZE and abs(out.shape[1] / out.shape[0] - w / h) < 0.1, (f, out.shape, (h, w))
        assert 0 < out.std() and np.isfinite(out).all()
    H.assert_no_official_modules(repo)
