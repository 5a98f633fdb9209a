"""Embedded default data: real photographs shipped inside scikit-image, and their cartoon-style
renderings made by a fixed filter (the CartoonGAN use case: photo -> cartoon).

Nothing is downloaded. Whole photos are held out for testing (``TEST_PHOTOS``), so fidelity is
measured on content the teacher never saw. Images are ``float32`` tensors in ``[-1, 1]``,
layout ``(3, H, W)`` per item, ``(N, 3, H, W)`` per batch.

Views:
- :class:`PairedCrops`  -> ``(photo, cartoon)`` random crops (pix2pix-style paired training).
- :class:`UnpairedCrops` -> ``{"A": photo, "B": cartoon}`` from independent locations/photos
  (CycleGAN-style unpaired training; the official repos' dict-batch keys).
- :func:`test_pairs`    -> whole held-out photos ``[(photo, cartoon)]`` with batch dim 1.
"""
from __future__ import annotations

import functools
import os
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

# Colour photographs of skimage.data (files inside the package; no pooch download needed).
TRAIN_PHOTOS = ("astronaut", "rocket", "coffee", "motorcycle_left", "hubble_deep_field",
                "immunohistochemistry", "retina", "color")
TEST_PHOTOS = ("chelsea",)
WORKING_SHORT_SIDE = 256  # photos are resized so their short side is this many pixels


def _skimage_photo(name: str) -> np.ndarray:
    """``(H, W, 3)`` float64 in [0, 1] from the files shipped in ``skimage/data``."""
    import skimage
    import skimage.io

    files = {"motorcycle_left": "motorcycle_left.png", "immunohistochemistry": "ihc.png",
             "hubble_deep_field": "hubble_deep_field.jpg", "retina": "retina.jpg", "rocket": "rocket.jpg",
             "color": "color.png"}
    path = os.path.join(os.path.dirname(skimage.__file__), "data", files.get(name, f"{name}.png"))
    if not os.path.exists(path):
        raise FileNotFoundError(f"scikit-image sample photo {name!r} not found at {path}; "
                                "reinstall scikit-image (the photos ship inside the package)")
    img = skimage.io.imread(path)
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return img[..., :3].astype(np.float64) / 255.0


def cartoonize(img: np.ndarray, levels: int = 8, tv_weight: float = 0.08) -> np.ndarray:
    """The fixed photo -> cartoon filter. ``img``: ``(H, W, 3)`` in [0, 1]; returns the same shape.

    1. total-variation smoothing: flat colour regions with sharp borders;
    2. soft posterisation to ``levels`` steps per channel (a smooth staircase, so it is learnable);
    3. dark outlines where the smoothed image has strong gradients.
    """
    from skimage.filters import sobel
    from skimage.restoration import denoise_tv_chambolle

    smooth = denoise_tv_chambolle(img, weight=tv_weight, channel_axis=-1)
    t = smooth * (levels - 1)
    floor = np.floor(t)
    step = 1.0 / (1.0 + np.exp(-12.0 * (t - floor - 0.5)))
    poster = (floor + step) / (levels - 1)
    gray = smooth @ np.array([0.299, 0.587, 0.114])
    edge = np.clip((sobel(gray) - 0.04) / 0.06, 0.0, 1.0)
    return np.clip(poster * (1.0 - 0.85 * edge[..., None]), 0.0, 1.0)


def _resize_short_side(img: np.ndarray, short: int) -> np.ndarray:
    from skimage.transform import resize

    h, w = img.shape[:2]
    s = short / min(h, w)
    # multiples of 4 so every image passes through two stride-2 stages and back unchanged
    nh, nw = max(4, int(round(h * s / 4)) * 4), max(4, int(round(w * s / 4)) * 4)
    return resize(img, (nh, nw), anti_aliasing=True, order=3).clip(0, 1)


@functools.lru_cache(maxsize=None)
def photo_pair(name: str, short_side: int = WORKING_SHORT_SIDE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(photo, cartoon)`` tensors ``(3, H, W)`` in [-1, 1] for one skimage photo (cached)."""
    img = _resize_short_side(_skimage_photo(name), short_side)
    cart = cartoonize(img)

    def to_t(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.transpose(2, 0, 1).astype(np.float32) * 2.0 - 1.0).contiguous()

    return to_t(img), to_t(cart)


def _random_crop(gen: torch.Generator, h: int, w: int, crop: int) -> tuple[int, int]:
    i = int(torch.randint(0, h - crop + 1, (1,), generator=gen))
    j = int(torch.randint(0, w - crop + 1, (1,), generator=gen))
    return i, j


class PairedCrops(Dataset):
    """``length`` random ``crop``x``crop`` pairs ``(photo, cartoon)`` from the training photos.

    Item ``k`` is a deterministic function of ``(seed, k)``: the same index always gives the same
    crop, so resumed or distributed runs see the same data.
    """

    def __init__(self, crop: int = 64, length: int = 4096, seed: int = 0, photos=TRAIN_PHOTOS, flip: bool = True):
        if crop % 4:
            raise ValueError(f"crop must be a multiple of 4, got {crop}")
        self.crop, self.length, self.seed, self.flip = crop, length, seed, flip
        self.pairs = [photo_pair(p) for p in photos]
        small = min((((x.shape[1], x.shape[2]), name) for (x, _), name in zip(self.pairs, photos)), key=lambda t: min(t[0]))
        if crop > min(small[0]):
            raise ValueError(f"crop {crop} is larger than the embedded photo {small[1]!r} ({small[0][1]}x{small[0][0]}); "
                             f"the embedded data allows crops up to {min(small[0]) // 4 * 4}")
        self.weights = torch.tensor([float(x.shape[1] * x.shape[2]) for x, _ in self.pairs])

    def __len__(self) -> int:
        return self.length

    def _gen(self, idx: int) -> torch.Generator:
        return torch.Generator().manual_seed(self.seed * 1_000_003 + idx)

    def _crop(self, gen: torch.Generator, which: int) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = self.pairs[which]
        i, j = _random_crop(gen, x.shape[1], x.shape[2], self.crop)
        x, y = x[:, i:i + self.crop, j:j + self.crop], y[:, i:i + self.crop, j:j + self.crop]
        if self.flip and bool(torch.rand((), generator=gen) < 0.5):
            x, y = x.flip(-1), y.flip(-1)
        return x.contiguous(), y.contiguous()

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        gen = self._gen(idx)
        which = int(torch.multinomial(self.weights, 1, generator=gen))
        return self._crop(gen, which)


class TeacherCrops(PairedCrops):
    """Paired crops that also carry the teacher's output for the same window (offline distillation):
    the teacher runs once per whole photo here, and each item is
    ``{"A": photo, "target": cartoon, "teacher_output": teacher(photo)}`` cropped alike, so training
    skips the teacher's forward (and its crop-border effects)."""

    def __init__(self, teacher: torch.nn.Module, crop: int = 64, length: int = 4096, seed: int = 0,
                 photos=TRAIN_PHOTOS, flip: bool = True, ground_truth: bool = True):
        super().__init__(crop=crop, length=length, seed=seed, photos=photos, flip=flip)
        self.ground_truth = ground_truth
        was_training = teacher.training
        dev = next((p.device for p in teacher.parameters()), torch.device("cpu"))
        teacher.eval()
        try:
            with torch.no_grad():
                self.teacher_outputs = [teacher(x[None].to(dev))[0].float().cpu() for x, _ in self.pairs]
                # flipped items get the teacher's output on the flipped photo (a generator is not exactly
                # flip-equivariant), stored flipped back so both crop alike
                self.teacher_outputs_flipped = [teacher(x[None].flip(-1).to(dev))[0].float().cpu().flip(-1) if flip
                                                else None for x, _ in self.pairs]
        finally:
            teacher.train(was_training)
        if self.teacher_outputs[0].shape != self.pairs[0][1].shape:
            raise ValueError(f"teacher output {tuple(self.teacher_outputs[0].shape)} does not match the photo "
                             f"{tuple(self.pairs[0][1].shape)}: not an image-to-image generator for this data")

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        gen = self._gen(idx)
        which = int(torch.multinomial(self.weights, 1, generator=gen))
        (x, y), c = self.pairs[which], self.crop
        i, j = _random_crop(gen, x.shape[1], x.shape[2], c)
        flip = self.flip and bool(torch.rand((), generator=gen) < 0.5)
        t = (self.teacher_outputs_flipped if flip else self.teacher_outputs)[which]
        out = [a[:, i:i + c, j:j + c] for a in (x, y, t)]
        if flip:
            out = [a.flip(-1) for a in out]
        item = {"A": out[0].contiguous(), "teacher_output": out[2].contiguous()}
        if self.ground_truth:
            item["target"] = out[1].contiguous()
        return item


class UnpairedCrops(PairedCrops):
    """CycleGAN-style view: ``{"A": photo crop, "B": cartoon crop}`` drawn independently."""

    def __getitem__(self, idx: int) -> dict[str, torch.Tensor]:
        if not 0 <= idx < self.length:
            raise IndexError(idx)
        gen = self._gen(idx)
        a, _ = self._crop(gen, int(torch.multinomial(self.weights, 1, generator=gen)))
        _, b = self._crop(gen, int(torch.multinomial(self.weights, 1, generator=gen)))
        return {"A": a, "B": b}


def default_loader(batch_size: int = 4, crop: int = 64, length: int = 4096, seed: int = 0,
                   unpaired: bool = False, shuffle: bool = False, teacher: torch.nn.Module | None = None,
                   photos=TRAIN_PHOTOS, ground_truth: bool = True) -> DataLoader:
    """A ``DataLoader`` over the embedded training photos; batches are ``(photo, cartoon)``
    tensors ``(B, 3, crop, crop)``; with ``unpaired=True`` dicts with keys ``A``/``B``; with
    ``teacher=`` dicts ``{"A", "target", "teacher_output"}`` (see :class:`TeacherCrops`).

    ``photos``: which of the embedded photos (names of :data:`TRAIN_PHOTOS`, or any other colour
    sample of ``skimage.data``) the crops come from. ``ground_truth=False`` drops the cartoons, so a
    student has only the teacher's outputs to learn from (distillation without labels): batches are
    photo tensors, or with ``teacher=`` dicts ``{"A", "teacher_output"}``.
    """
    photos = tuple(photos)
    if not photos:
        raise ValueError("photos is empty: name at least one embedded photo, e.g. photos=('astronaut',)")
    if set(photos) & set(TEST_PHOTOS):
        raise ValueError(f"{sorted(set(photos) & set(TEST_PHOTOS))} is the held-out photo every evaluation uses; "
                         "training on it would make the held-out numbers meaningless")
    if teacher is not None:
        if unpaired:
            raise ValueError("teacher= precomputes outputs for paired crops; it cannot be combined with unpaired=True")
        ds = TeacherCrops(teacher, crop=crop, length=length, seed=seed, photos=photos, ground_truth=ground_truth)
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=0)
    if unpaired and not ground_truth:
        raise ValueError("unpaired=True gives unpaired cartoons (domain B) as targets; ground_truth=False would drop "
                         "them. For distillation without labels use ground_truth=False alone (batches are photos)")
    if unpaired:
        ds = UnpairedCrops(crop=crop, length=length, seed=seed, photos=photos)
    else:
        ds = PairedCrops(crop=crop, length=length, seed=seed, photos=photos)
        if not ground_truth:
            ds = _PhotosOnly(ds)
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, drop_last=True, num_workers=0)


class _PhotosOnly(Dataset):
    """The photo of each pair only (no ground truth)."""

    def __init__(self, pairs: PairedCrops):
        self.pairs = pairs

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, idx: int) -> torch.Tensor:
        return self.pairs[idx][0]


def test_pairs(photos=TEST_PHOTOS) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Whole held-out photos: ``[(photo (1,3,H,W), cartoon (1,3,H,W))]``, never used in training."""
    return [tuple(t.unsqueeze(0) for t in photo_pair(p)) for p in photos]


DEFAULT_TEACHER = os.path.join(os.path.dirname(__file__), "assets", "default_teacher.safetensors")


def default_teacher() -> torch.nn.Module:
    """The shipped default teacher: ResNet-9 (ngf 32, batch norm) trained on the photo -> cartoon
    task by ``benchmarks/train_teacher.py``; stored in fp16, returned in fp32, eval mode."""
    from .deployment.checkpoint import load

    if not os.path.exists(DEFAULT_TEACHER):
        raise FileNotFoundError(f"default teacher not found at {DEFAULT_TEACHER}; train it with "
                                "`python benchmarks/train_teacher.py` (about 15 minutes on 2 cores)")
    return load(DEFAULT_TEACHER)


class ImageFolder(Dataset):
    """Images of a folder (png/jpg/bmp/tif) as random ``crop``x``crop`` tensors in [-1, 1] (input only:
    compress pairs them with the teacher's outputs). ``length`` crops, deterministic per index."""

    EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

    def __init__(self, root: str, crop: int = 64, length: int = 4096, seed: int = 0):
        import skimage.io

        if not os.path.isdir(root):
            raise FileNotFoundError(f"image folder {root!r} does not exist")
        files = sorted(f for f in os.listdir(root) if f.lower().endswith(self.EXTS))
        if not files:
            raise ValueError(f"no images ({', '.join(self.EXTS)}) in {root!r}")
        self.images = []
        for f in files:
            img = skimage.io.imread(os.path.join(root, f))
            if img.ndim == 2:
                img = np.stack([img] * 3, -1)
            img = img[..., :3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
            if min(img.shape[:2]) < crop:
                raise ValueError(f"{f} is {img.shape[1]}x{img.shape[0]}, smaller than the crop {crop}")
            self.images.append(torch.from_numpy(img.transpose(2, 0, 1) * 2 - 1).contiguous())
        self.crop, self.length, self.seed = crop, length, seed

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + idx)
        img = self.images[int(torch.randint(0, len(self.images), (1,), generator=gen))]
        i, j = _random_crop(gen, img.shape[1], img.shape[2], self.crop)
        return img[:, i:i + self.crop, j:j + self.crop].contiguous()


def folder_images(root: str, size: tuple[int, int] | None = None, multiple: int = 4, limit: int = 64) -> list[torch.Tensor]:
    """Whole images of a folder as ``(1, 3, H, W)`` tensors in [-1, 1] (sorted by name, at most
    ``limit``): resized to ``size`` (H, W) when given, else centre-cropped so that H and W are
    multiples of ``multiple`` (generators with k stride-2 stages need multiples of 2^k)."""
    import skimage.io
    from skimage.transform import resize

    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    files = sorted(f for f in os.listdir(root) if f.lower().endswith(ImageFolder.EXTS))[:limit]
    if not files:
        raise ValueError(f"no images ({', '.join(ImageFolder.EXTS)}) in {root!r}")
    out = []
    for f in files:
        img = skimage.io.imread(os.path.join(root, f))
        if img.ndim == 2:
            img = np.stack([img] * 3, -1)
        img = img[..., :3].astype(np.float32) / (65535.0 if img.dtype == np.uint16 else 255.0)
        if size is not None:
            img = resize(img, size, anti_aliasing=True, order=3).astype(np.float32).clip(0, 1)
        else:
            h, w = (img.shape[0] // multiple) * multiple, (img.shape[1] // multiple) * multiple
            if h == 0 or w == 0:
                raise ValueError(f"{f} is smaller than {multiple} pixels")
            top, left = (img.shape[0] - h) // 2, (img.shape[1] - w) // 2
            img = img[top:top + h, left:left + w]
        out.append(torch.from_numpy(img.transpose(2, 0, 1) * 2 - 1).unsqueeze(0).contiguous())
    return out
