"""Reading and writing tensor files safely.

Never unpickles code: ``.pth`` files load with ``torch.load(weights_only=True)`` (memory-mapped, so
only the tensors actually used are read), what viq writes is safetensors, and every write goes to a
temporary file that is renamed into place when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

from viq.errors import WeightsError


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def publish(tmp, path) -> None:
    """Give a finished temp file normal permissions (mkstemp makes it 0600) and rename it into place."""
    os.chmod(tmp, 0o666 & ~_umask())
    os.replace(tmp, path)


def read_tensors(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from ``.pth``/``.pt``/``.bin`` (weights only) or ``.safetensors``."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"{path}: weights file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path))
        except Exception as exc:
            raise WeightsError(f"{path}: not a readable safetensors file ({exc})") from None
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # legacy (non-zip) serialisation cannot be memory-mapped
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsError(f"{path}: cannot be read as a weights-only checkpoint ({reason}). "
                           "viq never unpickles code; re-save it as a plain state dict or safetensors") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: expected a state dict (name -> tensor)")
    return obj


def copy_named(own: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor], where: str, why: str = "") -> None:
    """Copy ``tensors`` into a model's ``state_dict()`` by name: a subset may be given (the rest keeps its
    values), but a name the model lacks or a shape it does not have is an error naming the tensor."""
    unknown = [k for k in tensors if k not in own]
    if unknown:
        raise WeightsError(f"{where}: {len(unknown)} tensors this model does not have, e.g. {unknown[0]}{why}")
    with torch.no_grad():
        for k, v in tensors.items():
            if own[k].shape != v.shape:
                raise WeightsError(f"{where}: {k} is {tuple(v.shape)}, the model's {tuple(own[k].shape)}")
            own[k].copy_(v.to(own[k].dtype))


def write_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata=None) -> int:
    """Atomic safetensors write; returns the bytes written."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def write_json(obj, path: str | os.PathLike) -> None:
    """Atomic JSON write."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as fh:
            json.dump(obj, fh, indent=2, sort_keys=False, default=str)
            fh.write("\n")
        publish(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def tensors_fingerprint(tensors: dict[str, torch.Tensor], sample: int = 1024) -> str:
    """A cheap, dtype-independent identity of a set of weights.

    Hashes names, shapes and the float32 values of the first and last ``sample`` elements of each
    tensor (touching a few pages of a memory-mapped file, not all of it). Equal weights stored as
    float16 or float32 give the same fingerprint. It identifies weights; ``viqctl verify`` is the
    full check.
    """
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach()
        flat = t.reshape(-1)
        part = flat if flat.numel() <= 2 * sample else torch.cat((flat[:sample], flat[-sample:]))
        h.update(key.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(part.to(torch.float32).cpu().contiguous().numpy().tobytes())
    return h.hexdigest()
