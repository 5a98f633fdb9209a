"""The package layout: old flat import paths still work for one release, as the very same modules."""
import importlib
import subprocess
import sys

import pytest

from ganslim._compat import MOVED


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_import_path_is_the_new_module_and_warns(old):
    # a fresh interpreter: the alias must work as the first import of the old name too
    code = (f"import warnings, importlib; warnings.simplefilter('error', DeprecationWarning)\n"
            f"import ganslim\n"
            f"try:\n    importlib.import_module({old!r})\n    raise SystemExit('no warning')\n"
            f"except DeprecationWarning as w:\n    assert {MOVED[old]!r} in str(w), w\n"
            f"warnings.simplefilter('ignore', DeprecationWarning)\n"
            f"assert importlib.import_module({old!r}) is importlib.import_module({MOVED[old]!r})\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr + r.stdout


def test_old_from_imports_give_the_same_objects():
    import warnings

    with warnings.catch_warnings():  # the warning itself is checked in a fresh interpreter above
        warnings.simplefilter("ignore", DeprecationWarning)
        gating = importlib.import_module("ganslim.gating")
    from ganslim.core.gating import GateSet

    assert gating.GateSet is GateSet and GateSet.__module__ == "ganslim.core.gating"


def test_public_names_are_stable():
    import ganslim

    for name in ("compress", "save", "load", "bench", "export", "make_supernet", "CompressConfig", "quantize"):
        assert callable(getattr(ganslim, name)), name
    import ganslim.deployment.deploy  # noqa: F401  (the subpackage must not shadow the function)

    assert callable(ganslim.export) and ganslim.export.__module__ == "ganslim.deployment.deploy"


def test_every_module_path_the_readme_names_exists():
    import pathlib
    import re

    root = pathlib.Path(__file__).resolve().parents[1]
    text = (root / "README.md").read_text()
    paths = set(re.findall(r"`(ganslim/[\w/]+(?:\.py)?/?)`", text))
    assert len(paths) > 20  # the "How it works" table at least
    missing = sorted(p for p in paths if not (root / p).exists())
    assert not missing, missing
