"""Precomputed latents from one file: .npy / .npz / .pt / .pth / .safetensors."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["LATENT_SUFFIXES", "load_latents_file"]

LATENT_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")


def _to_tensor(x, what: str, path: Path) -> Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, Tensor):
        raise ValueError(f"{what} in {path} must be an array/tensor, got {type(x).__name__}")
    if x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{what} in {path} must be real numbers, got dtype {x.dtype}")
    return x.detach().cpu()


def _check_latents_and_labels(latents: Tensor, labels, path: Path) -> tuple[Tensor, Tensor | None]:
    if latents.dim() == 2:
        raise ValueError(
            f"latents in {path} have shape {tuple(latents.shape)} (N, D); the trainer needs "
            "image-shaped latents (N, C, H, W): reshape them before saving, "
            "e.g. latents.reshape(N, C, H, W)")
    if latents.dim() != 4 or latents.shape[0] == 0:
        raise ValueError(f"latents in {path} must have shape (N, C, H, W) with N >= 1, "
                         f"got {tuple(latents.shape)}")
    latents = latents.to(torch.float32).contiguous()
    if not torch.isfinite(latents).all():
        raise ValueError(f"latents in {path} contain NaN or inf (after conversion to float32)")
    if labels is None:
        return latents, None
    labels = _to_tensor(labels, "labels", path)
    if labels.dim() != 1:
        raise ValueError(f"labels for {path} must be 1-D (N,), got shape {tuple(labels.shape)}")
    # float labels are accepted when whole (arrays saved as float by accident)
    if labels.is_floating_point() and not torch.equal(labels, labels.round()):
        raise ValueError(f"labels for {path} must be integer class indices, got fractions")
    labels = labels.to(torch.int64)
    if labels.shape[0] != latents.shape[0]:
        raise ValueError(f"{path}: {latents.shape[0]} latents but {labels.shape[0]} labels")
    if (labels < 0).any():
        raise ValueError(f"labels for {path} must be >= 0, found {labels.min().item()}")
    return latents, labels


def load_latents_file(path: str | os.PathLike) -> tuple[Tensor, Tensor | None]:
    """Precomputed latents (and optional labels) from one file.

    Formats, by extension:
        .npy          the latents array; labels from ``<stem>.labels.npy`` beside it, if present
        .npz          arrays "latents" and optional "labels"
        .pt / .pth    a tensor, or a dict with "latents" and optional "labels"
                      (read with ``torch.load(weights_only=True)``: no arbitrary pickles)
        .safetensors  tensors "latents" and optional "labels"

    Returns (latents float32 (N, C, H, W), labels int64 (N,) or None).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"latents file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LATENT_SUFFIXES:
        raise ValueError(f"unsupported latents file extension {suffix!r} for {path}; "
                         f"supported: {', '.join(LATENT_SUFFIXES)}")
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as e:
            raise ImportError(f"reading {path} needs safetensors: `pip install safetensors` "
                              "(or `pip install lct_kernels[train]`)") from e
    try:
        if suffix == ".npy":
            tables = {"latents": np.load(path, allow_pickle=False)}
            sidecar = path.with_name(path.stem + ".labels.npy")
            if sidecar.is_file():
                tables["labels"] = np.load(sidecar, allow_pickle=False)
        elif suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                tables = {k: z[k] for k in z.files}
        elif suffix in (".pt", ".pth"):
            obj = torch.load(path, map_location="cpu", weights_only=True)
            tables = {"latents": obj} if isinstance(obj, Tensor) else obj
        else:
            tables = load_file(str(path), device="cpu")
    except Exception as e:  # numpy / unpickling / safetensors parse errors all read alike
        raise ValueError(f"could not read latents file {path}: {e}") from e
    if not isinstance(tables, dict):
        raise ValueError(f"{path} must hold a tensor or a dict with 'latents', "
                         f"got {type(tables).__name__}")
    if "latents" not in tables:
        raise ValueError(f"{path} has no 'latents' entry; found {sorted(map(str, tables))}")
    latents = _to_tensor(tables["latents"], "latents", path)
    return _check_latents_and_labels(latents, tables.get("labels"), path)
