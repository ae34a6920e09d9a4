"""Checkpoints: atomic writes, keep-last-k, clear errors on missing or corrupt files."""

import pytest
import torch

from lct_kernels.train.checkpoint import (
    CheckpointError, list_checkpoints, load_checkpoint, resolve_resume, save_checkpoint,
)


def _state(v):
    return {"model": {"w": torch.full((3,), float(v))}}


def test_save_and_load_round_trip(tmp_path):
    path = save_checkpoint(_state(1), tmp_path, step=10)
    assert path.name == "ckpt-00000010.pt"
    state = load_checkpoint(path)
    assert state["step"] == 10 and torch.equal(state["model"]["w"], torch.ones(3))
    assert not list(tmp_path.glob("*.tmp"))


def test_keeps_only_the_newest_k(tmp_path):
    for step in (1, 2, 3, 4, 5):
        save_checkpoint(_state(step), tmp_path, step, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [4, 5]


def test_a_failed_write_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    good = save_checkpoint(_state(1), tmp_path, 1)

    def exploding_save(obj, fh):
        fh.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", exploding_save)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(_state(2), tmp_path, 2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [1]
    assert load_checkpoint(good)["step"] == 1


def test_missing_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "ckpt-00000001.pt")
    with pytest.raises(CheckpointError, match="no checkpoint"):
        resolve_resume(tmp_path)


def test_corrupt_newest_names_the_intact_previous_one(tmp_path):
    save_checkpoint(_state(1), tmp_path, 1)
    bad = save_checkpoint(_state(2), tmp_path, 2)
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    with pytest.raises(CheckpointError, match="corrupt") as info:
        resolve_resume(tmp_path)
    assert "ckpt-00000001.pt is intact" in str(info.value)
    path, state = resolve_resume(tmp_path / "ckpt-00000001.pt")
    assert state["step"] == 1


def test_foreign_file_is_refused(tmp_path):
    torch.save({"hello": 1}, tmp_path / "ckpt-00000003.pt")
    with pytest.raises(CheckpointError, match="not an lct_kernels checkpoint"):
        load_checkpoint(tmp_path / "ckpt-00000003.pt")
