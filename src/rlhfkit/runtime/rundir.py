"""The run folder: who may use it, what may be removed from it, and when it is first written.

A run folder (`output_dir`) holds `rlhfkit-run.json` (the marker that says rlhfkit made it),
`config.yaml`, `metrics.jsonl`, TensorBoard logs, `checkpoints/` and the final `model/` (`agent/` for
control tasks). The rules, in the order a run meets them:

1. `check_run_dir` (before any long set-up, read-only) says whether the folder can be used, and with
   `--resume` which checkpoint would continue: verified against the sizes and hashes recorded at
   save time; a damaged latest checkpoint falls back to the previous good one with a warning.
2. `claim_run_dir` (once the models are built) repeats those checks and takes an exclusive lock on
   `output_dir/.lock` for the life of the run (rank 0 under torchrun; every rank gets the same
   verdict). A second run into the same folder is refused with the holder's pid. The lock is an
   `flock`, so the kernel releases it when the process ends, also on kill -9. Temporary
   `.tmp-step-*` folders left by a kill during a save are removed then.
3. Only after the checkpoint was restored does `RunFolder.start` write anything: it replaces an old
   run (`overwrite=true`, and only a folder that holds an rlhfkit run), then writes the marker and
   `config.yaml`.

A folder whose run never produced a checkpoint or a model (it stopped during set-up or its first
step) counts as empty: the next identical command is accepted and replaces those leftovers.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from rlhfkit.config import dump_yaml, to_dict
from rlhfkit.errors import RlhfkitError
from rlhfkit.runtime.atomic import write_atomic
from rlhfkit.runtime.checkpoint import choose_checkpoint
from rlhfkit.runtime.distributed import DistInfo, barrier, broadcast_object

MARKER = "rlhfkit-run.json"
LOCK = ".lock"
OUTPUTS = ("checkpoints", "model", "agent", "value")
"""What makes a folder hold a run worth protecting: a checkpoint or a final model."""
LEFTOVERS = (MARKER, "config.yaml", "metrics.jsonl", "samples.jsonl", "tensorboard", "checkpoints")
"""What an unfinished start may have written (and a rerun replaces)."""

# Locks held by this process, by folder. A run that raised keeps its descriptor here, so the same
# process (a notebook, a test) can start the next run in that folder; flock locks belong to an open
# file, so a second open() of the lock file in this process would otherwise conflict with the first.
_HELD: dict[str, int] = {}


@dataclass
class RunFolder:
    path: Path
    resume_from: Path | None = None
    """The verified checkpoint folder to continue from (None for a new run)."""
    info: DistInfo = field(default_factory=DistInfo)

    def start(self, cfg: Any) -> None:
        """Write the run's first files; call once every set-up step that can fail has succeeded."""
        if self.info.is_main:
            if self.resume_from is None:
                _clear(self.path)
            elif (self.path / "config.yaml").is_file():
                _warn_config_changes(yaml.safe_load((self.path / "config.yaml").read_text()) or {}, to_dict(cfg))
            self.path.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path / MARKER, json.dumps({"rlhfkit_run": 1, "started": time.time(),
                                                          "resumed_from": str(self.resume_from or "")}) + "\n")
            write_atomic(self.path / "config.yaml", dump_yaml(cfg))
        barrier(self.info)

    def release(self) -> None:
        """Give up the lock (the end of a run; the process's end does the same)."""
        if self.info.is_main:
            fd = _HELD.pop(str(self.path.resolve()), None)
            if fd is not None:
                fcntl.flock(fd, fcntl.LOCK_UN)
                os.close(fd)


def check_run_dir(output_dir: str, *, resume: str | None, overwrite: bool, info: DistInfo) -> None:
    """Fail early (on every rank) if the run folder cannot be used or the checkpoint to resume is
    unusable; writes nothing. Recipes call it before their long set-up (models, DPO's reference pass)."""
    _verdict(output_dir, resume, overwrite, info, lock=False)


def claim_run_dir(output_dir: str, *, resume: str | None, overwrite: bool, info: DistInfo) -> RunFolder:
    """Check `output_dir`, lock it, choose and verify the checkpoint to resume from (rank 0 decides,
    every rank gets the verdict). Writes nothing but the lock file (and the folder that holds it)."""
    return _verdict(output_dir, resume, overwrite, info, lock=True)


def _verdict(output_dir: str, resume: str | None, overwrite: bool, info: DistInfo, *, lock: bool) -> RunFolder:
    problem, chosen = None, None
    if info.is_main:
        try:
            chosen = _claim_on_main(Path(output_dir), resume, overwrite, lock)
        except RlhfkitError as exc:
            problem = str(exc)
    problem, chosen = broadcast_object((problem, chosen), info)  # type: ignore[misc]
    if problem is not None:
        raise RlhfkitError(problem)
    return RunFolder(Path(output_dir), Path(chosen) if chosen else None, info)


def holds_run(path: Path) -> bool:
    """True when `path` has the output of an rlhfkit run: a checkpoint or a final model/agent, beside
    the marker (or, for folders written before the marker existed, beside config.yaml and
    metrics.jsonl: a project folder with a config.yaml and a model/ of its own is not a run)."""
    legacy = (path / "config.yaml").is_file() and (path / "metrics.jsonl").is_file()
    if not path.is_dir() or not ((path / MARKER).is_file() or legacy):
        return False
    if any((path / name).is_dir() for name in ("model", "agent")):
        return True
    checkpoints = path / "checkpoints"
    return checkpoints.is_dir() and any(p.name.startswith("step-") for p in checkpoints.iterdir())


def _claim_on_main(run_dir: Path, resume: str | None, overwrite: bool, lock: bool) -> str | None:
    text = str(run_dir).strip()
    if not text or run_dir.resolve() in (Path.cwd().resolve(), Path.home().resolve(), Path("/")):
        raise RlhfkitError(f"output_dir '{run_dir}' must name a folder for this run (not the current, home or root folder)")
    if run_dir.exists() and not run_dir.is_dir():
        raise RlhfkitError(f"output_dir '{run_dir}' is a file, not a folder; rlhfkit never replaces files. "
                           "Choose a folder path for the run.")
    above = next((p for p in run_dir.absolute().parents if p.exists()), None)
    if above is not None and not above.is_dir():
        raise RlhfkitError(f"output_dir '{run_dir}': {above} is a file, so no folder can be made below it")
    _probe_lock(run_dir)  # a busy folder is named as busy before anything else is said about it
    if resume is None:
        _check_new_run(run_dir, overwrite)
    elif not holds_run(run_dir):
        _check_foreign(run_dir, overwrite)  # --resume PATH writes into output_dir: never among a user's files
    if resume == "latest" and not holds_run(run_dir):
        raise RlhfkitError(f"--resume: no checkpoint found in {run_dir / 'checkpoints'}; start without --resume")
    if lock:
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RlhfkitError(f"output_dir '{run_dir}': cannot create the folder ({exc.strerror})") from None
        _lock(run_dir)
        _remove_stale_temporaries(run_dir)
    if resume is None:
        return None
    warn = (lambda msg: print(f"warning: {msg}", flush=True)) if lock else (lambda msg: None)
    return str(choose_checkpoint(run_dir, resume, warn=warn))


def _check_new_run(run_dir: Path, overwrite: bool) -> None:
    if not run_dir.is_dir():
        return
    if holds_run(run_dir):
        if not overwrite:
            raise RlhfkitError(f"{run_dir} already holds a run. Pass --resume to continue it, set overwrite=true "
                               "to replace it, or choose another output_dir.")
        return
    _check_foreign(run_dir, overwrite)


def _check_foreign(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder (not an rlhfkit run) that holds files rlhfkit did not write."""
    if not run_dir.is_dir():
        return
    ours = LEFTOVERS if (run_dir / MARKER).is_file() else ()  # without the marker, nothing here is ours
    others = [p.name for p in run_dir.iterdir() if p.name not in (*ours, LOCK)]
    if others:
        shown = ", ".join(sorted(others)[:5]) + (" ..." if len(others) > 5 else "")
        raise RlhfkitError(f"output_dir '{run_dir}' is a folder that holds other files ({shown}) and no rlhfkit run; "
                           "rlhfkit writes only into a new or empty folder or one of its own runs"
                           + (" (overwrite=true replaces only rlhfkit runs)" if overwrite else "")
                           + ". Choose another output_dir.")


def _probe_lock(run_dir: Path) -> None:
    """Raise if another process holds the folder's lock (take it for a moment, write nothing, let go)."""
    if str(run_dir.resolve()) in _HELD or not (run_dir / LOCK).is_file():
        return
    fd = _acquire(run_dir, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _lock(run_dir: Path) -> None:
    key = str(run_dir.resolve())
    if key in _HELD:
        return  # an earlier run of this process that raised; it cannot be running any more
    fd = _acquire(run_dir, os.O_RDWR | os.O_CREAT)
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _HELD[key] = fd


def _acquire(run_dir: Path, flags: int) -> int:
    """An open descriptor of the lock file holding the exclusive lock, or the error naming the holder."""
    fd = os.open(run_dir / LOCK, flags, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise RlhfkitError(f"output_dir '{run_dir}' is in use by another rlhfkit run (pid {holder}); wait for "
                               "it to end, or choose another output_dir") from None
        raise RlhfkitError(f"output_dir '{run_dir}': cannot lock {run_dir / LOCK} ({exc.strerror})") from None
    return fd


def _remove_stale_temporaries(run_dir: Path) -> None:
    """Folders of checkpoint or final-model saves that a kill interrupted (we hold the lock: nobody is
    writing them)."""
    root = run_dir / "checkpoints"
    stale = [*root.glob(".tmp-step-*")] if root.is_dir() else []
    stale += [p for name in ("model", "agent", "value") for p in run_dir.glob(f".{name}.tmp-*")]
    for tmp in stale:
        shutil.rmtree(tmp, ignore_errors=True)


def _clear(run_dir: Path) -> None:
    """Before a new run: remove an old run (claim allowed it: overwrite=true) or an unfinished start's
    leftovers. Only what rlhfkit writes goes; the lock file (we hold it) and anything else stay."""
    if not run_dir.is_dir():
        return
    whole_run = holds_run(run_dir)
    if not whole_run and not (run_dir / MARKER).is_file():
        return  # new or empty (claim refused anything else)
    ours = (*LEFTOVERS, *OUTPUTS) if whole_run else LEFTOVERS  # a user's own files in a run folder stay
    for entry in run_dir.iterdir():
        if entry.name not in ours:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


_HARMLESS = {"max_steps", "epochs", "eval_every", "save_every", "save_total_limit", "log_every", "progress", "output_dir",
             "sample_every", "overwrite"}


def _warn_config_changes(old: dict, new: dict, prefix: str = "") -> None:
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            _warn_config_changes(a, b, prefix + key + ".")
        elif a != b and key not in _HARMLESS:
            print(f"warning: resuming with {prefix}{key}={b!r} (the run started with {a!r})", flush=True)
