"""onnxruntime's operator profile of exported files (ganslim.deployment.profile) on a generator with
GroupNorm and depthwise convs (GAN Compression's mobile ResNet, ganslim.zoo.mobile_resnet) and on its
batch-norm twin: which operators stay float in int8, and the exact Shape-of-dequantized rewrite."""
import logging
import warnings

import onnx
import pytest
import torch
import torch.nn as nn

from ganslim.deployment.deploy import OnnxModule, export
from ganslim.deployment.onnx_rewrite import shape_of_quantized
from ganslim.deployment.profile import profile_ops
from ganslim.zoo import create_model
from ganslim.zoo.mobile_resnet import MobileResnetGenerator

logging.getLogger().setLevel(logging.ERROR)  # onnxruntime's quantizer logs one line per weight axis


def _calib(n=3, size=32):
    g = torch.Generator().manual_seed(1)
    return [(torch.rand(2, 3, size, size, generator=g) * 2 - 1,) for _ in range(n)]


def _mobile(norm: str, ngf: int = 8, blocks: int = 2) -> nn.Module:
    torch.manual_seed(0)
    net = MobileResnetGenerator(ngf=ngf, norm=norm, separable_norm=norm, n_blocks=blocks).eval()
    with torch.no_grad():  # statistics of a trained network (fresh ones are the identity)
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_var.uniform_(0.5, 2.0)
                m.running_mean.uniform_(-0.1, 0.1)
    return net


def test_the_mobile_resnet_keeps_the_official_layout():
    net = create_model("mobile_resnet_9blocks", ngf=16)
    sd = net.state_dict()
    # GAN Compression's keys: 10 stem/downsampling entries, then the blocks, each separable conv a
    # depthwise conv.0, its norm conv.1 (instance, no parameters) and a pointwise conv.2
    assert sd["model.1.weight"].shape == (16, 3, 7, 7) and "model.1.bias" in sd  # instance norm: biased convs
    assert sd["model.10.conv_block.1.conv.0.weight"].shape == (64, 1, 3, 3)
    assert sd["model.10.conv_block.1.conv.2.weight"].shape == (64, 64, 1, 1)
    assert sd["model.10.conv_block.6.conv.2.weight"].shape == (64, 64, 1, 1)
    assert sd["model.19.weight"].shape == (64, 32, 3, 3)  # first transposed conv
    assert sd["model.26.weight"].shape == (3, 16, 7, 7) and "model.26.bias" in sd
    assert not any(k.startswith("model.27") for k in sd)
    x = torch.rand(1, 3, 32, 48)
    assert net(x).shape == x.shape
    group = MobileResnetGenerator(ngf=12, norm="group", separable_norm="group", groups=8)
    norms = [m for m in group.modules() if isinstance(m, nn.GroupNorm)]
    # 9 blocks x (2 block norms + 2 separable norms) + stem/down/up norms; groups divide each width
    assert len(norms) == 9 * 4 + 5 and all(m.num_channels % m.num_groups == 0 for m in norms)
    assert {m.num_groups for m in norms} == {4, 8}  # gcd(8, 12) = 4 at ngf, 8 at 24 and 48 channels
    assert "model.1.bias" not in group.state_dict()  # the official rule: bias only before instance norm
    with pytest.raises(ValueError, match="norm must be one of"):
        MobileResnetGenerator(norm="layer")


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    d = tmp_path_factory.mktemp("int8prof")
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    files = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for norm in ("group", "batch"):
            net = _mobile(norm)
            files[norm] = (net, export(net, d / f"{norm}.onnx", "onnx", example_inputs=x),
                           export(net, d / f"{norm}.int8.onnx", "onnx-int8", example_inputs=x, calib_loader=_calib()))
    return x, files


def test_the_profile_times_every_node_and_names_what_stays_float(exported):
    x, files = exported
    net, fp32, int8 = files["group"]
    pf, pq = profile_ops(fp32, x, threads=1, runs=3), profile_ops(int8, x, threads=1, runs=3)
    for prof in (pf, pq):
        assert prof.nodes and all(n.ms >= 0 for n in prof.nodes) and prof.total_ms > 0 and prof.run_ms > 0
        assert sum(ms for *_, ms in prof.by_op_type()) == pytest.approx(prof.total_ms)
        assert sum(prof.by_precision().values()) == pytest.approx(prof.total_ms)
        assert "node time" in prof.table()
    assert pf.by_precision()["int8"] == 0 and pf.by_precision()["convert"] == 0
    convs = sum(isinstance(m, nn.Conv2d) for m in net.modules())
    by_type = {(op, prec): cnt for op, prec, cnt, _ in pq.by_op_type()}
    # every conv but the float first and last runs as an integer kernel (the transposed convs too,
    # in their sub-pixel form); GroupNorm's normalisation has no integer kernel and stays float
    assert by_type[("QLinearConv", "int8")] >= convs - 2
    assert pq.float_ops().get("InstanceNormalization", 0) == sum(isinstance(m, nn.GroupNorm) for m in net.modules())
    assert pq.by_precision()["convert"] > 0
    # batch norm folds into the convs: nothing of the norms is left in float
    _, _, int8_bn = files["batch"]
    bn = profile_ops(int8_bn, x, threads=1, runs=2)
    assert "InstanceNormalization" not in bn.float_ops() and "BatchNormalization" not in bn.float_ops()
    with pytest.raises(ValueError, match="runs must be >= 1"):
        profile_ops(int8, x, runs=0)
    with pytest.raises(ValueError, match="takes 1 input"):
        profile_ops(int8, (x, x))


def test_no_dequantize_pass_is_kept_only_for_a_shape(exported):
    """The exporter's GroupNorm reads its input's shape; in the int8 file that Shape reads the integer
    tensor, and the result is identical to the graph as quantized."""
    x, files = exported
    _, _, int8 = files["group"]
    g = onnx.load(str(int8)).graph
    producer = {o: n for n in g.node for o in n.output}
    shapes = [n for n in g.node if n.op_type == "Shape"]
    assert shapes and not any(producer.get(n.input[0]) is not None
                              and producer[n.input[0]].op_type == "DequantizeLinear" for n in shapes)
    # undo the rewrite by hand: Shape of a DequantizeLinear again, then redo it and compare outputs
    m = onnx.load(str(int8))
    dq_src = next(n for n in m.graph.node if n.op_type == "Shape" and
                  any(p.op_type == "DequantizeLinear" and p.input[0] == n.input[0] for p in m.graph.node))
    dq = next(p for p in m.graph.node if p.op_type == "DequantizeLinear" and p.input[0] == dq_src.input[0])
    dq_src.input[0] = dq.output[0]
    assert shape_of_quantized(m) >= 1 and dq_src.input[0] == dq.input[0]
    path = int8.with_name("again.onnx")
    onnx.save(m, str(path))
    assert torch.equal(OnnxModule(path, threads=1)(x), OnnxModule(int8, threads=1)(x))


def test_cli_profile_prints_the_table_and_writes_every_node(exported, tmp_path):
    import json
    import os
    import subprocess
    import sys

    _, files = exported
    _, _, int8 = files["group"]
    out = tmp_path / "prof.json"
    r = subprocess.run([sys.executable, "-m", "ganslim", "profile", str(int8), "--input-shape", "1,3,32,32",
                        "--runs", "2", "--threads", "1", "--json", str(out)],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert "QLinearConv" in r.stdout and "left in float" in r.stdout and "InstanceNormalization" in r.stdout
    saved = json.loads(out.read_text())
    assert saved["input"] == [1, 3, 32, 32] and saved["nodes"] and saved["float_ops"]["InstanceNormalization"] > 0
    bad = subprocess.run([sys.executable, "-m", "ganslim", "profile", str(tmp_path / "missing.onnx")],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "error" in bad.stderr and "Traceback" not in bad.stderr
