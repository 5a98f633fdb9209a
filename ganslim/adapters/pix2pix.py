"""The ``--model ganslim`` plug-in of pytorch-CycleGAN-and-pix2pix, written against the host's classes.

``adapters/pix2pix/ganslim_model.py`` (copied into the repository's ``models/``) calls
:func:`make_model_class` with the repository's own ``BaseModel``, ``networks`` module and model
finder, so nothing here imports the official code and the logic runs in CI with stand-ins.

Training (``train.py --model ganslim --teacher_checkpoint PATH --target_macs 0.1``): the teacher is
built with the repository's ``define_G`` from the usual ``--netG/--ngf/--norm`` flags and loaded from
the checkpoint; the student starts as its copy; each iteration trains the repository's discriminator
(``define_D``, ``GANLoss``) and the gated student with GAN loss + L1 to the teacher's output + feature
distillation (+ pix2pix's L1 to the ground truth), then a :class:`~ganslim.adapters.SlimSession` step.
``--teacher_model cycle_gan`` compresses both generators (``G_A``, ``G_B``), each against its own teacher
with an unpaired discriminator. Saving writes, in ``checkpoints/<name>/``:

* ``<epoch>_net_G.safetensors`` (``G_A``/``G_B``): the compressed plain network (:func:`ganslim.load`);
* ``<epoch>_net_G_ganslim.pth``: student weights + gates + mappings, for ``--continue_train``;
* ``<epoch>_net_D.pth`` (``D_A``/``D_B``): the discriminator state dict, as the repository writes it.

Test (``test.py --model ganslim``) loads ``<epoch>_net_<G>.safetensors`` and writes ``fake_B`` images.
"""
from __future__ import annotations

import itertools
import os
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from .checkpoints import describe_flags, guess_pix2pix_flags, load_matching, read_state_dict
from .errors import AdapterError
from .session import SlimSession, student_from_teacher

TEACHER_MODELS = ("pix2pix", "cycle_gan")
SUPPORTED_NETG = ("resnet_9blocks", "resnet_6blocks", "unet_256", "unet_128")


def add_options(parser, is_train: bool, option_setter: Optional[Callable] = None):
    """``--teacher_model`` picks the recipe; the teacher model's own options and defaults are added
    (``--lambda_L1``, default ``--netG`` ...) so its checkpoints' flags keep their meaning."""
    parser.add_argument("--teacher_model", type=str, default="pix2pix", choices=TEACHER_MODELS,
                        help="the --model the teacher was trained with")
    opt, _ = parser.parse_known_args()
    if option_setter is not None:
        parser = option_setter(opt.teacher_model)(parser, is_train)
    parser.add_argument("--slim_which", type=str, default="",
                        help="test: which compressed generator to run (G, G_A or G_B; default from --direction)")
    if is_train:
        parser.add_argument("--teacher_checkpoint", type=str, default="",
                            help="teacher generator .pth (pix2pix), or its G_A/G_B file or checkpoint folder (cycle_gan)")
        parser.add_argument("--teacher_epoch", type=str, default="latest", help="epoch prefix when --teacher_checkpoint is a folder")
        parser.add_argument("--target_macs", type=float, default=0.1, help="student MACs as a fraction of the teacher's")
        parser.add_argument("--slim_iters", type=int, default=2000,
                            help="iterations of the gating phase; the channel masks are final after it, training goes on as fine-tuning")
        parser.add_argument("--lambda_recon", type=float, default=10.0, help="L1 between student and teacher outputs")
        parser.add_argument("--lambda_distill", type=float, default=1.0, help="intermediate feature distillation")
        parser.add_argument("--gate_lr", type=float, default=2e-3, help="learning rate of the channel gates")
        parser.add_argument("--rho", type=float, default=1.0, help="L1 strength on the gates")
        parser.add_argument("--channel_multiple", type=int, default=1, help="round kept widths up to a multiple")
    return parser


def generator_names(opt) -> list[str]:
    return ["G"] if opt.teacher_model == "pix2pix" else ["G_A", "G_B"]


def teacher_paths(opt) -> dict[str, str]:
    """``{"G": path}`` or ``{"G_A": ..., "G_B": ...}`` from ``--teacher_checkpoint``."""
    names = generator_names(opt)
    src = opt.teacher_checkpoint
    if not src:
        example = "checkpoints/<name>/latest_net_G.pth" if names == ["G"] else "checkpoints/<name>  (the folder with latest_net_G_A.pth)"
        raise AdapterError(f"no teacher checkpoint given: pass --teacher_checkpoint PATH (e.g. {example})")
    if os.path.isdir(src):
        return {n: os.path.join(src, f"{opt.teacher_epoch}_net_{n}.pth") for n in names}
    if names == ["G"]:
        return {"G": src}
    base = os.path.basename(src)
    if "G_A" in base:
        return {"G_A": src, "G_B": os.path.join(os.path.dirname(src), base.replace("G_A", "G_B"))}
    if "G_B" in base:
        return {"G_A": os.path.join(os.path.dirname(src), base.replace("G_B", "G_A")), "G_B": src}
    raise AdapterError(f"--teacher_model cycle_gan needs both generators: pass --teacher_checkpoint with the checkpoint "
                       f"folder or a file named like latest_net_G_A.pth (got {src})")


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.DataParallel) else net


def build_teacher(networks: Any, opt, name: str, path: str) -> nn.Module:
    """The repository's ``define_G`` from the flags, loaded from ``path`` with an error naming the right flags."""
    if opt.netG not in SUPPORTED_NETG:
        raise AdapterError(f"--netG {opt.netG} is not supported by the ganslim adapter; supported: {', '.join(SUPPORTED_NETG)}")
    in_nc, out_nc = (opt.input_nc, opt.output_nc) if name != "G_B" else (opt.output_nc, opt.input_nc)
    net = _unwrap(networks.define_G(in_nc, out_nc, opt.ngf, opt.netG, opt.norm, not opt.no_dropout, opt.init_type,
                                    opt.init_gain, []))
    sd = read_state_dict(path)
    flags = f"--netG {opt.netG} --ngf {opt.ngf} --norm {opt.norm}" + ("" if opt.no_dropout else " (dropout on)")
    load_matching(net, sd, path, flags, hint=describe_flags(guess_pix2pix_flags(sd)))
    return net.eval()


def make_model_class(BaseModel: type, networks: Any, find_model_using_name: Optional[Callable] = None) -> type:
    """``GanslimModel`` for the repository whose ``BaseModel`` / ``models.networks`` are given."""
    setter = None if find_model_using_name is None else (lambda m: find_model_using_name(m).modify_commandline_options)

    class GanslimModel(BaseModel):
        """GAN Slimming of a trained pix2pix / CycleGAN generator (ganslim)."""

        @staticmethod
        def modify_commandline_options(parser, is_train=True):
            return add_options(parser, is_train, setter)

        def __init__(self, opt):
            BaseModel.__init__(self, opt)
            if len(self.gpu_ids) > 1:
                print(f"ganslim: training on {self.device} only (gates and feature hooks do not support DataParallel)")
            self.gen_names = generator_names(opt) if opt.isTrain else [self._which(opt)]
            self.cycle = opt.teacher_model == "cycle_gan"
            self.visual_names = ["real_A", "fake_B"]
            self.sessions: dict[str, SlimSession] = {}
            self._pending: dict[str, dict] = {}
            if not opt.isTrain:
                self.model_names = list(self.gen_names)
                for n in self.gen_names:
                    setattr(self, "net" + n, nn.Identity())  # replaced by load_networks
                return
            paths = teacher_paths(opt)
            self.teachers = {n: build_teacher(networks, opt, n, paths[n]).to(self.device) for n in self.gen_names}
            for n in self.gen_names:
                setattr(self, "net" + n, student_from_teacher(self.teachers[n]).to(self.device).train())
            d_names = ["D"] if not self.cycle else ["D_A", "D_B"]
            for d in d_names:
                nc = opt.input_nc + opt.output_nc if d == "D" else (opt.output_nc if d == "D_A" else opt.input_nc)
                setattr(self, "net" + d, _unwrap(networks.define_D(nc, opt.ndf, opt.netD, opt.n_layers_D, opt.norm,
                                                                   opt.init_type, opt.init_gain, [])).to(self.device))
            self.model_names = self.gen_names + d_names
            self.d_names = d_names
            sfx = [""] if not self.cycle else ["_A", "_B"]
            self.loss_names = [f"{k}{s}" for s in sfx for k in ("G_GAN", "G_recon", "G_distill", "D_real", "D_fake")]
            if not self.cycle and getattr(opt, "lambda_L1", 0):
                self.loss_names.append("G_L1")
            self.loss_names.append("macs")
            self.visual_names = ["real_A", "fake_B", "teacher_B", "real_B"] + (["fake_A", "teacher_A"] if self.cycle else [])
            self.criterionGAN = networks.GANLoss(opt.gan_mode).to(self.device)
            self.optimizer_G = torch.optim.Adam(itertools.chain(*[getattr(self, "net" + n).parameters() for n in self.gen_names]),
                                                lr=opt.lr, betas=(opt.beta1, 0.999))
            self.optimizer_D = torch.optim.Adam(itertools.chain(*[getattr(self, "net" + d).parameters() for d in d_names]),
                                                lr=opt.lr, betas=(opt.beta1, 0.999))
            self.optimizers = [self.optimizer_G, self.optimizer_D]
            self.loss_macs = 1.0

        @staticmethod
        def _which(opt) -> str:
            if opt.slim_which:
                return opt.slim_which
            if getattr(opt, "teacher_model", "pix2pix") == "pix2pix":
                return "G"
            return "G_A" if opt.direction == "AtoB" else "G_B"

        # ------------------------------------------------------------- data
        def set_input(self, input):
            AtoB = self.opt.direction == "AtoB"
            if "B" in input:
                self.real_A = input["A" if AtoB else "B"].to(self.device)
                self.real_B = input["B" if AtoB else "A"].to(self.device)
                self.image_paths = input["A_paths" if AtoB else "B_paths"]
            else:  # single-image dataset (test)
                self.real_A, self.real_B = input["A"].to(self.device), None
                self.image_paths = input.get("A_paths", [])
            if not self.isTrain:
                self.visual_names = ["real_A", "fake_B"] + (["real_B"] if self.real_B is not None else [])

        def forward(self):
            if not self.isTrain:
                self.fake_B = getattr(self, "net" + self.gen_names[0])(self.real_A)
                return
            if self.cycle:
                self.fake_B = self.netG_A(self.real_A)
                self.fake_A = self.netG_B(self.real_B)
            else:
                self.fake_B = self.netG(self.real_A)

        # ------------------------------------------------------------- training
        def _ensure_sessions(self):
            if self.sessions:
                return
            o = self.opt
            for n in self.gen_names:
                x = self.real_A if n in ("G", "G_A") else self.real_B
                s = SlimSession(getattr(self, "net" + n), self.teachers[n], x, target_macs=o.target_macs, steps=o.slim_iters,
                                recon_weight=o.lambda_recon, distill_weight=o.lambda_distill, gate_lr=o.gate_lr,
                                rho=o.rho, channel_multiple=o.channel_multiple)
                if n in self._pending:
                    s.load_state_dict(self._pending.pop(n))
                self.sessions[n] = s
                print(f"ganslim: {n}: {len(s.targets.groups)} prunable channel groups, target {o.target_macs:g} of "
                      f"{s.teacher_macs / 1e9:.3f} G MACs at {tuple(x.shape[1:])}, gating for {o.slim_iters} iterations")

        def _d_step(self, netD, real, fake, sfx):
            pred_fake = netD(fake.detach())
            setattr(self, "loss_D_fake" + sfx, self.criterionGAN(pred_fake, False))
            setattr(self, "loss_D_real" + sfx, self.criterionGAN(netD(real), True))
            return (getattr(self, "loss_D_fake" + sfx) + getattr(self, "loss_D_real" + sfx)) * 0.5

        def optimize_parameters(self):
            if self.cycle and self.real_B is None:
                raise AdapterError("--teacher_model cycle_gan trains on both domains: use --dataset_mode unaligned")
            self._ensure_sessions()
            self.forward()
            # teacher outputs (also records the teachers' features for distillation)
            if self.cycle:
                self.teacher_B = self.sessions["G_A"].teacher_output(self.real_A)
                self.teacher_A = self.sessions["G_B"].teacher_output(self.real_B)
                pairs = [("G_A", self.netD_A, self.real_B, self.fake_B, self.teacher_B, "_A"),
                         ("G_B", self.netD_B, self.real_A, self.fake_A, self.teacher_A, "_B")]
            else:
                self.teacher_B = self.sessions["G"].teacher_output(self.real_A)
                real = self.real_B if self.real_B is not None else self.teacher_B

                def cond(img):
                    return torch.cat((self.real_A, img), 1)

                pairs = [("G", self.netD, cond(real), cond(self.fake_B), self.teacher_B, "")]
            # discriminators (the repository's define_D + GANLoss)
            self.set_requires_grad([getattr(self, "net" + d) for d in self.d_names], True)
            self.optimizer_D.zero_grad()
            loss_D = sum(self._d_step(netD, real, fake, sfx) for _, netD, real, fake, _, sfx in pairs)
            loss_D.backward()
            self.optimizer_D.step()
            # generators: GAN + distillation (+ pix2pix's L1 to the ground truth)
            self.set_requires_grad([getattr(self, "net" + d) for d in self.d_names], False)
            self.optimizer_G.zero_grad()
            total = 0.0
            for n, netD, _, fake, t_out, sfx in pairs:
                setattr(self, "loss_G_GAN" + sfx, self.criterionGAN(netD(fake), True))
                out_img = self.fake_B if n in ("G", "G_A") else self.fake_A
                d = self.sessions[n].losses(out_img, teacher_output=t_out)
                setattr(self, "loss_G_recon" + sfx, d.get("recon", 0.0))
                setattr(self, "loss_G_distill" + sfx, d.get("distill", 0.0))
                total = total + getattr(self, "loss_G_GAN" + sfx) + sum(d.values())
            if "G_L1" in self.loss_names:
                self.loss_G_L1 = nn.functional.l1_loss(self.fake_B, self.real_B) * self.opt.lambda_L1 \
                    if self.real_B is not None else 0.0
                total = total + self.loss_G_L1
            total.backward()
            self.optimizer_G.step()
            for s in self.sessions.values():
                s.step()
            self.loss_macs = max(s.macs_fraction for s in self.sessions.values())

        # ------------------------------------------------------------- checkpoints
        def save_networks(self, epoch):
            os.makedirs(self.save_dir, exist_ok=True)
            if not self.isTrain:
                return
            for n in self.gen_names:
                s = self.sessions.get(n)
                if s is None:
                    continue
                s.save(os.path.join(self.save_dir, f"{epoch}_net_{n}.safetensors"), finalize=False,
                       metadata={"netG": self.opt.netG, "ngf": self.opt.ngf, "norm": self.opt.norm, "generator": n})
                torch.save({"student": getattr(self, "net" + n).state_dict(), "session": s.state_dict()},
                           os.path.join(self.save_dir, f"{epoch}_net_{n}_ganslim.pth"))
            for d in self.d_names:
                torch.save(getattr(self, "net" + d).state_dict(), os.path.join(self.save_dir, f"{epoch}_net_{d}.pth"))
            for n in self.gen_names:  # save() moved nothing: make sure the nets stay where training runs
                getattr(self, "net" + n).to(self.device)

        def load_networks(self, epoch):
            from ..deployment.checkpoint import load

            if not self.isTrain:
                for n in self.gen_names:
                    p = os.path.join(self.save_dir, f"{epoch}_net_{n}.safetensors")
                    if not os.path.isfile(p):
                        raise AdapterError(f"{p} does not exist: train with --model ganslim --name {self.opt.name} first, "
                                           "or pass the --epoch / --slim_which that was saved")
                    setattr(self, "net" + n, load(p).to(self.device).eval())
                return
            for n in self.gen_names:
                p = os.path.join(self.save_dir, f"{epoch}_net_{n}_ganslim.pth")
                if not os.path.isfile(p):
                    raise AdapterError(f"--continue_train: {p} does not exist; pass the --epoch that was saved")
                state = torch.load(p, map_location=str(self.device), weights_only=False)
                getattr(self, "net" + n).load_state_dict(state["student"])
                self._pending[n] = state["session"]
            for d in self.d_names:
                p = os.path.join(self.save_dir, f"{epoch}_net_{d}.pth")
                getattr(self, "net" + d).load_state_dict(torch.load(p, map_location=str(self.device), weights_only=True))

    return GanslimModel
