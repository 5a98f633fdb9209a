"""adapters/cartoongan: norm conversion, compression from a folder of photos, stylize preprocessing.
``GANSLIM_CARTOONGAN_REPO=/path/to/CartoonGAN-Test-Pytorch-Torch`` adds a check with the official class."""
import copy
import pathlib
import shutil
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import ganslim
from ganslim import measure
from ganslim.adapters import AdapterError, isolated_imports
from ganslim.adapters.cartoongan import compress_folder, convert_instance_norms, load_transformer
from ganslim.zoo import create_model

import official_helpers
from equivalence import assert_same_function

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "adapters" / "cartoongan"))
import stylize as stylize_script  # noqa: E402

sys.path.pop(0)


def _photos(d, n=2, size=40):
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8)).save(d / f"p{i}.png")
    return d


def test_norm_conversion_is_exact_and_hookable():
    m = create_model("cartoongan").eval()
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    ref_net = copy.deepcopy(m)
    assert convert_instance_norms(m) == 21
    seen = []
    m.in01_1.register_forward_hook(lambda mod, i, o: seen.append(1))
    assert_same_function(m, ref_net, x)
    assert seen == [1]


def test_compress_folder_and_stylize(tmp_path):
    ckpt = tmp_path / "Hayao_net_G_float.pth"
    torch.save(create_model("cartoongan").state_dict(), ckpt)
    photos = _photos(tmp_path / "photos")
    out = tmp_path / "Hayao_slim.safetensors"
    # slim: its gated stage runs the feature distillation the adapter wires to the four block outputs
    r = compress_folder(str(ckpt), str(photos), str(out), strategy="slim", target_macs=0.1, crop=16, batch_size=2, steps=4,
                        finetune_steps=1, measure_latency=False, progress=False)
    assert set(r.report.distill_layers) == {"conv05_2", "conv07_2", "conv09_2", "conv11_2"}
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    teacher = load_transformer(str(ckpt))
    assert measure.count_macs(r.model, x) <= 0.105 * measure.count_macs(teacher, x)
    slim = ganslim.load(out)
    with torch.no_grad():
        assert torch.equal(slim(x), r.model.eval()(x))
    img = stylize_script.stylize(slim, Image.open(photos / "p0.png"), load_size=24)
    assert img.size == (24, 20) or img.size[0] == 24


def test_bad_input(tmp_path):
    with pytest.raises(AdapterError, match="does not exist: pass --checkpoint"):
        load_transformer(str(tmp_path / "Hayao_net_G_float.pth"))
    wrong = tmp_path / "latest_net_G.pth"
    torch.save(create_model("resnet_6blocks", ngf=4).state_dict(), wrong)
    with pytest.raises(AdapterError, match="not a CartoonGAN Transformer checkpoint"):
        load_transformer(str(wrong))
    ckpt = tmp_path / "ok.pth"
    torch.save(create_model("cartoongan").state_dict(), ckpt)
    with pytest.raises(AdapterError, match="photo folder .* does not exist"):
        compress_folder(str(ckpt), str(tmp_path / "nope"), str(tmp_path / "o.safetensors"))


@pytest.mark.skipif(official_helpers.missing_checkout("cartoongan") is not None,
                    reason=f"official-code test skipped: {official_helpers.missing_checkout('cartoongan')}")
def test_official_transformer(tmp_path):
    # the official Transformer needs plain torch only: it runs in this environment, from a copy of the checkout
    repo = tmp_path / "repo"
    shutil.copytree(official_helpers.repo_source("cartoongan"), repo)
    with isolated_imports(str(repo), marker="network/Transformer.py"):
        from network.Transformer import Transformer  # noqa: PLC0415
    assert "network" not in sys.modules
    official = Transformer()
    ckpt = tmp_path / "w.pth"
    torch.save(official.state_dict(), ckpt)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    teacher = load_transformer(str(ckpt), Transformer())  # custom __call__ norms replaced
    assert_same_function(teacher, official, x)
    r = compress_folder(str(ckpt), str(_photos(tmp_path / "ph")), str(tmp_path / "s.safetensors"), crop=16,
                        batch_size=2, model=Transformer(), steps=4, finetune_steps=1, measure_latency=False, progress=False)
    assert measure.count_macs(r.model, x) < measure.count_macs(teacher, x)
