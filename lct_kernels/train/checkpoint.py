"""Checkpoints: atomic writes, keep-last-k, and clear errors for missing or corrupt files.

A checkpoint is one ``torch.save`` dict written to ``ckpt-<step>.pt.tmp``, flushed
to disk, then renamed over ``ckpt-<step>.pt`` (a rename is atomic on POSIX), so a
crash mid-write never leaves a truncated ``.pt``.  Only the newest ``keep``
checkpoints are kept; older ones are deleted after the new one is in place.
"""

import os
import re
from pathlib import Path

import torch

CHECKPOINT_RE = re.compile(r"^ckpt-(\d+)\.pt$")
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or not an lct_kernels checkpoint."""


def checkpoint_path(folder, step):
    return Path(folder) / f"ckpt-{step:08d}.pt"


def list_checkpoints(folder):
    """[(step, path)] of the checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        match = CHECKPOINT_RE.match(p.name)
        if match:
            found.append((int(match.group(1)), p))
    return sorted(found)


def save_checkpoint(state, folder, step, keep=3):
    """Atomically writes ``state`` as checkpoint ``step`` in ``folder``; keeps the newest ``keep``.

    Returns the checkpoint's path."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    final = checkpoint_path(folder, step)
    tmp = final.with_name(final.name + ".tmp")
    payload = dict(state, format_version=FORMAT_VERSION, step=step)
    with open(tmp, "wb") as fh:
        torch.save(payload, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, final)
    _fsync_dir(folder)
    for _, old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return final


def _fsync_dir(folder):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load_checkpoint(path, map_location="cpu"):
    """Loads one checkpoint file; raises CheckpointError (naming the file) if it is
    missing, truncated/corrupt or not one of ours."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{path} is not an lct_kernels checkpoint (format {FORMAT_VERSION})")
    return state


def resolve_resume(path_or_folder):
    """(path, state) of the checkpoint to resume from: a file as given, or the newest in a folder.

    If the newest checkpoint in a folder is corrupt, the error names it and the
    newest older one that still loads, so the user can remove the bad file."""
    target = Path(path_or_folder)
    if target.is_file() or target.suffix == ".pt":
        return target, load_checkpoint(target)
    found = list_checkpoints(target)
    if not found:
        raise CheckpointError(f"--resume: no checkpoint (ckpt-*.pt) found in {target}")
    newest = found[-1][1]
    try:
        state = load_checkpoint(newest)
    except CheckpointError as exc:
        for _, older in reversed(found[:-1]):
            try:
                load_checkpoint(older)
            except CheckpointError:
                continue
            raise CheckpointError(
                f"{exc}.  The previous checkpoint {older} is intact: remove the corrupt file "
                f"or pass --resume-from {older}"
            ) from None
        raise
    return newest, state
