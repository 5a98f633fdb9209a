"""Checkpoints: ``ganslim.save(model, path)`` / ``ganslim.load(path)``.

A checkpoint is a plain ``.safetensors`` file. Its string metadata holds ``"ganslim"``: a JSON
document with the format version, the ganslim/torch versions, the architecture spec of
:mod:`ganslim.deployment.archspec` (so a pruned model reloads *without* its Python class), the storage dtype,
tensor aliases, a SHA-256 of the tensor data and the user's ``metadata``. Tensor keys are the
model's own ``state_dict`` keys; fx constants and user extras live under reserved prefixes.

Writes are atomic (temporary file in the same directory + ``os.replace``). Every problem a
reader can hit is a :class:`CheckpointError` whose one-line message names the file.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import secrets
from typing import Any, Mapping

import torch
import torch.nn as nn

__all__ = ["save", "load", "read_metadata", "load_extra_tensors", "CheckpointError", "FORMAT_VERSION"]

FORMAT_VERSION = 1
_META_KEY = "ganslim"
_ATTR_PREFIX = "__ganslim__.attr."
_EXTRA_PREFIX = "__ganslim__.extra."
_QUANT_PREFIX = "__ganslim__.quant."  # quantizer ranges (amax) of a QAT model
_PICKLE_HINT = ("this looks like a torch.save file, not safetensors; use torch.load + load_state_dict, "
                "or ganslim.load(path, model=...) after re-saving the weights with ganslim.save")


class CheckpointError(ValueError):
    """A checkpoint cannot be written, read or applied; the message names the file."""


def _ganslim_version() -> str:
    try:
        from .. import __version__

        return str(__version__)
    except Exception:  # pragma: no cover
        return "unknown"


def _dtype_name(dt: torch.dtype) -> str:
    return str(dt).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dt = getattr(torch, str(name), None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r}")
    return dt


# --------------------------------------------------------------------------------------------------
# hashing
# --------------------------------------------------------------------------------------------------

def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(tensors):
        t = tensors[k]
        h.update(f"{k}|{_dtype_name(t.dtype)}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------

def _prepare_tensors(named: list[tuple[str, torch.Tensor]]):
    """Detach, move to CPU, make contiguous. The same tensor object under several keys is stored
    once (``aliases``: dup key -> stored key); other storage sharing is broken by cloning, since
    safetensors refuses aliasing."""
    out: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_id: dict[int, str] = {}
    storages: set[int] = set()
    for key, t in named:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"entry {key!r} is a {type(t).__name__}, not a tensor")
        if not key.startswith(_EXTRA_PREFIX):  # extras are returned as given, never aliased
            if id(t) in by_id:
                aliases[key] = by_id[id(t)]
                continue
            by_id[id(t)] = key
        v = t.detach().cpu().contiguous()
        if v.numel():
            storage = v.untyped_storage()
            if storage.data_ptr() in storages or storage.nbytes() != v.numel() * v.element_size():
                v = v.clone()
            storages.add(v.untyped_storage().data_ptr())
        out[key] = v
    return out, aliases


def save(model: nn.Module, path: str | os.PathLike, *, metadata: dict | None = None,
         dtype: torch.dtype | None = None, extra_tensors: Mapping[str, torch.Tensor] | None = None
         ) -> pathlib.Path:
    """Save ``model`` (weights + architecture) to ``path`` as safetensors; returns the path.

    ``metadata``: JSON-serialisable dict stored alongside (read back with :func:`read_metadata`).
    ``dtype``: store floating-point tensors in this dtype (e.g. ``torch.float16`` halves the file).
    ``extra_tensors``: additional named tensors (read back with :func:`load_extra_tensors`).
    A quantized (QAT) model from :mod:`ganslim.deployment.quantization` is stored as its float twin plus its
    quantization config and ranges, so :func:`load` gives back the same fake-quantized model.
    The file is replaced atomically; on failure an existing file is left untouched.
    """
    from safetensors import torch as st

    from . import archspec

    path = pathlib.Path(path)
    if not isinstance(model, nn.Module):
        raise CheckpointError(f"{path}: expected an nn.Module to save, got {type(model).__name__}")
    if path.is_dir():
        raise CheckpointError(f"{path}: is a directory")
    if not path.parent.is_dir():
        raise CheckpointError(f"{path}: directory {path.parent} does not exist")
    if dtype is not None and (not isinstance(dtype, torch.dtype) or not dtype.is_floating_point):
        raise CheckpointError(f"{path}: dtype must be a floating-point torch.dtype, got {dtype!r}")

    quant_meta, quant_tensors = None, {}
    from . import quantization

    if quantization.is_quantized(model):
        quant_meta, quant_tensors = quantization.quant_state(model)
        model = quantization.to_float(model, quantized_weights=False)
    state = model.state_dict(keep_vars=True)
    try:
        spec = archspec.model_spec(model, persistent_keys=state.keys())
        fx_module = spec.pop("_fx_module", None)
        arch_error = None
    except archspec.ArchSpecError as e:
        spec, fx_module, arch_error = None, None, str(e)
        import warnings

        warnings.warn(f"ganslim.save({path}): the architecture could not be recorded ({e}); the file "
                      "can only be loaded with ganslim.load(path, model=...)", stacklevel=2)

    named: list[tuple[str, torch.Tensor]] = list(state.items())
    if spec is not None and spec["mode"] == "fx":
        for target, info in spec["attrs"].items():
            if not info["in_state_dict"]:
                obj: Any = fx_module
                for part in target.split("."):
                    obj = getattr(obj, part)
                named.append((_ATTR_PREFIX + target, obj))
    for k, t in (extra_tensors or {}).items():
        if not isinstance(k, str) or not isinstance(t, torch.Tensor):
            raise CheckpointError(f"{path}: extra_tensors must map str -> Tensor (bad entry {k!r})")
        named.append((_EXTRA_PREFIX + k, t))
    named.extend((_QUANT_PREFIX + k, t) for k, t in quant_tensors.items())
    try:
        tensors, aliases = _prepare_tensors(named)
    except TypeError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if dtype is not None:  # extras and quantizer ranges keep their dtype; model tensors are cast
        tensors = {k: (v.to(dtype) if v.is_floating_point() and not k.startswith((_EXTRA_PREFIX, _QUANT_PREFIX)) else v)
                   for k, v in tensors.items()}

    header = {
        "format_version": FORMAT_VERSION,
        "ganslim_version": _ganslim_version(),
        "torch_version": torch.__version__.split("+")[0],
        "dtype": _dtype_name(dtype) if dtype is not None else None,
        "arch": spec,
        "arch_error": arch_error,
        "aliases": aliases,
        "sha256": _digest(tensors),
        "metadata": metadata if metadata is not None else {},
        "quant": quant_meta,
    }
    try:
        header_json = json.dumps(header, allow_nan=False, separators=(",", ":"))
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{path}: metadata must be JSON-serialisable (finite floats): {e}") from None

    tmp = path.parent / f".{path.name}.{secrets.token_hex(6)}.tmp"
    try:
        # O_EXCL: never follow/clobber something else; mode 0o666 honours the umask.
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        st.save_file(tensors, str(tmp), metadata={_META_KEY: header_json, "format": "pt"})
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        if isinstance(e, Exception) and not isinstance(e, CheckpointError):
            raise CheckpointError(f"{path}: writing failed ({type(e).__name__}: {e}); "
                                  "any existing file was left unchanged") from e
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:  # pragma: no cover - platforms without directory fsync
        pass
    return path


# --------------------------------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------------------------------

def _fail(path: pathlib.Path, msg: str) -> CheckpointError:
    return CheckpointError(f"{path}: {msg}")


def _read_header(path: pathlib.Path) -> tuple[dict, dict]:
    """Validate the safetensors framing; return (tensor table, string metadata)."""
    if not path.exists():
        raise _fail(path, "no such file")
    if path.is_dir():
        raise _fail(path, "is a directory, not a checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        raw = f.read(n) if 0 <= n <= min(size - 8, 100_000_000) else b""
    if not raw.startswith(b"{"):
        # Not a readable safetensors header: say what it looks like instead.
        if head[:4] == b"PK\x03\x04" or (head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05")):
            raise _fail(path, _PICKLE_HINT)
        if len(head) < 8:
            raise _fail(path, f"file is {size} bytes, too short to be a safetensors checkpoint")
        if n > 100_000_000:
            raise _fail(path, f"not a safetensors file (header length {n} exceeds file size {size})")
        if n > size - 8:
            raise _fail(path, f"file is truncated or corrupted (header of {n} bytes, file has {size})")
        raise _fail(path, "not a safetensors file, or its header is corrupted")
    try:
        table = json.loads(raw.decode("utf-8"))
        if not isinstance(table, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _fail(path, f"corrupted safetensors header ({type(e).__name__}: {e})") from None
    meta = table.pop("__metadata__", None) or {}
    if not isinstance(meta, dict):
        raise _fail(path, "corrupted safetensors header (bad __metadata__)")
    end = 0
    for k, info in table.items():
        try:
            a, b = info["data_offsets"]
            end = max(end, int(b))
        except Exception:
            raise _fail(path, f"corrupted safetensors header (bad entry {k!r})") from None
    data = size - 8 - n
    if end > data:
        raise _fail(path, f"file is truncated: header promises {end} bytes of tensor data, file holds {data}")
    if end < data:
        raise _fail(path, f"file is corrupted: {data - end} unexpected bytes after the tensor data")
    return table, meta


def _ganslim_header(path: pathlib.Path, meta: dict, required: bool) -> dict | None:
    raw = meta.get(_META_KEY)
    if raw is None:
        if required:
            raise _fail(path, "safetensors file without ganslim metadata (a plain state dict); the "
                              "architecture is unknown, so load it with ganslim.load(path, model=...)")
        return None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"corrupted ganslim metadata ({e})") from None
    version = header.get("format_version")
    if not isinstance(version, int):
        raise _fail(path, "corrupted ganslim metadata (no format_version)")
    if version > FORMAT_VERSION:
        raise _fail(path, f"checkpoint format {version} was written by a newer ganslim "
                          f"({header.get('ganslim_version')}); this one reads format <= {FORMAT_VERSION}")
    return header


def _read_tensors(path: pathlib.Path, header: dict | None) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        # Clone: safetensors hands out tensors backed by a shared mmap of the file, so a later in-place
        # rewrite of the file would silently change (or, if truncated, crash) the loaded model.
        with safe_open(str(path), framework="pt", device="cpu") as f:
            tensors = {k: f.get_tensor(k).clone() for k in f.keys()}
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _fail(path, f"corrupted safetensors file ({msg})") from None
    if header is not None and header.get("sha256") and _digest(tensors) != header["sha256"]:
        raise _fail(path, "tensor data is corrupted (SHA-256 mismatch)")
    return tensors


def read_metadata(path: str | os.PathLike) -> dict:
    """The ganslim header of a checkpoint, without loading tensors.

    Keys: ``format_version``, ``ganslim_version``, ``torch_version``, ``dtype`` (storage dtype or
    None), ``arch`` (architecture spec), ``metadata`` (the user's dict given to :func:`save`), ...
    For a plain safetensors file: ``{"format_version": None, "metadata": <its string metadata>}``.
    """
    path = pathlib.Path(path)
    _, meta = _read_header(path)
    header = _ganslim_header(path, meta, required=False)
    if header is None:
        return {"format_version": None, "metadata": dict(meta)}
    return header


def load_extra_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The ``extra_tensors`` given to :func:`save` (empty dict if none)."""
    path = pathlib.Path(path)
    _, meta = _read_header(path)
    header = _ganslim_header(path, meta, required=False)
    tensors = _read_tensors(path, header)
    return {k[len(_EXTRA_PREFIX):]: v for k, v in tensors.items() if k.startswith(_EXTRA_PREFIX)}


def _split(tensors: dict, header: dict | None, dtype: torch.dtype | None):
    """(state_dict entries, fx attr tensors) with aliases re-expanded and floats cast to ``dtype``."""
    tensors = dict(tensors)
    for dup, canon in ((header or {}).get("aliases") or {}).items():
        if canon in tensors:
            tensors[dup] = tensors[canon]
    cast: dict[int, torch.Tensor] = {}  # keep aliases aliased after casting
    state, attrs = {}, {}
    for k, v in tensors.items():
        if k.startswith((_EXTRA_PREFIX, _QUANT_PREFIX)):
            continue
        if dtype is not None and v.is_floating_point() and v.dtype != dtype:
            v = cast.setdefault(id(v), v.to(dtype))
        if k.startswith(_ATTR_PREFIX):
            attrs[k[len(_ATTR_PREFIX):]] = v
        else:
            state[k] = v
    return state, attrs


def _retie(model: nn.Module, aliases: dict) -> None:
    """Re-share parameters that were one object at save time (tied weights)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    for dup, canon in aliases.items():
        if dup in params and canon in params and params[dup] is not params[canon]:
            owner_path, _, field = dup.rpartition(".")
            owner = model.get_submodule(owner_path) if owner_path else model
            setattr(owner, field, params[canon])


def _load_into(path: pathlib.Path, model: nn.Module, state: dict, strict: bool) -> None:
    own = model.state_dict()
    bad = [(k, tuple(state[k].shape), tuple(v.shape)) for k, v in own.items()
           if k in state and tuple(state[k].shape) != tuple(v.shape)]
    if bad:
        shown = "; ".join(f"{k}: file {a} vs model {b}" for k, a, b in bad[:3])
        more = f" (+{len(bad) - 3} more)" if len(bad) > 3 else ""
        raise _fail(path, f"shape mismatch for {len(bad)} tensor(s): {shown}{more}")
    if strict:
        missing = [k for k in own if k not in state]
        unexpected = [k for k in state if k not in own]
        if missing or unexpected:
            parts = []
            if missing:
                parts.append(f"missing key(s) {missing[:5]}" + (" ..." if len(missing) > 5 else ""))
            if unexpected:
                parts.append(f"unexpected key(s) {unexpected[:5]}" + (" ..." if len(unexpected) > 5 else ""))
            raise _fail(path, "; ".join(parts) + " (pass strict=False to ignore)")
    try:
        model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)
    except Exception as e:
        raise _fail(path, f"cannot load weights: {str(e).splitlines()[0]}") from None


def load(path: str | os.PathLike, *, model: nn.Module | None = None, map_location: Any = "cpu",
         dtype: torch.dtype | None = torch.float32, strict: bool = True) -> nn.Module:
    """Load a checkpoint written by :func:`save`; returns the model in eval mode.

    Without ``model`` the architecture is rebuilt from the stored spec (no user class needed for
    fx-traced models). With ``model`` the weights are loaded into it (any safetensors state dict
    works then); ``strict`` controls missing/unexpected keys.
    ``dtype``: floating-point tensors are cast to it (default float32, so fp16-stored weights come
    back as float32); ``None`` keeps the stored dtype. With ``model`` given, its own tensors keep
    their dtypes (values are copied into them).
    """
    from . import archspec

    path = pathlib.Path(path)
    _, meta = _read_header(path)
    header = _ganslim_header(path, meta, required=model is None)
    tensors = _read_tensors(path, header)
    state, attrs = _split(tensors, header, dtype if model is None else None)
    aliases = (header or {}).get("aliases") or {}

    if model is not None:
        if not isinstance(model, nn.Module):
            raise _fail(path, f"model= must be an nn.Module, got {type(model).__name__}")
        _load_into(path, model, state, strict)
        _retie(model, aliases)
    else:
        spec = header.get("arch")
        if spec is None:
            why = header.get("arch_error") or "no architecture was stored"
            raise _fail(path, f"the architecture was not recorded at save time ({why}); "
                              "load it with ganslim.load(path, model=...)")
        try:
            model = archspec.build_model(spec, state, attrs)
        except KeyError as e:
            raise _fail(path, f"missing tensor {e.args[0]!r} needed by the stored architecture") from None
        except archspec.ArchSpecError as e:
            raise _fail(path, str(e)) from None
        except Exception as e:
            raise _fail(path, f"cannot rebuild the model ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        _retie(model, aliases)
    quant_meta = (header or {}).get("quant")
    if quant_meta:
        from . import quantization

        amax = {k[len(_QUANT_PREFIX):]: v.float() for k, v in tensors.items() if k.startswith(_QUANT_PREFIX)}
        try:
            model = quantization.restore(model, quant_meta, amax)
        except ImportError:
            raise
        except Exception as e:
            raise _fail(path, f"cannot restore the quantizers ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if map_location is not None:
        model.to(map_location)
    return model.eval()
