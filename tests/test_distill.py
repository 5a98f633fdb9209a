"""Feature distillation: automatic layer choice, mapping layers, hooks that come off."""
import copy

import torch

from archs import RandomGenerator
from ganslim.core.distill import FeatureDistiller, auto_distill_points
from ganslim.zoo import create_model


def test_auto_points_on_resnet_are_evenly_spaced_residual_blocks():
    m = create_model("resnet_9blocks", ngf=8)
    pts = auto_distill_points(m, torch.randn(1, 3, 32, 32), k=4)
    assert len(pts) == 4
    assert all(isinstance(m.get_submodule(p), type(m.model[10])) for p in pts)
    assert pts[-1] == "model.18"


def test_auto_points_on_unknown_network_have_one_spatial_size():
    m = RandomGenerator(["conv", "down", "res", "conv", "up_t"], [8, 8, 16, 16, 8, 8, 8])
    x = torch.randn(1, 3, 16, 16)
    pts = auto_distill_points(m, x, k=3)
    assert 1 <= len(pts) <= 3
    shapes = set()
    for p in pts:
        h = m.get_submodule(p).register_forward_hook(lambda mod, i, o: shapes.add(tuple(o.shape[2:])))
        m(x)
        h.remove()
    assert len(shapes) == 1


def test_identity_mapping_gives_zero_loss_for_a_copy_and_hooks_come_off():
    teacher = create_model("resnet_6blocks", ngf=8).eval()
    student = copy.deepcopy(teacher)
    x = torch.randn(2, 3, 32, 32)
    pts = auto_distill_points(student, x)
    d = FeatureDistiller(student, teacher, {p: p for p in pts}, x)
    student(x)
    teacher(x)
    assert float(d.loss().detach()) < 1e-10
    d.remove()
    assert all(len(mod._forward_hooks) == 0 for mod in list(student.modules()) + list(teacher.modules()))


def test_narrower_student_maps_and_least_squares_fit_lowers_the_loss():
    teacher = create_model("resnet_6blocks", ngf=16).eval()
    student = create_model("resnet_6blocks", ngf=8).eval()
    x = torch.randn(2, 3, 32, 32)
    d = FeatureDistiller(student, teacher, {"model.12": "model.12", "model.15": "model.15"}, x)
    assert d.maps["model__12"].in_channels == 32 and d.maps["model__12"].out_channels == 64
    with torch.no_grad():
        student(x), teacher(x)
        before = float(d.loss())
        student(x), teacher(x)
        d.fit_maps()
        student(x), teacher(x)
        after = float(d.loss())
    assert after < before


def test_mismatched_spatial_sizes_are_refused():
    teacher = create_model("resnet_6blocks", ngf=8)
    student = copy.deepcopy(teacher)
    try:
        FeatureDistiller(student, teacher, {"model.3": "model.12"}, torch.randn(1, 3, 32, 32))
    except ValueError as e:
        assert "spatial sizes differ" in str(e)
    else:
        raise AssertionError("expected a ValueError")
