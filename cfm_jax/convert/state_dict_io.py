"""Reading PyTorch checkpoints as numpy state dicts, and flat <-> nested param trees.

Shared by the converters (`fmboost_unet`, `vae`). `.safetensors` files are read
without PyTorch; pickled `.ckpt`/`.pt`/`.pth`/`.bin` files need torch and are loaded
with `weights_only=True` (no arbitrary code from the file runs).
"""
import os
import pickle
import re
from typing import Any, Dict, Mapping, Optional, Tuple

import ml_dtypes  # ships with JAX
import numpy as np

_TORCH_PIN = "torch==2.13.0"




def strip_collection(path: Tuple[str, ...]) -> Tuple[str, ...]:
    # Accept both the params tree and the {'params': ...} variables tree.
    return path[1:] if path and path[0] == "params" else path


def unwrap_lightning(state_dict: Mapping) -> Mapping:
    """The weights of a Lightning checkpoint (`{"state_dict": {...}, ...}`), else the dict."""
    inner = state_dict.get("state_dict") if isinstance(state_dict, Mapping) else None
    return inner if isinstance(inner, Mapping) else state_dict




def _to_numpy(value) -> Optional[np.ndarray]:
    """float32 (floating) or native-dtype numpy array of a torch tensor / array; None otherwise."""
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    if isinstance(value, np.ndarray):
        return value.astype(np.float32) if np.issubdtype(value.dtype, np.floating) or \
            value.dtype.name == "bfloat16" else value
    return None


def _corrupt_error(path: str, err: BaseException, kind: str) -> ValueError:
    size = os.path.getsize(path)
    text = str(err).strip()
    detail = re.search(r"WeightsUnpickler error:\s*(.+)", text)  # torch's first line is boilerplate
    first = detail.group(1).strip() if detail else text.splitlines()[0] if text else type(err).__name__
    return ValueError(f"cannot read {kind} file {path} ({size} bytes): {type(err).__name__}: "
                      f"{first.rstrip('.')}. The file is truncated or corrupt (re-download or re-save it).")


def _load_safetensors(path: str) -> Dict[str, np.ndarray]:
    try:
        import safetensors  # lazy: only .safetensors files need it; a missing package is reported here
        import safetensors.numpy
    except ImportError as e:  # pragma: no cover - safetensors is a listed dependency
        raise ImportError(f"reading {path} needs the 'safetensors' package (pip install safetensors)") from e
    try:
        try:
            return safetensors.numpy.load_file(path)
        except TypeError as e:  # numpy has no bfloat16: read the raw bytes, view them with ml_dtypes
            if "bfloat16" not in str(e):
                raise
        dtypes = dict(BF16=ml_dtypes.bfloat16, F16=np.float16, F32=np.float32, F64=np.float64,
                      I8=np.int8, I16=np.int16, I32=np.int32, I64=np.int64, U8=np.uint8, BOOL=np.bool_)
        with open(path, "rb") as f:
            data = f.read()
        out = {}
        for name, view in safetensors.deserialize(data):
            if view["dtype"] not in dtypes:
                raise ValueError(f"{path}: tensor {name!r} has dtype {view['dtype']}, which cannot be read")
            out[name] = np.frombuffer(view["data"], dtype=dtypes[view["dtype"]]).reshape(view["shape"])
        return out
    except safetensors.SafetensorError as e:
        raise _corrupt_error(path, e, "safetensors") from e


def _not_a_torch_file(path: str) -> Optional[str]:
    """Why ``path`` cannot be a ``torch.save`` file, judged from its first bytes, or None when it
    could be one: torch.save writes a zip archive (``PK``), older versions a pickle (``0x80``)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK") or head.startswith(b"\x80"):
        return None
    if not head:
        what = "it is empty"
    elif head.lstrip()[:1] in (b"<", b"{"):
        what = "it is text (HTML, XML or JSON: a failed download or the wrong file?)"
    elif len(head) >= 10 and head[8:10] == b'{"':
        what = "it looks like a .safetensors file: give it the .safetensors extension"
    else:
        what = f"it starts with bytes {head[:8].hex(' ')}"
    return (f"{path} ({os.path.getsize(path)} bytes) is not a PyTorch checkpoint: torch.save writes a zip "
            f"archive or a pickle, and {what}. The file is corrupt or another kind of file: re-download or "
            "re-save it.")


def _load_torch(path: str) -> Any:
    try:
        import torch  # lazy: optional (only pickled checkpoints need it) and slow to import
    except ImportError as e:
        raise ImportError(f"reading {path} needs PyTorch: pip install {_TORCH_PIN} (CPU is enough), "
                          "or convert the checkpoint to .safetensors once where PyTorch is installed") from e
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        not_torch = _not_a_torch_file(path)
        if not_torch:
            raise ValueError(not_torch) from e
        # weights_only=True refuses a class it does not know ("Unsupported global: GLOBAL module.Class");
        # every other failure of a zip or pickle file is damage ("Unsupported operand", EOF, bad zip)
        disallowed = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if isinstance(e, pickle.UnpicklingError) and disallowed:
            raise ValueError(
                f"cannot read checkpoint {path} with torch.load(weights_only=True): it holds Python objects "
                f"other than tensors and plain containers ({disallowed.group(1)} here; typically a pickled "
                "config). Re-save just its state dict, or convert it to .safetensors.") from e
        raise _corrupt_error(path, e, "PyTorch checkpoint") from e


def load_state_dict(path) -> Dict[str, np.ndarray]:
    """The weights in a checkpoint file as numpy arrays (floating ones as float32).

    `.safetensors` is read with `safetensors` (no PyTorch needed; bf16/fp16 upcast);
    `.ckpt`, `.pt`, `.pth` and `.bin` with `torch.load(map_location="cpu",
    weights_only=True)`. A Lightning checkpoint's `state_dict` is returned (its other
    entries, such as `global_step`, are not weights); non-tensor entries are skipped.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no checkpoint file at {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        raw = _load_safetensors(path)
    elif ext in (".ckpt", ".pt", ".pth", ".bin"):
        raw = _load_torch(path)
    else:
        raise ValueError(f"unknown checkpoint extension {ext!r} of {path}; expected .safetensors, "
                         ".ckpt, .pt, .pth or .bin")
    if not isinstance(raw, Mapping):
        raise ValueError(f"{path} holds a {type(raw).__name__}, not a state dict (a dict of tensors, as "
                         "torch.save(model.state_dict(), path) or a Lightning checkpoint writes).")
    out = {}
    for key, value in unwrap_lightning(raw).items():
        array = _to_numpy(value)
        if array is not None:
            out[key] = array
    return out


def mismatch_lines(what: str, missing, remaining: Mapping, wrong_shape) -> list:
    """The lines of a converter's error: a header with the counts, then every missing,
    unexpected (with its shape) and wrong-shape key; callers append hints and raise."""
    lines = [f"{what} ({len(missing)} missing, {len(remaining)} unexpected, {len(wrong_shape)} wrong shape):"]
    lines += [f"  missing: {m}" for m in missing]
    lines += [f"  unexpected: {k} {tuple(np.shape(v))}" for k, v in sorted(remaining.items())]
    lines += [f"  wrong shape: {w}" for w in wrong_shape]
    return lines
