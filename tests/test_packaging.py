"""Packaging: ganslim installs into an existing environment without touching its torch; what only some
users need is an extra whose absence names its install command; the documented adapter command lines
are the ones the official-code tests run."""
import re
import tomllib

import pytest
from packaging.requirements import Requirement

import official_helpers as H
from ganslim._extras import require


def _pyproject():
    return tomllib.loads((H.ROOT / "pyproject.toml").read_text())["project"]


def test_torch_has_a_lower_bound_only_and_extras_hold_the_heavy_parts():
    deps = {Requirement(d).name: Requirement(d) for d in _pyproject()["dependencies"]}
    torch = deps["torch"].specifier
    assert torch and all(s.operator in (">=", ">") for s in torch), f"torch must not be capped: {torch}"
    for heavy in ("nvidia-modelopt", "onnx", "onnxruntime", "requests", "huggingface-hub", "huggingface_hub"):
        assert heavy not in deps, f"{heavy} belongs in an extra"
    extras = {k: {Requirement(d).name for d in v} for k, v in _pyproject()["optional-dependencies"].items()}
    assert {"nvidia-modelopt", "requests", "huggingface_hub"} <= extras["quant"]
    assert {"onnx", "onnxruntime"} <= extras["deploy"]
    assert any("quant" in d and "deploy" in d for d in _pyproject()["optional-dependencies"]["all"])


def test_makefile_installs_every_extra_into_the_main_venv():
    mk = (H.ROOT / "Makefile").read_text()
    assert re.search(r'pip\)? install -q -e "\.\[test,all\]"', mk) or '-e ".[test,all]"' in mk
    assert "setup-official" in mk and re.search(r"^test: .*setup-official", mk, re.M)


def test_require_names_the_extra():
    assert require("json", "deploy").dumps([]) == "[]"
    with pytest.raises(ModuleNotFoundError, match=r"pip install 'ganslim\[deploy\]' \(installs onnx, onnxruntime\)") as e:
        require("ganslim_no_such_module", "deploy")
    assert e.value.name == "ganslim_no_such_module"
    with pytest.raises(ImportError, match=r"pip install 'ganslim\[quant\]'"):
        require("ganslim_no_such_module.sub", "quant")


def _top_readme_commands():
    text = (H.ROOT / "README.md").read_text()
    section = text.split("## Inside the official repositories", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```", section, re.M | re.S)
    assert blocks, "the README's 'Inside the official repositories' section has no bash block"
    cmds, cur = [], ""
    for line in "\n".join(blocks).splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
        cur += (line[:-1] if line.endswith("\\") else line).strip() + " "
        if not line.endswith("\\"):
            if cur.strip():
                cmds.append(" ".join(cur.split()))
            cur = ""
    return cmds


def test_top_readme_shows_the_adapter_commands_the_tests_run():
    adapters = {c for a in ("pix2pix", "spade", "cartoongan") for c in H.readme_commands(a)}
    for cmd in _top_readme_commands():
        assert cmd in adapters, f"README.md shows a command no adapter README (and no official test) has: {cmd}"


def test_adapter_readmes_have_no_stale_caveats():
    for a in ("pix2pix", "spade", "cartoongan"):
        text = (H.ROOT / "adapters" / a / "README.md").read_text().lower()
        for stale in ("stand-ins only", "needs torchvision importable", "blocked"):
            assert stale not in text, f"adapters/{a}/README.md: {stale!r}"
