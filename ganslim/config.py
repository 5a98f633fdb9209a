"""Typed configuration for :func:`ganslim.compress` (the CLI builds the same dataclass)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Callable, Mapping, Optional, Sequence


def strategy_names() -> tuple[str, ...]:
    """The registered strategies and "auto" (:mod:`ganslim.strategies`)."""
    from .strategies import strategy_names as names

    return names()


def __getattr__(name: str):  # ``STRATEGIES``: read from the registry, so a plug-in strategy is included
    if name == "STRATEGIES":
        return strategy_names()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass
class CompressConfig:
    """All knobs of one compression run; every field has a working default.

    Units: ``target_macs`` is a fraction of the teacher's MACs (0.1 = 10x fewer) or, when > 1, an
    absolute MACs count; learning rates per optimizer step; steps count optimizer steps.
    """

    # --- budget
    target_macs: Optional[float] = 0.1
    # Device-aware budget (ms per forward of the report's evaluation input on ``device``): when set it
    # replaces target_macs; the MACs target is found by measuring slimmed copies (ganslim.device_aware).
    target_latency_ms: Optional[float] = None
    # "slim": gates + L1 proximal step + removal (GAN Slimming); "onestep": one global threshold on the
    # norm scales meeting the MACs target, no training before the fine-tune (CAT); "ofa": once-for-all
    # supernet (sandwich rule) + evolutionary search at the budget (GAN Compression, generalised);
    # "evolve": genetic search over channel masks, discriminator-aware (Co-Evolutionary Compression);
    # "auto": the strategy that won the measured head-to-head (benchmarks/bench_strategies.py) nearest this target
    strategy: str = "slim"
    # --- schedule
    # The defaults are the recipe tuned on the default task (`make demo` runs exactly them): 800 gated +
    # 12000 fine-tune steps, 11-23 minutes (by CPU) for the ResNet-9 ngf 32 at batch 8 of 64x64 crops on 2
    # CPU cores. Cost is linear in steps x batch x crop pixels x the generator's MACs; for a shorter budget
    # cut finetune_steps first (3000 cost about 0.5 dB at 1/10 on the default task, bench_strategies.py).
    steps: int = 800  # sparsify phase, gates attached (ofa: supernet steps)
    finetune_steps: int = 12000  # after physical removal, plain smaller student
    lr: float = 1e-4  # student weights and mapping layers while gated
    finetune_lr: float = 2e-3  # after removal (cosine decay); 2e-3 beat 1e-3 and 2e-4 on the default task
    gate_lr: float = 2e-3
    rho: float = 1.0  # L1 strength, in units of a group's mean gate per unit gate_lr
    channel_multiple: int = 1  # round kept widths up to a multiple (8 helps CPU/GPU kernels)
    prune_start: float = 0.1  # fraction of ``steps`` before the first channel is switched off (gates separate)
    prune_every: int = 10  # steps between progressive pruning decisions
    target_reach: float = 0.6  # fraction of ``steps`` by which the MACs schedule reaches the target
    # --- once-for-all (strategy="ofa"): ``steps`` are supernet steps, each over the largest, the
    # smallest and ``random_subnets`` random sub-networks
    width_ratios: Sequence[float] = (0.125, 0.1875, 0.25, 0.3125, 0.375, 0.5, 0.625, 0.75, 1.0)
    supernet_lr: float = 1e-3
    random_subnets: int = 2
    search_population: int = 24
    search_generations: int = 8
    search_bn_batches: int = 4  # batches that re-estimate BatchNorm statistics of each sliced candidate
    search_metric: Any = "psnr_gt"  # "psnr_gt" | "psnr_teacher" | "ssim_gt" | callable(model) -> float
    supernet_checkpoint: Optional[str] = None  # resumable supernet training state (written every 200 steps)
    # --- evolve (strategy="evolve"): fitness on ``evolve_batches`` held batches; with ``discriminator=``
    # given to compress, the discriminator's judgement of the pruned output vs the teacher's counts too,
    # and with ``reverse_generator`` (the other CycleGAN direction) cycle consistency
    evolve_population: int = 16
    evolve_generations: int = 10
    evolve_batches: int = 2
    reverse_generator: Optional[Any] = None
    # --- losses
    # Measured on the default task (3000 fine-tune steps at 10x): L1 to teacher and ground truth at 10/10
    # gave 28.06 dB, ground truth alone 28.33, 2/10 + MSE 28.68: the teacher's own errors should not
    # outweigh the ground truth when there is one; without one these terms all fall on the teacher.
    recon_weight: float = 2.0  # L1(student(x), teacher(x)): pseudo pairs, works unpaired
    gt_weight: float = 10.0  # L1(student(x), ground truth) when the batch has one
    mse_weight: float = 50.0  # MSE to ground truth (teacher without one); +0.2 dB PSNR at 10x on the default task
    distill_weight: float = 1.0  # feature distillation weight
    distill_loss: str = "mse"  # "mse": variance-normalised MSE through 1x1 mappings; "gka": CAT's kernel alignment
    distill_layers: Optional[Mapping[str, str] | Sequence[str]] = None  # None: auto
    n_distill_layers: int = 4
    # Feature distillation in the fine-tune too. Off: on the default task it changed PSNR by < 0.01 dB
    # at 10x, and without it batches that carry "teacher_output" skip the teacher's forward entirely.
    finetune_distill: bool = False
    adv_weight: float = 0.0  # used only when a discriminator is given (default 1.0 then)
    gan_mode: str = "lsgan"
    d_lr: float = 2e-4  # the discriminator's Adam rate (betas 0.5, 0.999), in every stage: GAN practice
    # --- quantization (QAT stage after fine-tune; ganslim.quantization / ganslim.export)
    quant: Optional[str] = None  # "int8": QAT with 8-bit weights (per channel) and activations
    quant_steps: int = 300
    quant_lr: float = 1e-4
    quant_calib_batches: int = 8
    quant_skip_first: bool = True  # keep the first / last weighted layer in float
    quant_skip_last: bool = True
    deploy_check: bool = True  # with quant: export fp32 + int8 ONNX and measure both in onnxruntime
    # --- targeting
    include: Optional[Sequence[Any]] = None
    exclude: Sequence[Any] = ()
    # --- data
    batch_fn: Optional[Callable] = None  # batch -> (inputs tuple, target or None)
    # --- run
    # Resumable runs: training state written atomically every ``checkpoint_every`` steps to
    # checkpoint_dir (gating.pt / supernet.pt, stage.pt after the first stage, finetune.pt); a run with
    # the same directory and configuration continues where the last one stopped.
    checkpoint_dir: Optional[str] = None
    checkpoint_every: int = 200
    device: str = "cpu"
    seed: int = 0
    log_every: int = 10
    progress: bool = True
    eval_inputs: Optional[Any] = None  # (inputs, target) pairs for the fidelity report; default: from loader
    measure_latency: bool = True
    export_tol: float = 1e-4  # export check: max |pruned - gated| / max |gated|, both run in float64

    def replace(self, **overrides) -> "CompressConfig":
        names = {f.name for f in fields(self)}
        bad = sorted(set(overrides) - names)
        if bad:
            raise TypeError(f"unknown compress option(s): {', '.join(bad)}; known: {', '.join(sorted(names))}")
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d.update(overrides)
        return CompressConfig(**d)

    def validate(self) -> "CompressConfig":
        if self.target_macs is not None and not self.target_macs > 0:
            raise ValueError(f"target_macs must be > 0 (a fraction of the teacher's MACs or an absolute count), got {self.target_macs}")
        if self.steps < 0 or self.finetune_steps < 0:
            raise ValueError("steps and finetune_steps must be >= 0")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 step, got {self.checkpoint_every}")
        if self.strategy not in strategy_names():
            raise ValueError(f"unknown strategy {self.strategy!r}; available: {', '.join(map(repr, strategy_names()))}")
        if self.target_latency_ms is not None and not self.target_latency_ms > 0:
            raise ValueError(f"target_latency_ms must be > 0 ms, got {self.target_latency_ms}")
        if self.distill_loss not in ("mse", "gka"):
            raise ValueError(f"distill_loss must be 'mse' or 'gka', got {self.distill_loss!r}")
        if self.quant not in (None, "int8"):
            raise ValueError(f"quant must be None or 'int8', got {self.quant!r}")
        if not self.d_lr > 0:
            raise ValueError(f"d_lr (the discriminator's learning rate) must be > 0, got {self.d_lr}")
        if self.search_bn_batches < 1:
            raise ValueError(f"search_bn_batches must be >= 1, got {self.search_bn_batches}")
        if self.gan_mode not in ("lsgan", "vanilla", "hinge"):
            raise ValueError(f"gan_mode must be lsgan, vanilla or hinge, got {self.gan_mode!r}")
        return self

    @classmethod
    def from_file(cls, path: str) -> "CompressConfig":
        """Read options from a JSON file ``{"target_macs": 0.1, "steps": 800, ...}`` (field names of this
        class); unknown names, wrong types and malformed JSON are errors that name the file and the fix."""
        import json

        try:
            with open(path) as f:
                raw = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"config file {path} not found") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"config file {path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
        if not isinstance(raw, dict):
            raise ValueError(f"config file {path}: expected a JSON object of option names, got {type(raw).__name__}")
        defaults = cls()
        for k, v in raw.items():
            if not hasattr(defaults, k) or k in ("batch_fn", "eval_inputs", "reverse_generator"):
                raise ValueError(f"config file {path}: unknown option {k!r}; known: "
                                 f"{', '.join(f.name for f in fields(cls) if f.name not in ('batch_fn', 'eval_inputs', 'reverse_generator'))}")
            d = getattr(defaults, k)
            ok = (v is None or d is None or (isinstance(d, bool) and isinstance(v, bool))
                  or (isinstance(d, (int, float)) and not isinstance(d, bool) and isinstance(v, (int, float))
                      and not isinstance(v, bool))
                  or (isinstance(d, str) and isinstance(v, str)) or (isinstance(d, (list, tuple)) and isinstance(v, list)))
            if not ok:
                raise ValueError(f"config file {path}: option {k!r} must be {type(d).__name__}, got {json.dumps(v)}")
        try:
            return cls().replace(**raw).validate()
        except (TypeError, ValueError) as e:
            raise ValueError(f"config file {path}: {e}") from None

    def to_dict(self) -> dict:
        d = asdict(self) if self.batch_fn is None and self.eval_inputs is None and self.reverse_generator is None else {
            f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("batch_fn", "eval_inputs", "reverse_generator")}
        return {k: (v if isinstance(v, (int, float, str, bool, type(None), list, dict, tuple)) else repr(v)) for k, v in d.items()}
