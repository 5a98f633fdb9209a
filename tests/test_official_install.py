"""ganslim installed into the official repositories' environment (``.venv-official``, made by
``make setup-official`` with ``pip install -e .``, no extras) keeps that environment's torch, imports,
and points at the extras with the command that installs them."""
import os
import subprocess

import pytest

import official_helpers as H

PY = H.official_python()
TORCH = os.environ.get("GANSLIM_OFFICIAL_TORCH", "2.14.1")  # what the Makefile installs there
pytestmark = [pytest.mark.official,
              pytest.mark.skipif(not PY.is_file(), reason=f"official-code test skipped: no environment at {PY}: "
                                 "run `make setup-official` or set GANSLIM_OFFICIAL_PYTHON")]


def _py(code: str, check: bool = True) -> subprocess.CompletedProcess:
    p = subprocess.run([str(PY), "-c", code], env=H.venv_env(), cwd=H.ROOT, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT, text=True, timeout=300)
    if check:
        assert p.returncode == 0, p.stdout
    return p


def test_keeps_its_torch_and_imports_ganslim():
    out = _py("import torch, torchvision, ganslim, ganslim.adapters.pix2pix; "
              "print(torch.__version__); print(torchvision.__version__); print(ganslim.__file__)").stdout.split()
    assert out[0].startswith(TORCH), f"torch in {PY.parent.parent} is {out[0]}, not {TORCH}: installing ganslim changed it"
    assert out[2].startswith(str(H.ROOT / "ganslim")), f"ganslim imported from {out[2]}, not this source tree"


def test_reinstall_would_change_nothing_but_ganslim():
    p = subprocess.run([str(PY), "-m", "pip", "install", "--dry-run", "-e", str(H.ROOT)], env=H.venv_env(),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert p.returncode == 0, p.stdout
    would = [line for line in p.stdout.splitlines() if line.startswith("Would install")]
    assert would and would[0].split()[2:] == [w for w in would[0].split()[2:] if w.startswith("ganslim-")], would


def test_missing_extras_name_their_install_command():
    present = _py("import importlib.util as u; print([m for m in ('modelopt', 'onnx') if u.find_spec(m)])").stdout
    if "modelopt" not in present:
        p = _py("from ganslim import quantization as q; q._mtq()", check=False)
        assert p.returncode != 0 and "ModuleNotFoundError" in p.stdout and "pip install 'ganslim[quant]'" in p.stdout, p.stdout
    if "onnx" not in present:
        p = _py("import torch, ganslim; ganslim.export(torch.nn.Conv2d(3, 3, 1), 'never.onnx', "
                "example_inputs=torch.zeros(1, 3, 8, 8))", check=False)
        assert p.returncode != 0 and "pip install 'ganslim[deploy]'" in p.stdout, p.stdout
    if "modelopt" in present and "onnx" in present:
        pytest.skip("the extras are installed in this environment: nothing to check")
