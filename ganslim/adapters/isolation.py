"""Import an official repository's modules without leaving its top-level packages in ``sys.modules``.

pytorch-CycleGAN-and-pix2pix and SPADE both ship top-level packages called ``models``, ``data``,
``options`` and ``util``; CartoonGAN ships ``network``. Importing one repository's ``models`` and then
the other's would silently hand back the first one. :func:`isolated_imports` puts the repository
first on ``sys.path`` for the duration of a ``with`` block and, on exit, removes every module it
imported from that repository and restores whatever was registered under those names before. The
classes and functions you got inside the block stay usable (they keep their own module globals).
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

from .errors import AdapterError


def _from_repo(mod, root: str) -> bool:
    f = getattr(mod, "__file__", None)
    if f is None:
        paths = list(getattr(mod, "__path__", []) or [])
        return any(os.path.realpath(p).startswith(root + os.sep) for p in paths)
    return os.path.realpath(f).startswith(root + os.sep)


@contextlib.contextmanager
def isolated_imports(repo: str | os.PathLike, marker: str | None = None) -> Iterator[str]:
    """``with isolated_imports("/path/to/SPADE"): from models.networks.generator import SPADEGenerator``.

    ``marker``: a file that must exist in the repository (e.g. ``"models/networks/generator.py"``),
    so a wrong path fails with a clear message instead of an ImportError deep inside.
    Yields the resolved repository path.
    """
    root = os.path.realpath(os.fspath(repo))
    if not os.path.isdir(root):
        raise AdapterError(f"repository folder {repo!s} does not exist; pass the path of your checkout of the "
                           "official repository")
    if marker is not None and not os.path.exists(os.path.join(root, marker)):
        raise AdapterError(f"{repo!s} does not look like the expected repository: {marker} is missing; "
                           "pass the root folder of the official checkout")
    # names the repository can shadow: its top-level packages and modules
    names = {n[:-3] if n.endswith(".py") else n for n in os.listdir(root)
             if (n.endswith(".py") or os.path.isdir(os.path.join(root, n))) and not n.startswith(".")}
    saved = {k: v for k, v in sys.modules.items() if k.split(".")[0] in names}
    for k in saved:  # hide same-named modules of another repository while this one imports
        del sys.modules[k]
    sys.path.insert(0, root)
    try:
        yield root
    finally:
        try:
            sys.path.remove(root)
        except ValueError:
            pass
        for k in [k for k, v in sys.modules.items() if k.split(".")[0] in names and (_from_repo(v, root) or k not in saved)]:
            del sys.modules[k]
        sys.modules.update(saved)
