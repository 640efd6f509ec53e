"""Training checkpoints: written atomically, read back without unpickling, resumed exactly.

A checkpoint is a directory ``<root>/step-<N>/`` holding

* ``model.safetensors``: the trained tensors (and buffers) of the training model;
* ``optimizer.safetensors`` + ``optimizer.json``: the optimizer state, tensors and the rest apart;
* ``rng-rank<r>.safetensors`` + ``rng-rank<r>.json``: every random generator of each process;
* ``state.json``: step, data position, scheduler state, counters. Written last.

Everything is first written into ``<root>/.tmp-step-<N>/`` and the directory is renamed into place
when complete, so a crash leaves either the whole checkpoint or none of it (a stale temporary
directory is ignored and replaced by the next save). Nothing here unpickles: JSON and safetensors
only, so a checkpoint from anywhere is safe to open.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from viq.errors import WeightsError
from viq.weights.io import write_json

STEP_DIR = re.compile(r"^step-(\d+)$")
STATE_FILE = "state.json"


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:08d}"


def tmp_dir(root: Path, step: int) -> Path:
    return Path(root) / f".tmp-step-{step:08d}"


# ---- tensors and JSON -------------------------------------------------------------------------

def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path))
    _fsync(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:
        raise WeightsError(f"{path}: unreadable checkpoint file ({exc})") from None


def save_json(obj: Any, path: Path) -> None:
    with open(path, "w") as fh:
        json.dump(obj, fh, indent=1)
        fh.flush()
        os.fsync(fh.fileno())


def load_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise WeightsError(f"{path}: unreadable checkpoint file ({exc})") from None


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---- optimizer state --------------------------------------------------------------------------

def flatten_optimizer(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """torch optimizer state -> (tensors ``state.<param>.<key>``, JSON-able rest)."""
    tensors, meta_state = {}, {}
    for pid, entry in state_dict["state"].items():
        plain = {}
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{pid}.{key}"] = value
            else:
                plain[key] = value
        meta_state[str(pid)] = plain
    return tensors, {"state": meta_state, "param_groups": state_dict["param_groups"]}


def unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {int(pid): dict(plain) for pid, plain in meta["state"].items()}
    for name, value in tensors.items():
        _, pid, key = name.split(".", 2)
        state.setdefault(int(pid), {})[key] = value
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if isinstance(g.get("betas"), list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# ---- random generators ------------------------------------------------------------------------

def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """Every generator this process uses: torch CPU and CUDA, Python's, NumPy's."""
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = s
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.int32).copy())
    meta = {"python": [version, list(internal), gauss], "numpy": [kind, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def restore_rng(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["torch"])
    cuda = sorted((k for k in tensors if k.startswith("cuda.")), key=lambda k: int(k.split(".")[1]))
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensors[k] for k in cuda][: torch.cuda.device_count()])
    version, internal, gauss = meta["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((kind, tensors["numpy"].numpy().view(np.uint32), pos, has_gauss, cached))


# ---- writing ----------------------------------------------------------------------------------

def begin(root: Path, step: int) -> Path:
    """Main process: a fresh, empty temporary directory for checkpoint ``step``."""
    tmp = tmp_dir(root, step)
    if tmp.exists():
        shutil.rmtree(tmp)  # left by a crashed save
    tmp.mkdir(parents=True)
    return tmp


def write_rank_rng(tmp: Path, rank: int) -> None:
    tmp.mkdir(parents=True, exist_ok=True)  # a node whose disk the main process does not share
    tensors, meta = capture_rng()
    save_tensors(tensors, tmp / f"rng-rank{rank}.safetensors")
    save_json(meta, tmp / f"rng-rank{rank}.json")


def write_main(tmp: Path, model_tensors: dict[str, torch.Tensor], optimizer_state: Optional[dict],
               state: dict) -> None:
    """Main process: model, optimizer and finally state.json (the marker of a complete write)."""
    save_tensors(model_tensors, tmp / "model.safetensors")
    if optimizer_state is not None:
        tensors, meta = flatten_optimizer(optimizer_state)
        save_tensors(tensors, tmp / "optimizer.safetensors")
        save_json(meta, tmp / "optimizer.json")
    save_json(state, tmp / STATE_FILE)


def commit(tmp: Path, root: Path, step: int) -> Path:
    """Rename the complete temporary directory into place (atomic on one filesystem)."""
    if not (tmp / STATE_FILE).is_file():
        raise WeightsError(f"{tmp}: incomplete checkpoint (no {STATE_FILE}); not committed")
    final = step_dir(root, step)
    _fsync(tmp)
    if final.exists():  # the same step saved twice: swap, then drop the old copy
        old = Path(root) / f".old-{final.name}"
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
    _fsync(Path(root))
    return final


def abort(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)


def write_checkpoint(root: Path, step: int, model_tensors: dict[str, torch.Tensor],
                     optimizer_state: Optional[dict], state: dict, rank: int = 0) -> Path:
    """The whole protocol for a single process; a failure leaves no ``step-<N>`` behind."""
    tmp = begin(Path(root), step)
    try:
        write_rank_rng(tmp, rank)
        write_main(tmp, model_tensors, optimizer_state, state)
        return commit(tmp, Path(root), step)
    except BaseException:
        abort(tmp)
        raise


def save_step(acc, root: Path, step: int, write_main_files, keep_last: int) -> Path:
    """The whole atomic save protocol, for every process of a run.

    Main process opens a temp dir; every process writes its RNG state; main process writes the rest
    (``write_main_files(tmp)``), renames the temp dir into place and prunes old checkpoints. A
    failure removes the temp dir, so only complete checkpoints ever carry a step name.
    """
    tmp = tmp_dir(root, step)
    main = acc.is_main_process
    try:
        if main:
            begin(root, step)
        acc.wait_for_everyone()
        write_rank_rng(tmp, acc.process_index)
        acc.wait_for_everyone()
        if main:
            write_main_files(tmp)
            commit(tmp, root, step)
            prune(root, keep_last)
    except BaseException:
        if main:
            abort(tmp)
        raise
    acc.wait_for_everyone()
    return step_dir(root, step)


def prune(root: Path, keep: int) -> list[Path]:
    """Delete all but the ``keep`` newest complete checkpoints; returns the deleted ones."""
    done = complete_checkpoints(root)
    gone = done[:-keep] if keep > 0 else []
    for p in gone:
        shutil.rmtree(p, ignore_errors=True)
    return gone


# ---- reading ----------------------------------------------------------------------------------

def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints under root, oldest first (temporary directories are never listed)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: Path) -> Optional[Path]:
    done = complete_checkpoints(root)
    return done[-1] if done else None


@dataclass
class Checkpoint:
    path: Path
    state: dict
    model: dict[str, torch.Tensor]

    def optimizer_state(self) -> Optional[dict]:
        if not (self.path / "optimizer.safetensors").is_file():
            return None
        return unflatten_optimizer(load_tensors(self.path / "optimizer.safetensors"),
                                   load_json(self.path / "optimizer.json"))

    def restore_rng(self, rank: int) -> bool:
        """Restore this rank's generators; False when the checkpoint has none for it."""
        t = self.path / f"rng-rank{rank}.safetensors"
        if not t.is_file():
            return False
        restore_rng(load_tensors(t), load_json(self.path / f"rng-rank{rank}.json"))
        return True


def read_checkpoint(path: Path) -> Checkpoint:
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        raise WeightsError(f"{path}: not a complete checkpoint (no {STATE_FILE})")
    return Checkpoint(path, load_json(path / STATE_FILE), load_tensors(path / "model.safetensors"))


def open_for_resume(root: Path, fingerprint: Optional[str] = None, task: Optional[str] = None) -> Optional[Checkpoint]:
    """The newest complete checkpoint under ``root`` (None: start fresh), checked to belong to ``task``.

    A checkpoint written by a different recipe is still resumed (the caller may have changed, say,
    max_steps on purpose); the mismatch is logged.
    """
    import logging

    log = logging.getLogger("viq.train")
    last = latest_checkpoint(root)
    if last is None:
        log.info("resume asked but no checkpoint in %s: starting fresh", root)
        return None
    c = read_checkpoint(last)
    if task is not None and c.state.get("task") not in (None, task):
        from viq.errors import WeightsError

        raise WeightsError(f"{last} was written by run.task {c.state.get('task')!r}, not {task}")
    if fingerprint and c.state.get("fingerprint") and c.state["fingerprint"] != fingerprint:
        log.warning("%s was written by a different recipe; continuing anyway", last)
    log.info("resuming from %s (step %s)", last, c.state.get("step"))
    return c


def write_state_file(obj: dict, path: Path) -> None:
    """Atomic small JSON (metrics, summaries)."""
    write_json(obj, path)
