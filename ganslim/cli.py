"""Command line: a thin layer over the Python API.

    ganslim demo                       # compress the embedded default teacher, print the table
    ganslim compress --teacher T.safetensors [--images DIR] --target-macs 0.1 --out runs/x
    ganslim bench default A.safetensors B.onnx --runtimes eager,onnxruntime-int8 --plot p.png --grid g.png
    ganslim compress --strategy ofa --target-macs 0.1 --out runs/ofa    # also writes runs/ofa/supernet.safetensors
    ganslim search runs/ofa/supernet.safetensors --target-macs 0.2 0.1 0.05 --out runs/search
    ganslim export CKPT.safetensors --format onnx-int8 --out student.int8.onnx
    ganslim profile student.int8.onnx                                    # time per operator: int8 / float / Q-DQ
    ganslim info CKPT.safetensors
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from .measure.report import write_json


def _load_model(path: str | None, factory: str | None = None, weights: str | None = None):
    from .measure.benchmarking import _factory, load_state_file, resolve_model
    from .deployment.checkpoint import load

    if factory:
        model = _factory(factory)()
        if weights:
            if weights.endswith(".safetensors"):
                load(weights, model=model)
            else:
                load_state_file(model, weights)
        return model.eval()
    return resolve_model(path)


def _cmd_demo(args) -> int:
    from .demo import run_demo

    overrides = {k: v for k, v in dict(steps=args.steps, finetune_steps=args.finetune_steps,
                                       target_macs=args.target_macs).items() if v is not None}
    run_demo(out_dir=args.out, **overrides)
    return 0


# seconds of a --time-budget-min kept for writing the student and the report after compress (the 40x
# student's run: 0.6 s from compress's end to the command's)
_SAVE_RESERVE_S = 2.0


def _cmd_compress(args) -> int:
    from . import data
    from .deployment.checkpoint import save
    from .compression import compress
    from .config import CompressConfig, option_names

    # config flags are SUPPRESSed when absent: only the ones given are attributes of args (by flat name)
    given = {name: getattr(args, name) for name in option_names() if hasattr(args, name)}
    if args.strategy_option:  # a plug-in strategy's own options: --strategy-option NAME=VALUE (JSON value or text)
        given["strategy_options"] = dict(_parse_option(o) for o in args.strategy_option)
    # the file's options, then the flags given on the command line; every other field: CompressConfig's default
    cfg = (CompressConfig.from_file(args.config) if args.config else CompressConfig()).replace(**given)
    cfg = cfg.validate()
    teacher = _load_model(args.teacher, args.factory, args.weights)
    steps = cfg.steps + cfg.finetune_steps
    if args.images:
        ds = data.ImageFolder(args.images, crop=args.crop, length=max(1, steps) * args.batch_size, seed=cfg.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, drop_last=True)
        eval_inputs = None
    else:
        # the crops carry the teacher's outputs (it runs once per whole photo), so the steps skip its
        # forward, as in the demo: 3000 fine-tune steps at 1/20 took 10.7 min with it, ~4 without
        loader = data.default_loader(batch_size=args.batch_size, crop=args.crop, length=max(1, steps) * args.batch_size,
                                     seed=cfg.seed, teacher=teacher)
        eval_inputs = [tuple(p) for p in data.test_pairs()]
    cfg = cfg.replace(progress=not args.no_progress, eval_inputs=eval_inputs).validate()
    if cfg.time_budget_min is not None:  # the budget is the command's: start-up and the data count too
        from .core.budget import process_age_s

        spent = process_age_s() / 60
        left = cfg.time_budget_min - spent - _SAVE_RESERVE_S / 60
        if left <= 0:
            raise ValueError(f"--time-budget-min {cfg.time_budget_min:g}: {spent:.2f} min went to start-up, the "
                             "teacher and the data already")
        print(f"time budget: {spent * 60:.0f} s of {cfg.time_budget_min:g} min went to start-up, the teacher and "
              f"the data, {_SAVE_RESERVE_S:g} s are kept for saving; compress gets the rest", flush=True)
        cfg = cfg.replace(time_budget_min=left)
    os.makedirs(args.out, exist_ok=True)
    if cfg.strategy == "ofa" and cfg.ofa.checkpoint is None:  # resumable: a rerun with the same --out continues
        cfg.ofa.checkpoint = os.path.join(args.out, "supernet.state.pt")
    result = compress(teacher, teacher, loader, config=cfg)
    from .core import distributed

    if not distributed.is_main():  # under torchrun only rank 0 prints and writes
        return 0
    print(result.report)
    path = save(result.model, os.path.join(args.out, "student.safetensors"))
    write_json(result.report.to_dict(), os.path.join(args.out, "report.json"))
    print(f"saved {path}")
    if result.supernet is not None:
        from .pruning.supernet import save_supernet

        print(f"saved {save_supernet(result.supernet, os.path.join(args.out, 'supernet.safetensors'))} "
              f"(search it for other budgets: ganslim search {os.path.join(args.out, 'supernet.safetensors')} --target-macs ...)")
    return 0


# CompressConfig fields that take a value on the command line: ``--field-name`` (short aliases kept from
# earlier releases). Generated from the dataclass, with its defaults, so the CLI and the API cannot disagree.
_FLAG_ALIASES = {"search_population": ("--population",), "search_generations": ("--generations",)}
_SCALAR_TYPES = {"int": int, "float": float, "str": str, "bool": bool}


def _field_type(annotation: str):
    """``int`` / ``Optional[float]`` ... -> the Python type; None for anything else (sequences, callables)."""
    a = annotation.replace(" ", "")
    if a.startswith("Optional[") and a.endswith("]"):
        a = a[len("Optional["):-1]
    return _SCALAR_TYPES.get(a)


def _parse_option(text: str) -> tuple:
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"--strategy-option takes NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per scalar option of CompressConfig and its sections, ``--flat-name`` (dest: the flat
    name, :func:`ganslim.config.option_fields`), one argument group per section; absent flags leave the
    option to the file or the default."""
    from .config import SECTIONS, option_fields
    from .strategies import strategy_names, strategy_table

    groups = {None: parser.add_argument_group("compression options (CompressConfig fields; defaults are the API's)")}
    for section, cls in SECTIONS.items():
        groups[section] = parser.add_argument_group(f"{section} options (CompressConfig.{section}: {cls.__name__})")
    for name, section, f in option_fields():
        kind = _field_type(str(f.type))
        if kind is None or name in ("progress",):  # progress: --no-progress below
            continue
        default = f.default
        names = ("--" + name.replace("_", "-"),) + _FLAG_ALIASES.get(name, ())
        kw: dict = dict(dest=name, default=argparse.SUPPRESS, help=f"default: {default!r}")
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = kind
            kw["metavar"] = kind.__name__.upper()
        if name == "strategy":
            kw["choices"] = list(strategy_names())
            kw["help"] = f"{strategy_table()} (default: {default!r})"
            kw.pop("metavar")
        elif name == "quant":
            kw["choices"] = ["int8"]
            kw["help"] = f"add a QAT stage (8-bit weights and activations); default: {default!r} (none)"
            kw.pop("metavar")
        groups[section].add_argument(*names, **kw)
    groups[None].add_argument("--strategy-option", action="append", metavar="NAME=VALUE",
                              help="an option of a plug-in strategy's own dataclass (strategy_options); repeatable")


def _cmd_search(args) -> int:
    from . import data
    from .pruning.search import search_budgets
    from .pruning.supernet import load_supernet

    supernet = load_supernet(args.supernet)
    teacher = _load_model(args.teacher, args.factory, args.weights)
    n = max(8, args.finetune_steps) * args.batch_size
    if args.images:
        ds = data.ImageFolder(args.images, crop=args.crop, length=n, seed=args.seed)
        loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, drop_last=True)
        eval_pairs = [((x,), None) for x in data.folder_images(args.images)[:4]]
    else:
        loader = data.default_loader(batch_size=args.batch_size, crop=args.crop, length=n, seed=args.seed, teacher=teacher)
        eval_pairs = [((x,), y) for x, y in data.test_pairs()]
    budgets = [("macs", v) for v in (args.target_macs or [])] + [("latency", v) for v in (args.target_latency_ms or [])]
    if not budgets:
        raise ValueError("give --target-macs and/or --target-latency-ms (one or more values each)")
    os.makedirs(args.out, exist_ok=True)
    rows = search_budgets(supernet, teacher, loader, eval_pairs, budgets, out_dir=args.out,
                          finetune_steps=args.finetune_steps, finetune_lr=args.finetune_lr,
                          population=args.population, generations=args.generations, seed=args.seed,
                          workers=args.workers, precision=args.precision, prefix_cache_mb=args.prefix_cache_mb,
                          progress=not args.no_progress, plot=os.path.join(args.out, "pareto.png"))
    print(rows.table())
    write_json(rows.to_dict(), os.path.join(args.out, "search.json"))
    print(f"wrote {args.out}/search.json, {args.out}/pareto.png and {len(rows.rows)} sub-network checkpoint(s)")
    return 0


def _random_input(shape: tuple) -> torch.Tensor:
    """A seeded uniform input in [-1, 1] of ``shape`` (a generator's image range)."""
    return torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _cmd_bench(args) -> int:
    from . import data
    from .measure.benchmarking import bench, format_table, image_grid, write_outputs

    shape = tuple(int(v) for v in args.input_shape.split(",")) if args.input_shape else None
    if args.images:
        size = tuple(int(v) for v in args.size.split(",")) if args.size else None
        pairs = [((x,), None) for x in data.folder_images(args.images, size=size)]
        where = f"{len(pairs)} image(s) of {args.images} (no ground truth: fidelity is to the teacher)"
    elif shape:
        pairs = [((_random_input(shape),), None)]
        where = f"random input {shape}"
    else:
        pairs = [((x,), y) for x, y in data.test_pairs()]
        where = "the embedded held-out photo (with ground truth)"
    runtimes = [r.strip() for r in args.runtimes.split(",") if r.strip()]
    models = [args.teacher] + list(args.checkpoints)
    rows = bench(models, eval_pairs=pairs, repeats=args.repeats, threads=args.threads, runtimes=runtimes,
                 factory=args.factory, fid_features=args.fid_features, lpips_net=args.lpips, device=args.device,
                 paired_rounds=args.paired_rounds, progress=not args.quiet)
    first = pairs[0][0][0]
    print(f"{where}; latency at {tuple(first.shape)}, batch {first.shape[0]}, {args.threads or torch.get_num_threads()} "
          f"CPU threads{'' if not args.device else ', device ' + args.device}; (ratios) = teacher / model")
    print(format_table(rows))
    for p in write_outputs(rows, args.json, args.markdown, args.plot, args.plot_x):
        print(f"wrote {p}")
    if args.grid:
        print(f"wrote {image_grid(models, args.grid, pairs, args.factory)}")
    return 1 if all(r.error for r in rows) else 0


def _cmd_export(args) -> int:
    from . import data
    from .deployment.deploy import OnnxModule, export

    model = _load_model(args.checkpoint, args.factory, args.weights)
    if args.input_shape:
        shape = tuple(int(v) for v in args.input_shape.split(","))
        example = torch.randn(shape, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    else:
        example = data.test_pairs()[0][0]
    calib = None
    if args.format == "onnx-int8":
        if args.images:
            ds = data.ImageFolder(args.images, crop=args.crop, length=args.calib_batches * args.batch_size)
            calib = torch.utils.data.DataLoader(ds, batch_size=args.batch_size, drop_last=True)
        else:
            calib = data.default_loader(batch_size=args.batch_size, crop=args.crop,
                                        length=args.calib_batches * args.batch_size)
    out = args.out or os.path.splitext(args.checkpoint or "model")[0] + (".int8.onnx" if args.format == "onnx-int8" else ".onnx")
    path = export(model, out, args.format, example_inputs=example, calib_loader=calib, calib_batches=args.calib_batches)
    om = OnnxModule(path)
    print(f"wrote {path} ({os.path.getsize(path) / 1e6:.2f} MB, {args.format}); onnxruntime runs it with "
          f"{om.int8_kernels()} integer kernels; input {tuple(example.shape)}")
    return 0


def _cmd_profile(args) -> int:
    from . import data
    from .deployment.profile import profile_ops

    if args.input_shape:
        example = _random_input(tuple(int(v) for v in args.input_shape.split(",")))
    else:
        example = data.test_pairs()[0][0]
    prof = profile_ops(args.onnx, example, threads=args.threads, runs=args.runs)
    print(f"{args.onnx}: input {tuple(example.shape)}, {prof.threads} onnxruntime threads, {prof.runs} profiled runs")
    print(prof.table(top=args.top))
    print(f"left in float: {prof.float_ops() or 'nothing'}")
    if args.json:
        write_json({"path": prof.path, "input": list(example.shape), "threads": prof.threads,
                    "run_ms": prof.run_ms, "by_precision_ms": prof.by_precision(),
                    "by_op_type": prof.by_op_type(), "float_ops": prof.float_ops(),
                    "nodes": [n.__dict__ for n in prof.nodes]}, args.json)
        print(f"wrote {args.json}")
    return 0


def _cmd_info(args) -> int:
    from .deployment.checkpoint import read_metadata

    print(json.dumps(read_metadata(args.checkpoint), indent=2, default=str))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    ap = argparse.ArgumentParser(prog="ganslim", description="Compress existing GAN generators.")
    ap.add_argument("--version", action="version", version=f"ganslim {__version__}")
    sub = ap.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("demo", help="compress the embedded default teacher and print the table")
    d.add_argument("--out", default="runs/demo")
    d.add_argument("--steps", type=int)
    d.add_argument("--finetune-steps", type=int)
    d.add_argument("--target-macs", type=float)
    d.set_defaults(fn=_cmd_demo)

    c = sub.add_parser("compress", help="compress a generator (ganslim checkpoint or factory + weights)")
    c.add_argument("--teacher", default="default", help="ganslim .safetensors checkpoint, or 'default'")
    c.add_argument("--factory", help="'package.module:function' that builds the generator (with --weights)")
    c.add_argument("--weights", help="state dict (.pth or .safetensors) for --factory")
    c.add_argument("--images", help="folder of input images (unpaired: targets come from the teacher)")
    c.add_argument("--config", help="JSON file of CompressConfig options (flags given explicitly override it)")
    # 8, not 4: the demo's batch; on the default teacher onestep at 1/20 after 3000 steps reached
    # -0.73 dB at batch 8 and -2.81 dB at batch 4 (the students' BatchNorm statistics from 4 crops are noisy)
    c.add_argument("--batch-size", type=int, default=8, help="crops per training batch (default 8)")
    c.add_argument("--crop", type=int, default=64)
    c.add_argument("--out", default="runs/compress")
    c.add_argument("--no-progress", action="store_true")
    _add_config_flags(c)
    c.set_defaults(fn=_cmd_compress)

    from .config import SEARCH_PRECISIONS, CompressConfig

    api = CompressConfig()  # the search command's defaults are the API's
    s = sub.add_parser("search", help="find sub-networks of a saved supernet for one or more budgets (no retraining)")
    s.add_argument("supernet", help="supernet .safetensors written by `ganslim compress --strategy ofa`")
    s.add_argument("--target-macs", type=float, nargs="+", help="fractions of the teacher's MACs (or absolute if > 1)")
    s.add_argument("--target-latency-ms", type=float, nargs="+", help="measured latency budgets on this CPU (ms)")
    s.add_argument("--teacher", default="default", help="ganslim .safetensors checkpoint, or 'default'")
    s.add_argument("--factory", help="'package.module:function' that builds the teacher (with --weights)")
    s.add_argument("--weights", help="state dict (.pth or .safetensors) for --factory")
    s.add_argument("--images", help="folder of images (unpaired: fitness is fidelity to the teacher)")
    s.add_argument("--finetune-steps", type=int, default=0, help="distillation fine-tune of each exported sub-network")
    s.add_argument("--finetune-lr", type=float, default=api.finetune_lr)
    s.add_argument("--population", type=int, default=api.ofa.population)
    s.add_argument("--generations", type=int, default=api.ofa.generations)
    s.add_argument("--workers", type=int, default=api.ofa.workers,
                   help=f"evaluation processes, the threads shared out among them (default: {api.ofa.workers})")
    s.add_argument("--precision", choices=SEARCH_PRECISIONS, default=api.ofa.precision,
                   help="the search's arithmetic (default fp32); auto = bf16 on a CPU with native bf16 (AMX, AVX512-BF16): "
                        "faster, may choose another sub-network")
    s.add_argument("--prefix-cache-mb", type=int, default=api.ofa.prefix_cache_mb,
                   help="memory per evaluation process for the activations of layer prefixes that sub-networks share "
                        f"(the same numbers, less work; at most a quarter of the free memory; 0: off; default {api.ofa.prefix_cache_mb})")
    s.add_argument("--batch-size", type=int, default=8)
    s.add_argument("--crop", type=int, default=64)
    s.add_argument("--seed", type=int, default=api.seed)
    s.add_argument("--out", default="runs/search")
    s.add_argument("--no-progress", action="store_true")
    s.set_defaults(fn=_cmd_search)

    b = sub.add_parser("bench", help="measure a teacher and compressed checkpoints side by side")
    b.add_argument("teacher", help="the reference: ganslim .safetensors, .onnx, .pth (with --factory), or 'default'")
    b.add_argument("checkpoints", nargs="*", help="models to compare: same formats as the teacher")
    b.add_argument("--factory", help="'package.module:function' building the architecture of plain state dicts")
    b.add_argument("--images", help="folder of input images (whole images; no ground truth)")
    b.add_argument("--size", help="resize --images to H,W (default: crop to multiples of 4)")
    b.add_argument("--input-shape", help="random input of this shape, e.g. 1,3,256,256")
    b.add_argument("--runtimes", default="eager", help="comma list of: eager, eager-channels-last, compile, onnxruntime, onnxruntime-int8")
    b.add_argument("--repeats", type=int, default=10)
    b.add_argument("--paired-rounds", type=int, default=10,
                   help="time the models again in alternating turns, this many rounds (the 'paired ms' column and "
                        "its speed-ups, which the machine's drift does not move); 0: skip")
    b.add_argument("--threads", type=int)
    b.add_argument("--device", help="cpu (default) or cuda for the PyTorch runtimes")
    b.add_argument("--json")
    b.add_argument("--markdown")
    b.add_argument("--plot", help="PNG Pareto plot (cost vs PSNR)")
    b.add_argument("--plot-x", choices=["macs", "latency"], default="macs")
    b.add_argument("--grid", help="PNG image grid: input | teacher | each model | ground truth")
    b.add_argument("--fid-features", help="TorchScript image->features network (e.g. Inception pool3) for FID")
    b.add_argument("--lpips", help="TorchScript (x, y)->distance network for LPIPS")
    b.add_argument("--quiet", action="store_true")
    b.set_defaults(fn=_cmd_bench)

    e = sub.add_parser("export", help="write a checkpoint as ONNX (fp32) or int8 QDQ ONNX for onnxruntime")
    e.add_argument("checkpoint", nargs="?", help="ganslim .safetensors (a QAT checkpoint for QAT int8), or 'default'")
    e.add_argument("--factory", help="'package.module:function' that builds the generator (with --weights)")
    e.add_argument("--weights", help="state dict (.pth or .safetensors) for --factory")
    e.add_argument("--format", choices=["onnx", "onnx-int8"], default="onnx")
    e.add_argument("--out", help="output .onnx path (default: next to the checkpoint)")
    e.add_argument("--input-shape", help="example input, e.g. 1,3,256,256 (default: the held-out photo)")
    e.add_argument("--images", help="folder of calibration images for onnx-int8 (default: the embedded photos)")
    e.add_argument("--calib-batches", type=int, default=8)
    e.add_argument("--batch-size", type=int, default=8)
    e.add_argument("--crop", type=int, default=64)
    e.set_defaults(fn=_cmd_export)

    pr = sub.add_parser("profile", help="onnxruntime's operator profile of an ONNX file: what runs int8, what stays float")
    pr.add_argument("onnx", help=".onnx file (e.g. written by `ganslim export`)")
    pr.add_argument("--input-shape", help="random input of this shape, e.g. 1,3,256,256 (default: the held-out photo)")
    pr.add_argument("--threads", type=int)
    pr.add_argument("--runs", type=int, default=10)
    pr.add_argument("--top", type=int, help="only the N slowest operator types")
    pr.add_argument("--json", help="write every node's time here")
    pr.set_defaults(fn=_cmd_profile)

    i = sub.add_parser("info", help="print a checkpoint's metadata")
    i.add_argument("checkpoint")
    i.set_defaults(fn=_cmd_info)
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (ValueError, TypeError, FileNotFoundError, KeyError, OSError, ImportError, RuntimeError) as e:
        print(f"ganslim {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
