"""adapters/pix2pix: the ``--model ganslim`` plug-in, run inside a minimal stand-in of the
pytorch-CycleGAN-and-pix2pix layout (models/__init__.py finder, BaseModel, networks.define_G/define_D/
GANLoss written here; the generators are ganslim's zoo networks with the official keys).
The plug-in inside the real repository: tests/test_official_pix2pix.py."""
import argparse
import importlib
import os
import pathlib
import shutil
import sys
import textwrap

import pytest
import torch

import ganslim
from ganslim import measure
from ganslim.adapters import AdapterError, isolated_imports
from ganslim.zoo import create_model

PLUGIN = pathlib.Path(__file__).resolve().parents[1] / "adapters" / "pix2pix" / "ganslim_model.py"

HOST_INIT = '''
import importlib
from models.base_model import BaseModel

def find_model_using_name(model_name):
    lib = importlib.import_module("models." + model_name + "_model")
    target = model_name.replace("_", "") + "model"
    for name, cls in lib.__dict__.items():
        if name.lower() == target and isinstance(cls, type) and issubclass(cls, BaseModel):
            return cls
    raise ImportError(model_name)
'''
HOST_BASE = '''
import os, torch

class BaseModel:
    def __init__(self, opt):
        self.opt, self.gpu_ids, self.isTrain = opt, opt.gpu_ids, opt.isTrain
        self.device = torch.device("cpu")
        self.save_dir = os.path.join(opt.checkpoints_dir, opt.name)
        self.loss_names, self.model_names, self.visual_names, self.optimizers, self.image_paths = [], [], [], [], []

    @staticmethod
    def modify_commandline_options(parser, is_train):
        return parser

    def setup(self, opt):
        if not self.isTrain or opt.continue_train:
            self.load_networks(opt.epoch)

    def set_requires_grad(self, nets, requires_grad=False):
        for net in nets if isinstance(nets, list) else [nets]:
            for p in net.parameters():
                p.requires_grad = requires_grad

    def test(self):
        with torch.no_grad():
            self.forward()

    def get_current_losses(self):
        return {n: float(getattr(self, "loss_" + n)) for n in self.loss_names}

    def get_current_visuals(self):
        return {n: getattr(self, n) for n in self.visual_names}
'''
HOST_PIX2PIX = '''
from .base_model import BaseModel

class Pix2PixModel(BaseModel):
    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        parser.set_defaults(norm="batch", netG="unet_256", dataset_mode="aligned")
        if is_train:
            parser.set_defaults(gan_mode="vanilla")
            parser.add_argument("--lambda_L1", type=float, default=100.0)
        return parser

class_for_cycle = None
'''
HOST_CYCLE = '''
from .base_model import BaseModel

class CycleGANModel(BaseModel):
    @staticmethod
    def modify_commandline_options(parser, is_train=True):
        parser.set_defaults(no_dropout=True)
        return parser
'''
HOST_NETWORKS = '''
import torch.nn as nn
from ganslim.zoo import create_model
from ganslim.core.train import gan_loss

def define_G(input_nc, output_nc, ngf, netG, norm="batch", use_dropout=False, init_type="normal", init_gain=0.02, gpu_ids=[]):
    if netG not in ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128"):
        raise NotImplementedError(netG)
    return create_model(netG, input_nc=input_nc, output_nc=output_nc, ngf=ngf, norm=norm, use_dropout=use_dropout)

def define_D(input_nc, ndf, netD, n_layers_D=3, norm="batch", init_type="normal", init_gain=0.02, gpu_ids=[]):
    return nn.Sequential(nn.Conv2d(input_nc, ndf, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(ndf, 1, 4, 1, 1))

class GANLoss(nn.Module):
    def __init__(self, gan_mode):
        super().__init__()
        self.mode = "lsgan" if gan_mode == "lsgan" else "vanilla"
    def forward(self, pred, is_real):
        return gan_loss(pred, is_real, self.mode)
'''


def _host(tmp_path):
    repo = tmp_path / "host"
    (repo / "models").mkdir(parents=True)
    for name, text in [("__init__", HOST_INIT), ("base_model", HOST_BASE), ("pix2pix_model", HOST_PIX2PIX),
                       ("cycle_gan_model", HOST_CYCLE), ("networks", HOST_NETWORKS)]:
        (repo / "models" / f"{name}.py").write_text(textwrap.dedent(text))
    shutil.copy(PLUGIN, repo / "models" / "ganslim_model.py")
    return repo


def _parse(models, argv, is_train):
    """The repository's option flow: base flags, then the model's modify_commandline_options (which,
    like the repository's, read sys.argv)."""
    saved, sys.argv = sys.argv, ["train.py"] + list(argv)
    try:
        return _parse_argv(models, argv, is_train)
    finally:
        sys.argv = saved


def _parse_argv(models, argv, is_train):
    p = argparse.ArgumentParser()
    for k, v in dict(name="exp", checkpoints_dir="", model="ganslim", input_nc=3, output_nc=3, ngf=64, ndf=8,
                     netD="basic", netG="resnet_9blocks", n_layers_D=3, norm="instance", init_type="normal",
                     init_gain=0.02, direction="AtoB", epoch="latest", gpu_ids="", lr=2e-4, beta1=0.5,
                     gan_mode="lsgan", dataset_mode="unaligned").items():
        p.add_argument("--" + k, type=type(v), default=v)
    p.add_argument("--no_dropout", action="store_true")
    p.add_argument("--continue_train", action="store_true")
    opt, _ = p.parse_known_args(argv)
    p = models.find_model_using_name(opt.model).modify_commandline_options(p, is_train)
    opt = p.parse_args(argv)
    opt.isTrain, opt.gpu_ids = is_train, []
    return opt


def _run(repo, argv, is_train, batches):
    with isolated_imports(repo):
        models = importlib.import_module("models")
        opt = _parse(models, argv, is_train)
        model = models.find_model_using_name(opt.model)(opt)
        model.setup(opt)
        for b in batches:
            model.set_input(b)
            model.optimize_parameters() if is_train else model.test()
        return opt, model


def test_pix2pix_unet_train_save_test_roundtrip(tmp_path):
    repo = _host(tmp_path)
    teacher = create_model("unet_128", ngf=4, norm="batch").eval()
    ckpt = tmp_path / "teacher" / "latest_net_G.pth"
    ckpt.parent.mkdir()
    torch.save(teacher.state_dict(), ckpt)
    before = {k for k in sys.modules if k.split(".")[0] == "models"}
    A, B = torch.rand(2, 3, 128, 128) * 2 - 1, torch.rand(2, 3, 128, 128) * 2 - 1
    data = [{"A": A, "B": B, "A_paths": ["a"], "B_paths": ["b"]}] * 8
    argv = ["--teacher_checkpoint", str(ckpt), "--netG", "unet_128", "--ngf", "4", "--checkpoints_dir", str(tmp_path),
            "--target_macs", "0.4", "--slim_iters", "6", "--name", "slim"]
    opt, model = _run(repo, argv, True, data)
    assert opt.gan_mode == "vanilla" and opt.lambda_L1 == 100.0  # the teacher model's own defaults and flags
    losses = model.get_current_losses()
    assert {"G_GAN", "G_recon", "G_distill", "G_L1", "D_real", "D_fake", "macs"} <= set(losses)
    assert losses["macs"] <= 0.4 + 1e-6
    model.save_networks("latest")
    files = sorted(os.listdir(tmp_path / "slim"))
    assert files == ["latest_net_D.pth", "latest_net_G.safetensors", "latest_net_G_ganslim.pth"]
    slim = ganslim.load(tmp_path / "slim" / "latest_net_G.safetensors")
    assert measure.count_macs(slim, A[:1]) <= 0.41 * measure.count_macs(teacher, A[:1])
    # test.py --model ganslim: runs the compressed generator on a single-image dataset
    _, tmodel = _run(repo, ["--checkpoints_dir", str(tmp_path), "--name", "slim", "--netG", "unet_128"], False,
                     [{"A": A[:1], "A_paths": ["x.png"]}])
    with torch.no_grad():
        assert torch.equal(tmodel.fake_B, slim(A[:1]))
    assert tmodel.visual_names == ["real_A", "fake_B"]
    # --continue_train restores student, gates and discriminator
    opt2, model2 = _run(repo, argv + ["--continue_train"], True, data[:1])
    assert model2.sessions["G"].iteration == 9 and model2.sessions["G"].final
    assert {k for k in sys.modules if k.split(".")[0] == "models"} == before


def test_cyclegan_resnet_both_directions(tmp_path):
    repo = _host(tmp_path)
    d = tmp_path / "h2z"
    d.mkdir()
    for n in ("G_A", "G_B"):
        torch.save(create_model("resnet_6blocks", ngf=4, norm="instance").state_dict(), d / f"latest_net_{n}.pth")
    data = [{"A": torch.rand(1, 3, 32, 32) * 2 - 1, "B": torch.rand(1, 3, 32, 32) * 2 - 1, "A_paths": [""], "B_paths": [""]}] * 5
    argv = ["--teacher_model", "cycle_gan", "--teacher_checkpoint", str(d / "latest_net_G_A.pth"), "--netG", "resnet_6blocks",
            "--ngf", "4", "--checkpoints_dir", str(tmp_path), "--name", "cyc", "--target_macs", "0.5", "--slim_iters", "4"]
    _, model = _run(repo, argv, True, data)
    assert set(model.sessions) == {"G_A", "G_B"} and all(s.final for s in model.sessions.values())
    assert {"G_GAN_A", "G_GAN_B", "D_real_B"} <= set(model.get_current_losses())
    model.save_networks("latest")
    assert {"latest_net_G_A.safetensors", "latest_net_G_B.safetensors", "latest_net_D_A.pth"} <= set(os.listdir(tmp_path / "cyc"))
    _, tmodel = _run(repo, ["--teacher_model", "cycle_gan", "--checkpoints_dir", str(tmp_path), "--name", "cyc",
                            "--direction", "BtoA"], False, [{"A": data[0]["B"], "A_paths": ["x"]}])
    assert tmodel.gen_names == ["G_B"] and tmodel.fake_B.shape == (1, 3, 32, 32)


def test_bad_input_messages(tmp_path):
    repo = _host(tmp_path)
    ckpt = tmp_path / "latest_net_G.pth"
    torch.save(create_model("unet_128", ngf=4, norm="batch").state_dict(), ckpt)
    base = ["--checkpoints_dir", str(tmp_path), "--name", "e"]
    data = [{"A": torch.rand(1, 3, 32, 32), "B": torch.rand(1, 3, 32, 32), "A_paths": [""], "B_paths": [""]}]
    with pytest.raises(AdapterError, match=r"looks like --netG unet_128 --ngf 4 --norm batch: pass those flags"):
        _run(repo, base + ["--teacher_checkpoint", str(ckpt), "--netG", "resnet_9blocks", "--ngf", "4"], True, data)
    with pytest.raises(AdapterError, match="does not exist: pass --teacher_checkpoint"):
        _run(repo, base + ["--teacher_checkpoint", str(tmp_path / "missing.pth"), "--netG", "unet_128"], True, data)
    with pytest.raises(AdapterError, match="no teacher checkpoint given"):
        _run(repo, base + ["--netG", "unet_128"], True, data)
    with pytest.raises(AdapterError, match="not supported by the ganslim adapter; supported: resnet_9blocks"):
        _run(repo, base + ["--teacher_checkpoint", str(ckpt), "--netG", "stylegan"], True, data)
    with pytest.raises(AdapterError, match="train with --model ganslim --name e first"):
        _run(repo, base, False, [])
