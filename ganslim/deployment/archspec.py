"""Architecture <-> JSON, so a (pruned) model can be rebuilt without its Python class.

Two levels:

* **Leaf modules** (standard ``torch.nn`` layers): :func:`module_spec` records the class name and the
  constructor arguments read back from the same-named attributes (``inspect.signature``), and
  :func:`build_module` rebuilds the layer and checks that parameter/buffer names and shapes and the
  plain hyper-parameter attributes equal the recorded ones.
* **Whole models** (:func:`model_spec` / :func:`build_model`), two modes tried in order:

  ``"fx"``
      ``torch.fx.symbolic_trace`` the model and store the graph as JSON (ops, names, targets,
      encoded args), one leaf spec per ``call_module`` target and the names of ``get_attr`` tensors.
      Rebuilt as a ``torch.fx.GraphModule`` whose qualified names -- hence ``state_dict`` keys -- are
      the original ones. ``call_function`` targets are resolved only from an allowlist (``operator``,
      ``math``, ``torch`` / ``torch.nn.functional`` / ``torch.Tensor`` tensor operations,
      ``builtins.getattr`` of public tensor attributes). Nothing stored is ever ``eval``-ed,
      ``exec``-ed or unpickled.
  ``"class"``
      Used when tracing fails (data-dependent control flow, ...): the class' import path, its
      constructor kwargs from the ``_ganslim_init`` attribute (a ganslim convention) and the specs
      of all leaf modules. Loading imports the class, constructs it, and swaps in every leaf whose
      stored spec differs (e.g. pruned channel counts). The class must be importable at load time.

The JSON value encoding (:func:`encode_value` / :func:`decode_value`) keeps JSON-native values as
they are and tags everything else in a one-key object (``{"$tuple": [...]}``, ``{"$node": "x"}``,
``{"$float": "inf"}``, ``{"$dtype": "float32"}``, ...), so tuples, non-finite floats, slices, dtypes,
sizes, devices and memory formats survive the round-trip exactly.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import keyword
import math
import operator
from typing import Any, Callable, Iterable

import torch
import torch.nn as nn

__all__ = [
    "ArchSpecError",
    "module_spec",
    "build_module",
    "model_spec",
    "build_model",
    "encode_value",
    "decode_value",
    "leaf_modules",
    "SPEC_VERSION",
]

SPEC_VERSION = 1


class ArchSpecError(ValueError):
    """An architecture cannot be described as JSON, or a stored description cannot be rebuilt."""


# --------------------------------------------------------------------------------------------------
# value encoding
# --------------------------------------------------------------------------------------------------

_FLOAT_TAGS = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}


def encode_value(v: Any, node_name: Callable[[Any], str] | None = None) -> Any:
    """Encode ``v`` as JSON-able data (see the module docstring). ``node_name`` maps fx Nodes."""
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        if math.isfinite(v):
            return float(v)
        return {"$float": "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")}
    if node_name is not None and isinstance(v, torch.fx.Node):
        return {"$node": node_name(v)}
    if isinstance(v, torch.Size):
        return {"$size": [int(x) for x in v]}
    if isinstance(v, tuple):
        return {"$tuple": [encode_value(x, node_name) for x in v]}
    if isinstance(v, list):
        return [encode_value(x, node_name) for x in v]
    if isinstance(v, dict):
        return {"$dict": [[encode_value(k, node_name), encode_value(x, node_name)] for k, x in v.items()]}
    if isinstance(v, slice):
        return {"$slice": [encode_value(v.start, node_name), encode_value(v.stop, node_name),
                           encode_value(v.step, node_name)]}
    if v is Ellipsis:
        return {"$ellipsis": None}
    if isinstance(v, torch.dtype):
        return {"$dtype": str(v).replace("torch.", "")}
    if isinstance(v, torch.device):
        return {"$device": str(v)}
    if isinstance(v, torch.memory_format):
        return {"$memory_format": str(v).replace("torch.", "")}
    if isinstance(v, torch.layout):
        return {"$layout": str(v).replace("torch.", "")}
    raise ArchSpecError(f"cannot encode value of type {type(v).__qualname__}: {v!r}")


def _torch_attr(name: Any, kind: type) -> Any:
    if not isinstance(name, str) or not name.isidentifier():
        raise ArchSpecError(f"bad {kind.__name__} name {name!r}")
    obj = getattr(torch, name, None)
    if not isinstance(obj, kind):
        raise ArchSpecError(f"unknown {kind.__name__} {name!r}")
    return obj


def decode_value(v: Any, nodes: dict[str, Any] | None = None) -> Any:
    """Inverse of :func:`encode_value`; ``nodes`` maps stored node names to rebuilt fx Nodes."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, list):
        return [decode_value(x, nodes) for x in v]
    if not isinstance(v, dict) or len(v) != 1:
        raise ArchSpecError(f"malformed encoded value {v!r}")
    (tag, x), = v.items()
    if tag == "$tuple":
        return tuple(decode_value(y, nodes) for y in _as_list(x, tag))
    if tag == "$node":
        if nodes is None or x not in nodes:
            raise ArchSpecError(f"reference to unknown graph node {x!r}")
        return nodes[x]
    if tag == "$float":
        if x not in _FLOAT_TAGS:
            raise ArchSpecError(f"bad float tag {x!r}")
        return _FLOAT_TAGS[x]
    if tag == "$size":
        return torch.Size([int(y) for y in _as_list(x, tag)])
    if tag == "$dict":
        return {decode_value(k, nodes): decode_value(y, nodes) for k, y in _as_list(x, tag)}
    if tag == "$slice":
        a, b, c = _as_list(x, tag)
        return slice(decode_value(a, nodes), decode_value(b, nodes), decode_value(c, nodes))
    if tag == "$ellipsis":
        return Ellipsis
    if tag == "$dtype":
        return _torch_attr(x, torch.dtype)
    if tag == "$device":
        return torch.device(x)
    if tag == "$memory_format":
        return _torch_attr(x, torch.memory_format)
    if tag == "$layout":
        return _torch_attr(x, torch.layout)
    raise ArchSpecError(f"unknown value tag {tag!r}")


def _as_list(x: Any, tag: str) -> list:
    if not isinstance(x, list):
        raise ArchSpecError(f"malformed {tag} value {x!r}")
    return x


# --------------------------------------------------------------------------------------------------
# leaf modules
# --------------------------------------------------------------------------------------------------

_SKIP_ARGS = {"self", "device", "dtype"}
_INTERNAL_ATTRS = {"training"}


def _nn_class(name: str) -> type[nn.Module]:
    cls = getattr(nn, name, None) if isinstance(name, str) and name.isidentifier() else None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ArchSpecError(f"{name!r} is not a torch.nn layer class")
    return cls


def _is_supported_leaf_type(m: nn.Module) -> bool:
    name = type(m).__name__
    return getattr(nn, name, None) is type(m)


def _plain_attrs(m: nn.Module) -> dict[str, Any]:
    """Public hyper-parameter attributes of ``m`` (ints, floats, strings, tuples, ...)."""
    out = {}
    for k, v in vars(m).items():
        if k.startswith("_") or k in _INTERNAL_ATTRS:
            continue
        try:
            out[k] = encode_value(v)
        except ArchSpecError:
            continue
    return out


def _tensor_shapes(m: nn.Module) -> dict[str, list[int]]:
    d = {f"param:{k}": list(p.shape) for k, p in m.named_parameters(recurse=True)}
    d.update({f"buffer:{k}": list(b.shape) for k, b in m.named_buffers(recurse=True)})
    return d


def module_spec(m: nn.Module, path: str = "") -> dict:
    """JSON spec of a standard ``torch.nn`` layer: ``{"type": "Conv2d", "args": {...}}``.

    Raises :class:`ArchSpecError` naming ``path`` and the class for anything else.
    """
    where = f"module {path!r}" if path else "module"
    if not _is_supported_leaf_type(m):
        raise ArchSpecError(
            f"{where} of class {type(m).__module__}.{type(m).__qualname__} is not a standard torch.nn "
            "layer; ganslim can only describe torch.nn layers generically"
        )
    cls = type(m)
    args: dict[str, Any] = {}
    try:
        sig = inspect.signature(cls.__init__)
    except (TypeError, ValueError) as e:  # pragma: no cover - builtin classes without signature
        raise ArchSpecError(f"{where} ({cls.__name__}): cannot read constructor signature: {e}") from None
    for pname, p in sig.parameters.items():
        if pname in _SKIP_ARGS or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        if not hasattr(m, pname):
            if p.default is not p.empty:
                # The constructor argument left no trace; `build_module`'s attribute check decides
                # whether the default reproduces the layer.
                continue
            raise ArchSpecError(f"{where} ({cls.__name__}): constructor argument {pname!r} has no "
                                "same-named attribute; cannot record it")
        v = getattr(m, pname)
        if isinstance(v, torch.Tensor) or (v is None and isinstance(p.default, bool)):
            if pname == "bias" or isinstance(p.default, bool):
                v = v is not None
            else:
                raise ArchSpecError(f"{where} ({cls.__name__}): argument {pname!r} is a tensor")
        try:
            args[pname] = encode_value(v)
        except ArchSpecError as e:
            raise ArchSpecError(f"{where} ({cls.__name__}): argument {pname!r}: {e}") from None
    spec = {"type": cls.__name__, "args": args}
    hooks = _hook_specs(m, where)
    if hooks:
        spec["hooks"] = hooks
    # Verify now, so saving fails (and the caller can fall back) instead of loading.
    _check_rebuilt(m, _construct(spec, where, skip_init=True), where)
    return spec


def _hook_specs(m: nn.Module, where: str) -> list[dict]:
    """Old-style ``spectral_norm`` / ``weight_norm`` pre-hooks as data; any other hook is an error
    (it would silently vanish on reload)."""
    from torch.nn.utils.spectral_norm import SpectralNorm
    from torch.nn.utils.weight_norm import WeightNorm

    out = []
    for h in m._forward_pre_hooks.values():
        if isinstance(h, SpectralNorm):
            out.append({"spectral_norm": {"name": h.name, "n_power_iterations": int(h.n_power_iterations),
                                          "dim": int(h.dim), "eps": encode_value(float(h.eps))}})
        elif isinstance(h, WeightNorm):
            out.append({"weight_norm": {"name": h.name, "dim": None if h.dim is None else int(h.dim)}})
        else:
            raise ArchSpecError(f"{where} ({type(m).__name__}) has a forward pre-hook {h!r} that cannot be stored")
    if m._forward_hooks:
        raise ArchSpecError(f"{where} ({type(m).__name__}) has forward hooks that cannot be stored")
    return out


def _apply_hooks(m: nn.Module, hooks: Any, where: str) -> nn.Module:
    import warnings

    if not isinstance(hooks, list):
        raise ArchSpecError(f"{where}: malformed hooks {hooks!r}")
    for h in hooks:
        if not isinstance(h, dict) or len(h) != 1:
            raise ArchSpecError(f"{where}: malformed hook {h!r}")
        (kind, kw), = h.items()
        if not isinstance(kw, dict) or not isinstance(kw.get("name"), str):
            raise ArchSpecError(f"{where}: malformed hook {h!r}")
        try:
            if kind == "spectral_norm":
                m = torch.nn.utils.spectral_norm(m, name=kw["name"], n_power_iterations=int(kw["n_power_iterations"]),
                                                 eps=float(decode_value(kw["eps"])), dim=int(kw["dim"]))
            elif kind == "weight_norm":
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    m = torch.nn.utils.weight_norm(m, name=kw["name"], dim=kw["dim"])
            else:
                raise ArchSpecError(f"{where}: unknown hook {kind!r}")
        except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as e:
            raise ArchSpecError(f"{where}: cannot apply {kind}: {e}") from None
    return m


def _construct(spec: dict, where: str, skip_init: bool = False) -> nn.Module:
    if not isinstance(spec, dict) or "type" not in spec:
        raise ArchSpecError(f"{where}: malformed layer spec {spec!r}")
    cls = _nn_class(spec["type"])
    kwargs = {k: decode_value(v) for k, v in spec.get("args", {}).items()}
    kwargs = {k: (list(v) if isinstance(v, tuple) and k == "normalized_shape" else v) for k, v in kwargs.items()}
    try:
        if skip_init and "device" in inspect.signature(cls.__init__).parameters:
            m = torch.nn.utils.skip_init(cls, **kwargs)
        else:
            m = cls(**kwargs)
    except Exception as e:
        raise ArchSpecError(f"{where}: cannot construct nn.{cls.__name__}(**{kwargs}): {e}") from None
    return _apply_hooks(m, spec.get("hooks", []), where)


def _check_rebuilt(orig: nn.Module, new: nn.Module, where: str) -> None:
    a, b = _tensor_shapes(orig), _tensor_shapes(new)
    if a != b:
        hint = ""
        if any(k.endswith("_orig") or k.endswith("_g") or k.endswith("_v") for k in a):
            hint = " (spectral_norm/weight_norm? remove it before saving)"
        raise ArchSpecError(f"{where} ({type(orig).__name__}): rebuilt parameters/buffers {b} differ "
                            f"from the original {a}{hint}")
    pa, pb = _plain_attrs(orig), _plain_attrs(new)
    diff = sorted(k for k in set(pa) | set(pb) if pa.get(k, "<missing>") != pb.get(k, "<missing>"))
    if diff:
        raise ArchSpecError(f"{where} ({type(orig).__name__}): rebuilt attributes differ from the "
                            f"original: " + ", ".join(f"{k}={pb.get(k)} vs {pa.get(k)}" for k in diff))


def build_module(spec: dict, path: str = "", *, skip_init: bool = False) -> nn.Module:
    """Rebuild a layer from :func:`module_spec` output, checking its parameter/buffer shapes.

    ``skip_init`` leaves parameters uninitialised (for layers whose weights are loaded right after).
    """
    where = f"module {path!r}" if path else "module"
    m = _construct(spec, where, skip_init=skip_init)
    want = spec.get("tensors")
    if want is not None and _tensor_shapes(m) != want:
        raise ArchSpecError(f"{where} ({spec['type']}): rebuilt parameters/buffers {_tensor_shapes(m)} "
                            f"differ from the stored {want}")
    return m


def _full_spec(m: nn.Module, path: str) -> dict:
    spec = module_spec(m, path)
    spec["tensors"] = _tensor_shapes(m)
    return spec


def leaf_modules(model: nn.Module) -> Iterable[tuple[str, nn.Module]]:
    """``(qualified name, module)`` for every module without children (the root excluded)."""
    for name, m in model.named_modules():
        if name and next(iter(m.children()), None) is None:
            yield name, m


# --------------------------------------------------------------------------------------------------
# call_function allowlist
# --------------------------------------------------------------------------------------------------

_FN_MODULES: dict[str, Any] = {
    "_operator": operator,
    "operator": operator,
    "math": math,
    "torch": torch,
    "torch.nn.functional": torch.nn.functional,
    "torch.Tensor": torch.Tensor,
    "torch.fft": torch.fft,
    "torch.linalg": torch.linalg,
    "torch.special": torch.special,
    "builtins": builtins,
}
_TORCH_NAMESPACES = {"torch", "torch.nn.functional", "torch.Tensor", "torch.fft", "torch.linalg", "torch.special"}
_BUILTINS_ALLOWED = {"getattr"}
_TORCH_EXTRA_ALLOWED = {"_assert"}
_tensor_ops_cache: set | None = None


def _tensor_ops() -> set:
    """Functions torch considers tensor operations (``__torch_function__``-overridable)."""
    global _tensor_ops_cache
    if _tensor_ops_cache is None:
        from torch.overrides import get_overridable_functions

        ops: set = set()
        for fns in get_overridable_functions().values():
            for f in fns:
                try:
                    ops.add(f)
                except TypeError:  # pragma: no cover - unhashable entries
                    pass
        _tensor_ops_cache = ops
    return _tensor_ops_cache


def _is_allowed(modname: str, name: str, fn: Any) -> bool:
    if not callable(fn) or inspect.ismodule(fn):
        return False
    if modname in ("_operator", "operator", "math"):
        return not name.startswith("_") and not isinstance(fn, type)
    if modname == "builtins":
        return name in _BUILTINS_ALLOWED
    if modname == "torch" and name in _TORCH_EXTRA_ALLOWED:
        return True
    if modname in _TORCH_NAMESPACES:
        try:
            return fn in _tensor_ops()
        except TypeError:  # pragma: no cover
            return False
    return False


def encode_function(fn: Any) -> str:
    """``"module:name"`` for an allowlisted call_function target, else :class:`ArchSpecError`."""
    name = getattr(fn, "__name__", None)
    for modname in ("_operator", "torch", "torch.nn.functional", "torch.Tensor", "torch.fft",
                    "torch.linalg", "torch.special", "math", "builtins"):
        mod = _FN_MODULES[modname]
        if name and getattr(mod, name, None) is fn and _is_allowed(modname, name, fn):
            return f"{modname}:{name}"
    for modname in ("torch", "torch.nn.functional"):  # aliases whose __name__ differs
        mod = _FN_MODULES[modname]
        for k, v in vars(mod).items():
            if v is fn and k.isidentifier() and _is_allowed(modname, k, fn):
                return f"{modname}:{k}"
    raise ArchSpecError(f"function {getattr(fn, '__module__', '?')}.{getattr(fn, '__qualname__', fn)!r} "
                        "is not in ganslim's allowlist of tensor operations")


def decode_function(s: Any) -> Callable:
    if not isinstance(s, str) or s.count(":") != 1:
        raise ArchSpecError(f"malformed function reference {s!r}")
    modname, name = s.split(":")
    mod = _FN_MODULES.get(modname)
    if mod is None or not name.isidentifier():
        raise ArchSpecError(f"function {s!r} is not in ganslim's allowlist")
    fn = getattr(mod, name, None)
    if fn is None or not _is_allowed(modname, name, fn):
        raise ArchSpecError(f"function {s!r} is not in ganslim's allowlist")
    return fn


def _check_method(name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier() or name.startswith("_") \
            or not callable(getattr(torch.Tensor, name, None)):
        raise ArchSpecError(f"method {name!r} is not a public torch.Tensor method")
    return name


def _check_getattr_args(args: tuple) -> None:
    if len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("_") \
            or not hasattr(torch.Tensor, args[1]):
        raise ArchSpecError(f"getattr of {args[1:2]!r} is not allowed (only public tensor attributes)")


# --------------------------------------------------------------------------------------------------
# whole models
# --------------------------------------------------------------------------------------------------

def _get_path(root: Any, target: str) -> Any:
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def _class_path(cls: type) -> str:
    return f"{cls.__module__}:{cls.__qualname__}"


def _init_kwargs(model: nn.Module) -> dict | None:
    init = getattr(model, "_ganslim_init", None)
    if init is None:
        return None
    if not isinstance(init, dict):
        raise ArchSpecError(f"_ganslim_init must be a dict, got {type(init).__name__}")
    return encode_value(dict(init))


def _fx_spec(model: nn.Module, persistent_keys: set[str]) -> dict:
    gm = torch.fx.symbolic_trace(model)
    graph_nodes, modules, attrs = [], {}, {}
    names = {}
    for node in gm.graph.nodes:
        names[node] = node.name
        entry: dict[str, Any] = {"op": node.op, "name": node.name}
        if node.op == "call_function":
            entry["target"] = encode_function(node.target)
            if node.target is builtins.getattr:
                _check_getattr_args(node.args)
        elif node.op == "call_method":
            entry["target"] = _check_method(node.target)
        elif node.op == "call_module":
            entry["target"] = node.target
            if node.target not in modules:
                modules[node.target] = _full_spec(_get_path(model, node.target), node.target)
        elif node.op == "get_attr":
            entry["target"] = node.target
            if node.target not in attrs:
                try:
                    t = _get_path(model, node.target)
                except AttributeError:
                    t = _get_path(gm, node.target)  # constants created by the tracer
                if not isinstance(t, torch.Tensor):
                    raise ArchSpecError(f"get_attr {node.target!r} is a {type(t).__name__}, not a tensor")
                attrs[node.target] = {
                    "kind": "parameter" if isinstance(t, nn.Parameter) else "buffer",
                    "requires_grad": bool(t.requires_grad),
                    "in_state_dict": node.target in persistent_keys,
                }
        elif node.op in ("placeholder", "output"):
            entry["target"] = node.target
        else:  # pragma: no cover
            raise ArchSpecError(f"unsupported fx op {node.op!r}")
        entry["args"] = encode_value(tuple(node.args), names.__getitem__)
        entry["kwargs"] = encode_value(dict(node.kwargs), names.__getitem__)
        graph_nodes.append(entry)
    # Submodule order and container types, so the rebuilt model lists its state_dict in the original
    # order and `rebuilt.model[3]` still indexes like the original nn.Sequential.
    prefixes = set()
    for t in list(modules) + list(attrs):
        parts = t.split(".")
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    order, containers = [], {}
    for name, m in model.named_modules(remove_duplicate=False):
        if name in prefixes and name not in order:
            order.append(name)
            if name not in modules and type(m) in _CONTAINERS:
                containers[name] = type(m).__name__
    return {"mode": "fx", "graph": graph_nodes, "modules": modules, "attrs": attrs,
            "order": order, "containers": containers, "_fx_module": gm}


_CONTAINERS = {nn.Sequential, nn.ModuleList, nn.ModuleDict}


def _restore_structure(root: nn.Module, order: list, containers: dict) -> None:
    """Reorder children as in the original model and restore Sequential/ModuleList/ModuleDict."""
    pos = {n: i for i, n in enumerate(order)}

    def fix(mod: nn.Module, prefix: str) -> None:
        items = sorted(mod._modules.items(), key=lambda kv: pos.get(prefix + kv[0], len(pos)))
        mod._modules.clear()
        for name, child in items:
            path = prefix + name
            if child is not None and (type(child) is nn.Module or type(child) in _CONTAINERS):
                fix(child, path + ".")  # leaf layers keep their internals
            kind = containers.get(path)
            if kind is not None and type(child) is nn.Module:
                keys = list(child._modules)
                if kind == "ModuleDict" or keys == [str(i) for i in range(len(keys))]:
                    new = getattr(nn, kind)()
                    new._modules.update(child._modules)
                    new._parameters.update(child._parameters)
                    new._buffers.update(child._buffers)
                    new._non_persistent_buffers_set = set(child._non_persistent_buffers_set)
                    child = new
            mod._modules[name] = child

    fix(root, "")


def _class_spec(model: nn.Module) -> dict:
    cls = type(model)
    if "<locals>" in cls.__qualname__:
        raise ArchSpecError(f"class {cls.__module__}.{cls.__qualname__} is defined inside a function "
                            "and cannot be imported at load time")
    leaves = {}
    for name, m in leaf_modules(model):
        try:
            leaves[name] = _full_spec(m, name)
        except ArchSpecError as e:
            leaves[name] = {"opaque": True, "class": _class_path(type(m)), "tensors": _tensor_shapes(m),
                            "reason": str(e)}
    return {"mode": "class", "class": _class_path(cls), "init": _init_kwargs(model), "leaves": leaves}


def model_spec(model: nn.Module, persistent_keys: Iterable[str] | None = None) -> dict:
    """Architecture spec: fx graph if ``model`` traces, else class + leaf specs.

    The returned dict is JSON-encodable except for the private key ``"_fx_module"`` (the traced
    GraphModule, used by :mod:`ganslim.deployment.checkpoint` to fetch tracer-created constants); callers must
    pop it before serialising. ``"fx_error"`` explains why a "class" spec was produced.
    """
    if persistent_keys is None:
        persistent_keys = model.state_dict().keys()
    persistent_keys = set(persistent_keys)
    source = getattr(model, "_ganslim_source_class", None)  # set on models rebuilt from fx specs
    if not (isinstance(model, torch.fx.GraphModule) and isinstance(source, str)):
        source = _class_path(type(model))
    base = {"spec_version": SPEC_VERSION, "source_class": source}
    try:
        spec = _fx_spec(model, persistent_keys)
        try:
            init = _init_kwargs(model)
        except ArchSpecError:
            init = None
        if init is not None:
            spec["init"] = init
        return {**base, **spec}
    except Exception as e:  # any tracing/encoding failure -> class mode
        fx_error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    try:
        return {**base, **_class_spec(model), "fx_error": fx_error}
    except ArchSpecError as e:
        raise ArchSpecError(f"cannot describe {type(model).__qualname__}: torch.fx tracing failed "
                            f"({fx_error}) and the class fallback failed ({e})") from None


def _import_class(path: str) -> type:
    if not isinstance(path, str) or path.count(":") != 1:
        raise ArchSpecError(f"malformed class path {path!r}")
    modname, qualname = path.split(":")
    dotted = f"{modname}.{qualname}"
    try:
        obj: Any = importlib.import_module(modname)
        for part in qualname.split("."):
            obj = getattr(obj, part)
    except Exception as e:
        raise ArchSpecError(f"this checkpoint was saved in 'class' mode (its forward could not be traced "
                            f"by torch.fx) and requires the class {dotted}, which cannot be imported "
                            f"({type(e).__name__}: {e})") from None
    if not (isinstance(obj, type) and issubclass(obj, nn.Module)):
        raise ArchSpecError(f"{dotted} is not an nn.Module class")
    return obj


def build_model(spec: dict, state_dict: dict[str, torch.Tensor],
                attr_tensors: dict[str, torch.Tensor] | None = None) -> nn.Module:
    """Rebuild a model from :func:`model_spec` output and load its weights.

    ``state_dict`` holds the original ``state_dict`` entries, ``attr_tensors`` the fx ``get_attr``
    tensors that are not part of it. Raises :class:`ArchSpecError`; a missing tensor raises
    ``KeyError`` with the key.
    """
    if not isinstance(spec, dict):
        raise ArchSpecError("malformed architecture spec")
    mode = spec.get("mode")
    if mode == "fx":
        return _build_fx(spec, state_dict, attr_tensors or {})
    if mode == "class":
        return _build_class(spec, state_dict)
    raise ArchSpecError(f"unknown architecture mode {mode!r}")


def _is_identifier(s: Any) -> bool:
    return isinstance(s, str) and s.isidentifier() and not keyword.iskeyword(s)


def _is_attr_path(s: Any) -> bool:
    return isinstance(s, str) and all(_is_identifier(p) or (p.isdigit() and p.isascii()) for p in s.split("."))


def _build_fx(spec: dict, state_dict: dict, attr_tensors: dict) -> nn.Module:
    for target in list(spec.get("modules", {})) + list(spec.get("attrs", {})):
        if not _is_attr_path(target):
            raise ArchSpecError(f"bad attribute path {target!r}")
    root: dict[str, Any] = {}
    for target, mspec in spec.get("modules", {}).items():
        m = build_module(mspec, target, skip_init=True)
        root[target] = m
        if set(dict(m.named_parameters()).keys()) | set(dict(m.named_buffers()).keys()) != set(m.state_dict()):
            # non-persistent buffers would stay uninitialised with skip_init: build normally
            root[target] = build_module(mspec, target)
    nonpersistent = []
    for target, info in spec.get("attrs", {}).items():
        src = state_dict if info.get("in_state_dict") else attr_tensors
        if target not in src:
            raise KeyError(target)
        t = src[target]
        if info.get("kind") == "parameter":
            t = nn.Parameter(t, requires_grad=bool(info.get("requires_grad", True)))
        elif not info.get("in_state_dict"):
            nonpersistent.append(target)
        root[target] = t

    graph = torch.fx.Graph()
    nodes: dict[str, torch.fx.Node] = {}
    for entry in spec.get("graph", []):
        if not isinstance(entry, dict):
            raise ArchSpecError("malformed graph node")
        op, name, target = entry.get("op"), entry.get("name"), entry.get("target")
        # torch.fx generates Python source from the graph: every string that lands in it verbatim
        # (node names, placeholder names, attribute paths, keyword names) must be a plain identifier.
        if not _is_identifier(name) or name in nodes:
            raise ArchSpecError(f"bad or duplicate node name {name!r}")
        args = decode_value(entry.get("args", {"$tuple": []}), nodes)
        kwargs = decode_value(entry.get("kwargs", {"$dict": []}), nodes)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ArchSpecError(f"node {name!r}: malformed args")
        if not all(_is_identifier(k) for k in kwargs):
            raise ArchSpecError(f"node {name!r}: bad keyword argument names {list(kwargs)}")
        if op in ("call_module", "get_attr") and not _is_attr_path(target):
            raise ArchSpecError(f"node {name!r}: bad attribute path {target!r}")
        if op == "placeholder" and not (isinstance(target, str) and _is_identifier(target.lstrip("*"))
                                        and len(target) - len(target.lstrip("*")) <= 2):
            raise ArchSpecError(f"node {name!r}: bad placeholder name {target!r}")
        if op == "output" and target != "output":
            raise ArchSpecError(f"node {name!r}: bad output target {target!r}")
        if op == "call_function":
            target = decode_function(target)
            if target is builtins.getattr:
                _check_getattr_args(args)
        elif op == "call_method":
            target = _check_method(target)
        elif op == "call_module":
            if target not in root or not isinstance(root[target], nn.Module):
                raise ArchSpecError(f"node {name!r}: call_module target {target!r} has no stored spec")
        elif op == "get_attr":
            if target not in root:
                raise ArchSpecError(f"node {name!r}: get_attr target {target!r} is not stored")
        elif op in ("placeholder", "output"):
            if not isinstance(target, str):
                raise ArchSpecError(f"node {name!r}: bad target {target!r}")
        else:
            raise ArchSpecError(f"node {name!r}: unknown op {op!r}")
        nodes[name] = graph.create_node(op, target, args, kwargs, name=name)
    try:
        graph.lint()
    except Exception as e:
        raise ArchSpecError(f"stored graph is invalid: {e}") from None

    class_name = str(spec.get("source_class", "GraphModule")).rpartition(":")[2].rpartition(".")[2]
    gm = torch.fx.GraphModule(root, graph, class_name=class_name if class_name.isidentifier() else "GraphModule")
    order, containers = spec.get("order") or [], spec.get("containers") or {}
    if not isinstance(order, list) or not isinstance(containers, dict) or \
            any(v not in ("Sequential", "ModuleList", "ModuleDict") for v in containers.values()):
        raise ArchSpecError("malformed module order/containers")
    _restore_structure(gm, order, containers)
    for target in nonpersistent:  # tracer constants / non-persistent buffers stay out of state_dict
        owner_path, _, field = target.rpartition(".")
        owner = _get_path(gm, owner_path) if owner_path else gm
        owner.register_buffer(field, root[target], persistent=False)

    wanted = gm.state_dict().keys()
    sd = {}
    for k in wanted:
        if k not in state_dict:
            raise KeyError(k)
        sd[k] = state_dict[k]
    gm.load_state_dict(sd, strict=True, assign=True)
    gm._ganslim_source_class = spec.get("source_class")
    return gm


def _build_class(spec: dict, state_dict: dict) -> nn.Module:
    cls = _import_class(spec.get("class"))
    init = spec.get("init")
    kwargs = decode_value(init) if init is not None else {}
    if not isinstance(kwargs, dict):
        raise ArchSpecError("malformed constructor kwargs")
    try:
        model = cls(**kwargs)
    except Exception as e:
        raise ArchSpecError(f"cannot construct {spec.get('class')}(**{kwargs}): {type(e).__name__}: {e}") from None
    for path, lspec in spec.get("leaves", {}).items():
        if lspec.get("opaque"):
            continue
        try:
            current = model.get_submodule(path)
        except AttributeError:
            current = None
        if current is not None and _is_supported_leaf_type(current):
            try:
                if _full_spec(current, path) == lspec:
                    continue
            except ArchSpecError:
                pass
        new = build_module(lspec, path, skip_init=True)
        parent_path, _, field = path.rpartition(".")
        try:
            parent = model.get_submodule(parent_path) if parent_path else model
        except AttributeError:
            raise ArchSpecError(f"stored leaf {path!r} has no parent module in {spec.get('class')}") from None
        setattr(parent, field, new)
    want = model.state_dict()
    missing = [k for k in want if k not in state_dict]
    if missing:
        raise KeyError(missing[0])
    _check_shapes(state_dict, want)
    model.load_state_dict({k: state_dict[k] for k in want}, strict=True, assign=True)
    return model


def _check_shapes(src: dict, dst: dict) -> None:
    bad = [(k, tuple(src[k].shape), tuple(v.shape)) for k, v in dst.items()
           if k in src and tuple(src[k].shape) != tuple(v.shape)]
    if bad:
        raise ArchSpecError("shape mismatch: " + "; ".join(f"{k}: stored {a} vs model {b}" for k, a, b in bad[:5])
                            + (f" (+{len(bad) - 5} more)" if len(bad) > 5 else ""))
