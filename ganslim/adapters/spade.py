"""SPADE / GauGAN (NVlabs/SPADE, CC BY-NC-SA: used only as a host, never imported by ganslim itself).

:func:`make_trainer_class` subclasses the repository's ``Pix2PixTrainer`` (given as an argument):
the model it builds from the user's flags (``--netG spade --ngf ... --label_nc ...``) gets its
generator loaded from ``--teacher_checkpoint`` as the frozen teacher; the student is a copy with
spectral norm removed (channel surgery needs plain convs) trained by the repository's own losses
(GAN hinge, feature matching, VGG) plus L1 to the teacher's output and feature distillation,
with a :class:`~ganslim.adapters.SlimSession` step after each generator step. Both the main path
(``fc``, ``conv_0/1/s``) and the SPADE modulation convs (``mlp_shared``, hence ``mlp_gamma/beta`` inputs)
are gated. ``save(epoch)`` writes the repository's ``<epoch>_net_G.pth``/``_net_D.pth`` (full-width
student weights, for ``--continue_train``) plus ``<epoch>_net_G.safetensors`` (the compressed network)
and ``<epoch>_net_G_ganslim.pth`` (gates and mappings). ``adapters/spade/train_ganslim.py`` runs the
repository's unmodified ``train.py`` with this trainer.
"""
from __future__ import annotations

import copy
import os
from typing import Any

import torch
import torch.nn as nn

from .checkpoints import has_spectral_norm_keys, load_matching, read_state_dict, strip_spectral_norm
from .errors import AdapterError
from .session import SlimSession

SPADE_FLAGS = ("netG", "ngf", "label_nc", "num_upsampling_layers", "norm_G", "crop_size", "aspect_ratio")


def flags_of(opt: Any) -> str:
    parts = [f"--{k} {getattr(opt, k)}" for k in SPADE_FLAGS if hasattr(opt, k)]
    for k in ("no_instance", "contain_dontcare_label", "use_vae"):
        if getattr(opt, k, False):
            parts.append(f"--{k}")
    return " ".join(parts)


def load_teacher(netG: nn.Module, path: str, opt: Any) -> nn.Module:
    """``netG`` (the generator the repository built from the flags) loaded from ``path``, spectral norm
    stripped, frozen. A checkpoint that does not fit names the flags to check."""
    sd = read_state_dict(path, example=f"checkpoints/{getattr(opt, 'name', '<name>')}/latest_net_G.pth")
    net_has_sn = any(k.endswith("weight_orig") for k in netG.state_dict())
    if has_spectral_norm_keys(sd) != net_has_sn:
        raise AdapterError(f"{path} was saved {'with' if has_spectral_norm_keys(sd) else 'without'} spectral norm but "
                           f"--norm_G {getattr(opt, 'norm_G', '?')} builds the generator "
                           f"{'with' if net_has_sn else 'without'}: pass the --norm_G the teacher was trained with")
    hint = None
    if "fc.weight" in sd and sd["fc.weight"].dim() == 4:
        hint = f"--ngf {sd['fc.weight'].shape[0] // 16} with {sd['fc.weight'].shape[1]} input channels " \
               "(label_nc + 1 unless --no_instance, + 1 with --contain_dontcare_label)"
    load_matching(netG, sd, path, flags_of(opt), hint=hint)
    strip_spectral_norm(netG)
    netG.eval()
    for p in netG.parameters():
        p.requires_grad_(False)
    return netG


def add_arguments(parser) -> None:
    parser.add_argument("--teacher_checkpoint", default="", help="the trained SPADE generator, e.g. checkpoints/<name>/latest_net_G.pth")
    parser.add_argument("--target_macs", type=float, default=0.1)
    parser.add_argument("--slim_iters", type=int, default=5000, help="iterations of the gating phase")
    parser.add_argument("--lambda_recon", type=float, default=10.0)
    parser.add_argument("--lambda_distill", type=float, default=1.0)
    parser.add_argument("--gate_lr", type=float, default=2e-3)
    parser.add_argument("--rho", type=float, default=1.0)


def make_trainer_class(Pix2PixTrainer: type, slim_opt: Any) -> type:
    """A ``Pix2PixTrainer`` subclass that compresses the generator; ``slim_opt`` holds the ganslim flags
    (:func:`add_arguments`) parsed apart from the repository's own options."""

    class GanslimTrainer(Pix2PixTrainer):
        def __init__(self, opt):
            if getattr(opt, "use_vae", False):
                raise AdapterError("--use_vae is not supported by the ganslim SPADE adapter (the style encoder makes the "
                                   "generator input random); compress a generator trained without --use_vae")
            if len(getattr(opt, "gpu_ids", []) or []) > 1:
                raise AdapterError("the ganslim SPADE adapter trains on one GPU: pass --gpu_ids 0")
            resume = bool(getattr(opt, "continue_train", False))
            run_dir = os.path.join(opt.checkpoints_dir, opt.name)
            if resume:
                state_path = os.path.join(run_dir, f"{opt.which_epoch}_net_G_ganslim.pth")
                if not os.path.isfile(state_path):
                    raise AdapterError(f"--continue_train: {state_path} does not exist; pass the --which_epoch that was saved")
                # The repository would load <epoch>_net_G.pth (the student: spectral norm removed) into a
                # generator built with spectral norm and fail; build fresh networks instead and restore
                # student, gates and discriminator below.
                opt.continue_train = False
            try:
                super().__init__(opt)
            finally:
                opt.continue_train = resume
            model = self.pix2pix_model_on_one_gpu
            teacher = load_teacher(copy.deepcopy(model.netG), slim_opt.teacher_checkpoint, opt)
            student = copy.deepcopy(teacher)
            for p in student.parameters():
                p.requires_grad_(True)
            model.netG = student.train()
            self.teacher = teacher
            self.session = None
            self._pending = None
            if resume:
                state = torch.load(state_path, map_location="cpu", weights_only=False)
                student.load_state_dict(state["student"])
                self._pending = state["session"]
                d_path = os.path.join(run_dir, f"{opt.which_epoch}_net_D.pth")
                if getattr(model, "netD", None) is not None and os.path.isfile(d_path):
                    model.netD.load_state_dict(torch.load(d_path, map_location="cpu", weights_only=True))
            if opt.isTrain:
                self.optimizer_G, self.optimizer_D = model.create_optimizers(opt)

        def _ensure_session(self, semantics):
            if self.session is None:
                s = self.slim = SlimSession(self.pix2pix_model_on_one_gpu.netG, self.teacher, semantics,
                                            target_macs=slim_opt.target_macs, steps=slim_opt.slim_iters,
                                            recon_weight=slim_opt.lambda_recon, distill_weight=slim_opt.lambda_distill,
                                            gate_lr=slim_opt.gate_lr, rho=slim_opt.rho)
                if self._pending is not None:
                    s.load_state_dict(self._pending)
                self.session = s
                print(f"ganslim: {len(s.targets.groups)} prunable channel groups (main path and SPADE modulation), "
                      f"target {slim_opt.target_macs:g} of {s.teacher_macs / 1e9:.2f} G MACs")

        def run_generator_one_step(self, data):
            semantics, _ = self.pix2pix_model_on_one_gpu.preprocess_input(data)
            self._ensure_session(semantics)
            self.optimizer_G.zero_grad()
            g_losses, generated = self.pix2pix_model(data, mode="generator")
            for k, v in self.session.losses(generated, semantics).items():
                g_losses["GS_" + k] = v
            g_loss = sum(g_losses.values()).mean()
            g_loss.backward()
            self.optimizer_G.step()
            self.session.step()
            g_losses["GS_macs"] = torch.tensor(self.session.macs_fraction)
            self.g_losses = g_losses
            self.generated = generated

        def save(self, epoch):
            super().save(epoch)
            if self.session is None:
                return
            d = os.path.join(self.opt.checkpoints_dir, self.opt.name)
            net = self.pix2pix_model_on_one_gpu.netG
            self.session.save(os.path.join(d, f"{epoch}_net_G.safetensors"), finalize=False,
                              metadata={"spade_flags": flags_of(self.opt)})
            torch.save({"student": net.state_dict(), "session": self.session.state_dict()},
                       os.path.join(d, f"{epoch}_net_G_ganslim.pth"))

    return GanslimTrainer
