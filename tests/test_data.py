"""Embedded data: real photos, held out whole, deterministic crops, paired and unpaired views."""
import numpy as np
import pytest
import torch

from ganslim import data


def test_photos_are_real_and_test_photo_is_held_out():
    assert set(data.TEST_PHOTOS).isdisjoint(data.TRAIN_PHOTOS)
    x, y = data.photo_pair("chelsea")
    assert x.shape == y.shape and x.shape[0] == 3 and min(x.shape[1:]) == data.WORKING_SHORT_SIDE
    assert x.shape[1] % 4 == 0 and x.shape[2] % 4 == 0
    assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
    assert float(x.std()) > 0.2  # a real photo, not a constant
    # the cartoon differs from the photo but keeps its layout (correlated)
    corr = np.corrcoef(x.flatten().numpy(), y.flatten().numpy())[0, 1]
    assert 0.6 < corr < 0.999


def test_cartoonize_flattens_texture_and_draws_outlines():
    img = np.zeros((64, 64, 3))
    img[:, 32:] = 0.8
    img += np.random.default_rng(0).normal(0, 0.05, img.shape)
    out = data.cartoonize(img.clip(0, 1))
    assert out[:, 5:25].std() < img[:, 5:25].std() / 2  # smoothed
    assert out[:, 31:33].mean() < out[:, 40:60].mean() * 0.6  # dark edge at the step


def test_crops_are_deterministic_and_paired():
    ds = data.PairedCrops(crop=32, length=10, seed=3)
    a, b = ds[4]
    a2, b2 = ds[4]
    assert torch.equal(a, a2) and torch.equal(b, b2)
    assert a.shape == (3, 32, 32)
    assert not torch.equal(ds[5][0], a)


def test_unpaired_view_and_loader():
    batch = next(iter(data.default_loader(batch_size=2, crop=32, length=4, unpaired=True)))
    assert set(batch) == {"A", "B"} and batch["A"].shape == (2, 3, 32, 32)
    x, y = next(iter(data.default_loader(batch_size=3, crop=32, length=6)))
    assert x.shape == y.shape == (3, 3, 32, 32)


def test_image_folder(tmp_path):
    import skimage.io

    from ganslim.data import ImageFolder

    x, _ = data.photo_pair("astronaut")
    skimage.io.imsave(tmp_path / "a.png", ((x.permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8))
    ds = ImageFolder(str(tmp_path), crop=32, length=5)
    assert ds[0].shape == (3, 32, 32)
    assert torch.allclose(ds[0].mean(), ds[0].mean())
    try:
        ImageFolder(str(tmp_path / "missing"))
    except FileNotFoundError as e:
        assert "does not exist" in str(e)
    else:
        raise AssertionError


def test_teacher_crops_carry_the_teachers_output_for_the_same_window():
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Tanh()).eval()
    ds = data.TeacherCrops(teacher, crop=32, length=6, seed=3)
    plain = data.PairedCrops(crop=32, length=6, seed=3)
    for k in range(6):
        item = ds[k]
        x, y = plain[k]  # same window and flip as the plain paired view
        assert torch.equal(item["A"], x) and torch.equal(item["target"], y)
        # interior pixels equal the teacher run on the crop itself (a 3x3 conv: only the 1-pixel
        # border differs, where the whole photo gives real context instead of zero padding)
        t_crop = teacher(item["A"][None])[0].detach()
        assert torch.allclose(item["teacher_output"][:, 1:-1, 1:-1], t_crop[:, 1:-1, 1:-1], atol=1e-5)
    batch = next(iter(data.default_loader(batch_size=2, crop=32, length=4, teacher=teacher)))
    assert set(batch) == {"A", "target", "teacher_output"} and batch["teacher_output"].shape == (2, 3, 32, 32)


def test_a_crop_larger_than_the_embedded_photos_is_named():
    with pytest.raises(ValueError, match=r"crop 512 is larger than the embedded photo .*allows crops up to 256"):
        data.default_loader(crop=512)


def test_a_loader_without_ground_truth_gives_the_student_only_photos_and_teacher_outputs():
    """The distillation-without-labels task of bench_peer: fewer photos than the teacher saw, no cartoons."""
    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 3, padding=1), torch.nn.Tanh()).eval()
    one = data.PairedCrops(crop=32, length=4, seed=1, photos=("astronaut",))
    batch = next(iter(data.default_loader(batch_size=2, crop=32, length=4, seed=1, teacher=teacher,
                                          photos=("astronaut",), ground_truth=False)))
    assert set(batch) == {"A", "teacher_output"}
    assert torch.equal(batch["A"][0], one[0][0]) and torch.equal(batch["A"][1], one[1][0])
    from ganslim.core.train import split_batch

    (x,), target = split_batch(batch)
    assert target is None and x.shape == (2, 3, 32, 32)  # compress then distils from the teacher's output
    photos_only = next(iter(data.default_loader(batch_size=2, crop=32, length=4, seed=1, photos=("astronaut",),
                                                ground_truth=False)))
    assert isinstance(photos_only, torch.Tensor) and torch.equal(photos_only[0], one[0][0])
    with pytest.raises(ValueError, match="held-out photo"):
        data.default_loader(photos=("astronaut", "chelsea"))
    with pytest.raises(ValueError, match="photos is empty"):
        data.default_loader(photos=())
    with pytest.raises(ValueError, match="unpaired=True gives unpaired cartoons"):
        data.default_loader(unpaired=True, ground_truth=False)
