"""Helpers shared by the latent sources: atomic cache writes, cache names, epoch batches."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

__all__ = ["atomic_torch_save", "cache_path", "epoch_batches"]


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save(obj) to ``path`` through a temporary file and an atomic rename."""
    # Write next to the target, then rename: a crash mid-write leaves the old
    # file (or none), never a truncated cache that looks valid.
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def epoch_batches(n, batch_size, steps, generator):
    """Yields ``steps`` index tensors of ``batch_size`` (<= n) drawn by epoch-wise shuffling
    with ``generator`` (a new permutation whenever the current one cannot fill a batch)."""
    order, pos = torch.randperm(n, generator=generator), 0
    for _ in range(steps):
        if pos + batch_size > n:
            order, pos = torch.randperm(n, generator=generator), 0
        yield order[pos:pos + batch_size]
        pos += batch_size


def cache_path(cache_dir, prefix, version, args):
    """``cache_dir/<prefix>-<16 hex of sha256(version + args)>.pt`` (cache_dir is created)."""
    key = json.dumps({"version": version, **args}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    return cache_dir / f"{prefix}-{digest}.pt"
