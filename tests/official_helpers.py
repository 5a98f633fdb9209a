"""Shared by the official-code integration tests (tests/test_official_*.py) and
benchmarks/bench_official.py: find the official repositories and their environment, copy a
repository to a working folder, add the adapter as its README says, build tiny data sets from real
photos, and run the command lines of the adapters' READMEs.

Nothing official is stored in ganslim: the repositories are found at ``<ganslim>/../shared/official/<name>``
or at ``GANSLIM_PIX2PIX_REPO`` / ``GANSLIM_SPADE_REPO`` / ``GANSLIM_CARTOONGAN_REPO``, and copied to a
temporary folder at run time. They run in their own environment: ``GANSLIM_OFFICIAL_PYTHON`` or
``<ganslim>/.venv-official/bin/python`` (``make setup-official``: torch + torchvision, dominate, dill,
scikit-image, and ganslim installed with ``pip install -e .``).

Data: photos that ship inside scikit-image (``ganslim.data``), their cartoon renderings as the other
domain, label maps from the cartoons' quantised luminance for SPADE; CartoonGAN's own ``test_img/``.
"""
from __future__ import annotations

import os
import pathlib
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
OFFICIAL = ROOT.parent / "shared" / "official"

# kind -> (environment variable, folder under ../shared/official, a file that must exist in it)
REPOS = {
    "pix2pix": ("GANSLIM_PIX2PIX_REPO", "pytorch-CycleGAN-and-pix2pix", "models/networks.py"),
    "spade": ("GANSLIM_SPADE_REPO", "SPADE", "models/networks/generator.py"),
    "cartoongan": ("GANSLIM_CARTOONGAN_REPO", "CartoonGAN-Test-Pytorch-Torch", "network/Transformer.py"),
}
README_PLACEHOLDER_ROOT = "/path/to/ganslim"

TRAIN_PHOTOS = ("astronaut", "rocket", "coffee", "motorcycle_left", "hubble_deep_field", "immunohistochemistry",
                "retina", "color")
TEST_PHOTOS = ("chelsea",)


# ----------------------------------------------------------------------------- where things are
def official_python() -> pathlib.Path:
    # absolute, but not resolved: the venv's python is a symlink to the base interpreter
    return pathlib.Path(os.path.abspath(os.environ.get("GANSLIM_OFFICIAL_PYTHON") or ROOT / ".venv-official" / "bin" / "python"))


def repo_source(kind: str) -> pathlib.Path:
    var, name, _ = REPOS[kind]
    return pathlib.Path(os.environ[var]) if os.environ.get(var) else OFFICIAL / name


def missing_checkout(kind: str) -> Optional[str]:
    """Why there is no checkout of the official repository of ``kind``, or None."""
    var, name, marker = REPOS[kind]
    src = repo_source(kind)
    if not (src / marker).is_file():
        where = f"{var}={src}" if os.environ.get(var) else f"{src} (or set {var})"
        return f"no checkout of the official {name} at {where}: {marker} not found"
    return None


def missing(kind: str) -> Optional[str]:
    """Why the official test of ``kind`` cannot run here (no checkout, or no official environment), or None."""
    if missing_checkout(kind):
        return missing_checkout(kind)
    py = official_python()
    if not py.is_file():
        return (f"no official-code environment at {py}: run `make setup-official` (torch + torchvision + ganslim) "
                "or set GANSLIM_OFFICIAL_PYTHON")
    return None


def venv_env(python: Optional[pathlib.Path] = None) -> dict:
    """The environment of an activated ``.venv-official``: its ``bin`` first on PATH, so the READMEs'
    ``python`` and ``pip`` are that environment's."""
    py = pathlib.Path(python or official_python())
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PATH"] = f"{py.parent}{os.pathsep}{env.get('PATH', '')}"
    env["VIRTUAL_ENV"] = str(py.parent.parent)
    env["PYTHONUNBUFFERED"] = "1"
    env["TQDM_DISABLE"] = "1"
    # one thread: these networks are tiny, and on a loaded 2-core machine two OpenMP threads that wait
    # for each other run 100x slower (measured: 1.6 s vs 13 ms for a U-Net step)
    env["OMP_NUM_THREADS"] = os.environ.get("GANSLIM_OFFICIAL_THREADS", "1")
    return env


def copy_repo(kind: str, dst: pathlib.Path) -> pathlib.Path:
    """A writable copy of the official repository (the snapshots are read-only), without VCS data and
    outputs of earlier runs."""
    shutil.copytree(repo_source(kind), dst,
                    ignore=shutil.ignore_patterns(".git", "checkpoints", "results", "__pycache__", "pretrained_model"))
    for d, dirs, files in os.walk(dst):
        for n in dirs + files:
            p = os.path.join(d, n)
            os.chmod(p, os.stat(p).st_mode | stat.S_IWUSR)
    os.chmod(dst, os.stat(dst).st_mode | stat.S_IWUSR)
    return dst


# ----------------------------------------------------------------------------- README command lines
def readme_blocks(adapter: str) -> list[tuple[str, list[str]]]:
    """The ```bash blocks of ``adapters/<adapter>/README.md`` as ``(heading, commands)``: comments
    dropped, backslash continuations joined, one string per command."""
    text = (ROOT / "adapters" / adapter / "README.md").read_text()
    out, heading = [], ""
    for m in re.finditer(r"^(#+ [^\n]*)$|^```(\w*)\n(.*?)^```", text, re.M | re.S):
        if m.group(1):
            heading = m.group(1).lstrip("#").strip()
            continue
        if m.group(2) != "bash":
            continue
        cmds, cur = [], ""
        for line in m.group(3).splitlines():
            line = re.sub(r"(^|\s)#.*$", "", line).rstrip()
            cont = line.endswith("\\")
            cur += (line[:-1] if cont else line).strip() + " "
            if not cont:
                if cur.strip():
                    cmds.append(" ".join(cur.split()))
                cur = ""
        out.append((heading, cmds))
    return out


def readme_commands(adapter: str, heading: Optional[str] = None) -> list[str]:
    """Every command of the README's bash blocks (those under ``heading`` when given)."""
    return [c for h, cmds in readme_blocks(adapter) if heading is None or h == heading for c in cmds]


def find_command(commands: list[str], *words: str) -> str:
    """The only command that contains every one of ``words``."""
    hits = [c for c in commands if all(w in c for w in words)]
    if len(hits) != 1:
        raise AssertionError(f"expected one README command with {words}, found {len(hits)}: {hits}")
    return hits[0]


@dataclass
class Run:
    command: str
    seconds: float
    output: str


@dataclass
class Shell:
    """Runs command lines in ``cwd`` as a user of the official repository would, in the official
    environment (``python`` is its interpreter), with ``/path/to/ganslim`` meaning this source tree.
    Every command and its output go to ``log``."""
    cwd: pathlib.Path
    log: pathlib.Path
    subst: dict = field(default_factory=dict)
    timeout: float = 600.0
    runs: list = field(default_factory=list)

    def __call__(self, command: str, *extra: str, check: bool = True) -> Run:
        cmd = command.replace(README_PLACEHOLDER_ROOT, str(ROOT))
        for k, v in self.subst.items():
            cmd = cmd.replace(k, str(v))
        if extra:
            cmd += " " + " ".join(shlex.quote(str(e)) for e in extra)
        t0 = time.time()
        p = subprocess.run(["bash", "-c", cmd], cwd=self.cwd, env=venv_env(), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, timeout=self.timeout)
        run = Run(cmd, time.time() - t0, p.stdout)
        self.runs.append(run)
        with open(self.log, "a") as f:
            f.write(f"$ {cmd}\n{p.stdout}\n[exit {p.returncode}, {run.seconds:.1f} s]\n\n")
        if check and p.returncode != 0:
            tail = "\n".join(p.stdout.splitlines()[-40:])
            raise AssertionError(f"command failed (exit {p.returncode}) in {self.cwd}:\n$ {cmd}\n{tail}")
        return run


# ----------------------------------------------------------------------------- data from real photos
def _to_uint8(a: np.ndarray) -> np.ndarray:
    return (np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8)


def _square(t) -> np.ndarray:
    """``(3, H, W)`` tensor in [-1, 1] -> centre-cropped square ``(S, S, 3)`` in [0, 1]."""
    a = (t.numpy().transpose(1, 2, 0) + 1) / 2
    h, w = a.shape[:2]
    s = min(h, w)
    return a[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]


def photo_cartoon(name: str, size: int) -> tuple[np.ndarray, np.ndarray]:
    """A scikit-image photo and its cartoon rendering (``ganslim.data``), ``(size, size, 3)`` in [0, 1]."""
    return photo_cartoon_tiles(name, size)[0]


def photo_cartoon_tiles(name: str, size: int, grid: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """The photo rendered at ``size * grid`` (square centre crop) cut into ``grid x grid`` tiles of
    ``size`` px: ``[(photo, cartoon), ...]`` in [0, 1]."""
    from ganslim.data import photo_pair

    photo, cartoon = (_square(t) for t in photo_pair(name, size * grid))
    n = size * grid
    assert min(photo.shape[:2]) >= n, f"{name} at {n} px: use a size that is a multiple of 4"
    photo, cartoon = photo[:n, :n], cartoon[:n, :n]
    return [(photo[i:i + size, j:j + size], cartoon[i:i + size, j:j + size])
            for i in range(0, n, size) for j in range(0, n, size)]


def _save(path: pathlib.Path, a: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(_to_uint8(a) if a.dtype != np.uint8 else a).save(path)


def make_aligned(root: pathlib.Path, size: int, n_train: int = 4, n_test: int = 1, train=None, test=None,
                 grid: int = 1, test_size: Optional[int] = None) -> pathlib.Path:
    """pix2pix ``--dataset_mode aligned``: ``{train,test}/<name>.png`` = ``A | B`` side by side, A the
    cartoon and B the photo (as facades: ``--direction BtoA`` maps photo -> cartoon). ``grid``: each
    training photo gives ``grid**2`` tiles; test photos are whole, at ``test_size`` (default ``size``)."""
    train = TRAIN_PHOTOS[:n_train] if train is None else train
    test = TEST_PHOTOS[:n_test] if test is None else test
    for n in train:
        for k, (photo, cartoon) in enumerate(photo_cartoon_tiles(n, size, grid)):
            _save(root / "train" / (f"{n}.png" if grid == 1 else f"{n}_{k}.png"), np.concatenate([cartoon, photo], 1))
    for n in test:
        photo, cartoon = photo_cartoon(n, test_size or size)
        _save(root / "test" / f"{n}.png", np.concatenate([cartoon, photo], axis=1))
    return root


def make_unaligned(root: pathlib.Path, size: int, n_train: int = 4, n_test: int = 1, train=None, test=None,
                   grid: int = 1, test_size: Optional[int] = None) -> pathlib.Path:
    """CycleGAN ``--dataset_mode unaligned``: ``trainA`` photos, ``trainB`` cartoons of *other* photos
    (unpaired: every other training photo goes to each side), ``testA`` / ``testB`` the held-out photos
    and their cartoons (``<name>.png``, ``<name>_cartoon.png``)."""
    train = TRAIN_PHOTOS[:2 * n_train] if train is None else train
    test = TEST_PHOTOS[:n_test] if test is None else test
    for i, n in enumerate(train):
        for k, (photo, cartoon) in enumerate(photo_cartoon_tiles(n, size, grid)):
            sfx = "" if grid == 1 else f"_{k}"
            if i % 2 == 0:
                _save(root / "trainA" / f"{n}{sfx}.png", photo)
            else:
                _save(root / "trainB" / f"{n}{sfx}_cartoon.png", cartoon)
    for n in test:
        photo, cartoon = photo_cartoon(n, test_size or size)
        _save(root / "testA" / f"{n}.png", photo)
        _save(root / "testB" / f"{n}_cartoon.png", cartoon)
    return root


def label_map(cartoon: np.ndarray, label_nc: int) -> np.ndarray:
    """``(H, W)`` uint8 labels ``0 .. label_nc-1``: the cartoon's luminance in equal-count bins (flat
    regions with sharp borders, like a segmentation)."""
    lum = cartoon @ np.array([0.299, 0.587, 0.114])
    edges = np.quantile(lum, np.linspace(0, 1, label_nc + 1)[1:-1])
    return np.digitize(lum, edges).astype(np.uint8)


def make_spade_custom(root: pathlib.Path, size: int, label_nc: int, n_train: int = 4) -> tuple[pathlib.Path, pathlib.Path]:
    """SPADE ``--dataset_mode custom``: ``labels/<name>.png`` (uint8 class ids) and ``images/<name>.jpg``
    (the photo) with matching names. Returns ``(label_dir, image_dir)``."""
    for n in TRAIN_PHOTOS[:n_train]:
        photo, cartoon = photo_cartoon(n, size)
        _save(root / "labels" / f"{n}.png", label_map(cartoon, label_nc))
        _save(root / "images" / f"{n}.jpg", photo)
    return root / "labels", root / "images"


def make_photo_folder(root: pathlib.Path, size: int, names=TRAIN_PHOTOS) -> pathlib.Path:
    for n in names:
        _save(root / f"{n}.jpg", photo_cartoon(n, size)[0])
    return root


# ----------------------------------------------------------------------------- checks (no official code)
def load_image(path: pathlib.Path) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"))


def load_image_gray(path: pathlib.Path) -> np.ndarray:
    """A single-channel image (e.g. a label map of class ids) as ``(H, W)`` uint8."""
    from PIL import Image

    return np.array(Image.open(path))


def to_input(a: np.ndarray):
    """``(H, W, 3)`` uint8 -> ``(1, 3, H, W)`` float in [-1, 1] (the repositories' normalisation)."""
    import torch

    return torch.from_numpy(a.astype(np.float32) / 127.5 - 1).permute(2, 0, 1)[None].contiguous()


def macs_ratio(slim, teacher, x) -> float:
    from ganslim import measure

    return measure.count_macs(slim, x) / measure.count_macs(teacher, x)


def check_macs(slim, teacher, x, target: float, name: str = "student", tol: float = 0.005) -> None:
    """Assert ``slim`` has at most ``target`` (+ ``tol`` relative, rounding) of ``teacher``'s MACs
    (papers' convention, as the session's MACs model counts them: a non-affine norm that the export
    made affine included) and more than half of it."""
    from ganslim import measure

    ratio = measure.count_macs(slim, x) / measure.count_macs(teacher, x)
    assert ratio > 0.5 * target, f"{name}: MACs ratio {ratio:.4f}, far below the target {target} (over-pruned)"
    assert ratio <= target * (1 + tol), f"{name}: MACs ratio {ratio:.4f} > target {target}"


def assert_no_official_modules(*copies: pathlib.Path) -> None:
    """The checks run in the test process must not have imported any official code (from the
    snapshots or from the working copies ``copies``)."""
    roots = [str(OFFICIAL)] + [str(repo_source(k)) for k in REPOS] + [str(c) for c in copies]
    bad = [k for k, m in list(sys.modules.items())
           if any(str(getattr(m, "__file__", "") or "").startswith(r + os.sep) for r in roots)]
    assert not bad, f"official modules imported in the test process: {bad[:5]}"
