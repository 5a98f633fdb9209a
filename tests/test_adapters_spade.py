"""adapters/spade: the Pix2PixTrainer subclass with a stand-in of SPADE's trainer/model (the generator
is ganslim's zoo SPADEGenerator with the official keys, spectral norm on). The real checkout runs in
tests/test_official_spade.py (it needs torchvision: .venv-official)."""
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn

import ganslim
from ganslim import measure
from ganslim.adapters import AdapterError
from ganslim.adapters.spade import make_trainer_class
from ganslim.zoo import create_model

from equivalence import assert_same_function

GEN = dict(label_nc=3, ngf=2, crop_size=32, no_instance=True)


class StandInModel(nn.Module):
    """The shape of SPADE's Pix2PixModel that the trainer relies on."""

    def __init__(self, opt):
        super().__init__()
        self.opt = opt
        self.netG = create_model("spade", **GEN)
        self.netD = nn.Sequential(nn.Conv2d(3, 4, 4, 2, 1), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3, 1, 1))

    def preprocess_input(self, data):
        return nn.functional.one_hot(data["label"][:, 0].long(), 3).permute(0, 3, 1, 2).float(), data["image"]

    def forward(self, data, mode):
        sem, real = self.preprocess_input(data)
        if mode == "generator":
            fake = self.netG(sem)
            return {"GAN": ((self.netD(fake) - 1) ** 2).mean(), "L1": (fake - real).abs().mean()}, fake
        with torch.no_grad():
            fake = self.netG(sem)
        return {"D_fake": (self.netD(fake) ** 2).mean(), "D_real": ((self.netD(real) - 1) ** 2).mean()}

    def create_optimizers(self, opt):
        return torch.optim.Adam(self.netG.parameters(), 1e-3), torch.optim.Adam(self.netD.parameters(), 1e-3)

    def save(self, epoch):
        torch.save(self.netG.state_dict(), os.path.join(self.opt.checkpoints_dir, self.opt.name, f"{epoch}_net_G.pth"))


class StandInTrainer:
    def __init__(self, opt):
        self.opt = opt
        self.pix2pix_model = self.pix2pix_model_on_one_gpu = StandInModel(opt)
        self.optimizer_G, self.optimizer_D = self.pix2pix_model.create_optimizers(opt)

    def run_discriminator_one_step(self, data):
        self.optimizer_D.zero_grad()
        d = self.pix2pix_model(data, mode="discriminator")
        sum(d.values()).backward()
        self.optimizer_D.step()

    def save(self, epoch):
        self.pix2pix_model_on_one_gpu.save(epoch)


def _opts(tmp_path, ckpt, **kw):
    opt = SimpleNamespace(checkpoints_dir=str(tmp_path), name="slim", gpu_ids=[], isTrain=True, use_vae=False,
                          continue_train=False, which_epoch="latest", netG="spade", ngf=2, label_nc=3,
                          norm_G="spectralspadesyncbatch3x3", num_upsampling_layers="normal", crop_size=32, aspect_ratio=1.0)
    slim = SimpleNamespace(teacher_checkpoint=str(ckpt), target_macs=0.3, slim_iters=6, lambda_recon=10.0,
                           lambda_distill=1.0, gate_lr=2e-3, rho=1.0)
    for k, v in kw.items():
        setattr(slim if hasattr(slim, k) else opt, k, v)
    (tmp_path / "slim").mkdir(exist_ok=True)
    return opt, slim


def _data():
    return {"label": torch.randint(0, 3, (2, 1, 32, 32)).float(), "image": torch.rand(2, 3, 32, 32) * 2 - 1}


def test_spade_trainer_compresses_main_path_and_modulation(tmp_path):
    teacher = create_model("spade", **GEN)
    ckpt = tmp_path / "latest_net_G.pth"
    torch.save(teacher.state_dict(), ckpt)  # weight_orig/_u/_v keys, as SPADE saves them
    opt, slim = _opts(tmp_path, ckpt)
    trainer = make_trainer_class(StandInTrainer, slim)(opt)
    data = _data()
    for _ in range(7):
        trainer.run_generator_one_step(data)
        trainer.run_discriminator_one_step(data)
    assert {"GAN", "GS_recon", "GS_distill", "GS_macs"} <= set(trainer.g_losses)
    roots = {g.root for g in trainer.session.targets.groups}
    assert any("mlp_shared" in r for r in roots) and "fc" in roots and any(r.endswith("conv_0") for r in roots)
    trainer.save("latest")
    assert {"latest_net_G.pth", "latest_net_G.safetensors", "latest_net_G_ganslim.pth"} <= set(os.listdir(tmp_path / "slim"))
    slim_net = ganslim.load(tmp_path / "slim" / "latest_net_G.safetensors")
    sem, _ = trainer.pix2pix_model.preprocess_input(data)
    assert measure.count_macs(slim_net, sem[:1]) <= 0.31 * measure.count_macs(trainer.teacher, sem[:1])
    student = trainer.pix2pix_model.netG.eval()
    assert_same_function(slim_net, student, sem[:1], tol=1e-4, b_with=(trainer.session.gates,))


def test_spade_bad_input(tmp_path):
    ckpt = tmp_path / "latest_net_G.pth"
    torch.save(create_model("spade", **dict(GEN, ngf=4)).state_dict(), ckpt)
    opt, slim = _opts(tmp_path, ckpt)
    with pytest.raises(AdapterError, match=r"--ngf 2 .*The checkpoint looks like --ngf 4"):
        make_trainer_class(StandInTrainer, slim)(opt)
    no_sn = create_model("spade", **dict(GEN, norm_G="spadesyncbatch3x3"))
    torch.save(no_sn.state_dict(), ckpt)
    with pytest.raises(AdapterError, match="pass the --norm_G the teacher was trained with"):
        make_trainer_class(StandInTrainer, slim)(opt)
    opt, slim = _opts(tmp_path, tmp_path / "missing.pth")
    with pytest.raises(AdapterError, match="does not exist: pass --teacher_checkpoint"):
        make_trainer_class(StandInTrainer, slim)(opt)
    opt, slim = _opts(tmp_path, ckpt, use_vae=True)
    with pytest.raises(AdapterError, match="--use_vae is not supported"):
        make_trainer_class(StandInTrainer, slim)(opt)
