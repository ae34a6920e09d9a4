"""The embedded demo data: sklearn's bundled 8x8 digits, encoded to latents by a small
autoencoder (:mod:`.autoencoder`) trained here and cached on disk.

    load_digits_split(holdout, seed)   images (N, 1, 8, 8) float32 in [-1, 1] + labels
    digits_latents(cache_dir)          latents (N, C, 4, 4) float32 of both splits (cached)
"""

from __future__ import annotations

import os
import warnings

import numpy as np
import torch
from torch import Tensor

from .autoencoder import DigitsAutoencoder, train_autoencoder
from .common import atomic_torch_save, cache_path

__all__ = ["NUM_DIGITS", "NUM_DIGIT_CLASSES", "load_digits_split", "digits_latents"]

NUM_DIGITS = 1797  # images in sklearn's bundled digits set
NUM_DIGIT_CLASSES = 10
# Bump when the cache contents or the autoencoder recipe change: old files then
# hash to other names and are never read back.
_CACHE_VERSION = 1
_CACHE_KEYS = {"latents", "labels", "test_latents", "test_labels", "train_images", "test_images",
               "num_classes", "autoencoder_config", "autoencoder_state"}


def load_digits_split(holdout: int = 297, seed: int = 0) -> dict:
    """The 1797 sklearn digits, split into train and held-out test sets.

    Images are float32 (N, 1, 8, 8), scaled from 0..16 to [-1, 1]; labels int64 (N,).
    The split is stratified by class (sklearn ``train_test_split``, ``random_state=seed``)
    whenever both parts can hold every class (10 <= holdout <= 1787), else a seeded
    random permutation. Both parts are returned in the data set's original order.

    Returns {"train_images", "train_labels", "test_images", "test_labels"}.
    """
    if isinstance(holdout, bool) or not isinstance(holdout, int) or not 0 <= holdout < NUM_DIGITS:
        raise ValueError(f"holdout must be an int with 0 <= holdout < {NUM_DIGITS}, got {holdout!r}")
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as e:
        raise ImportError("the digits data set needs scikit-learn: "
                          "`pip install lct_kernels[train]` (or `pip install scikit-learn`)") from e

    digits = load_digits()  # bundled with sklearn: no download
    images = torch.from_numpy(digits.images.astype(np.float32)).unsqueeze(1) / 8.0 - 1.0
    labels = torch.from_numpy(digits.target.astype(np.int64))
    idx = np.arange(NUM_DIGITS)
    if NUM_DIGIT_CLASSES <= holdout <= NUM_DIGITS - NUM_DIGIT_CLASSES:
        train_idx, test_idx = train_test_split(idx, test_size=holdout, stratify=digits.target,
                                               random_state=seed)
    else:
        perm = np.random.default_rng(seed).permutation(NUM_DIGITS)
        test_idx, train_idx = perm[:holdout], perm[holdout:]
    train_idx, test_idx = torch.from_numpy(np.sort(train_idx)), torch.from_numpy(np.sort(test_idx))
    return {"train_images": images[train_idx].contiguous(), "train_labels": labels[train_idx],
            "test_images": images[test_idx].contiguous(), "test_labels": labels[test_idx]}


@torch.no_grad()
def _encode_mean(ae: DigitsAutoencoder, images: Tensor) -> Tensor:
    return torch.cat([ae.encode(chunk)[0] for chunk in images.split(1024)]).contiguous()


def digits_latents(cache_dir: str | os.PathLike, *, holdout: int = 297, seed: int = 0,
                   latent_channels: int = 2, ae_steps: int = 1500, ae_width: int = 32,
                   progress: bool = True) -> dict:
    """Stage 1 for the digits: train the autoencoder, encode both splits, cache on disk.

    The autoencoder (``train_autoencoder(..., seed=seed)``) sees only the train split.
    Latents are the posterior MEAN, not a sample: with 1500 images a sample only
    adds noise the consistency model would have to learn. Everything is cached in
    ``cache_dir/digits_latents-<hash>.pt``, the hash covering every argument but
    cache_dir and progress; a second call with the same arguments loads it. A
    corrupt cache file is retrained and overwritten, with a warning.

    Returns {"latents": (N, C, 4, 4) float32, "labels": (N,) int64,
    "test_latents", "test_labels", "test_images": (M, 1, 8, 8), "train_images":
    (N, 1, 8, 8), "num_classes": 10, "autoencoder": DigitsAutoencoder (eval, CPU),
    "autoencoder_config": dict, "autoencoder_state": state_dict, "cache_file": str}.
    """
    args = {"holdout": holdout, "seed": seed, "latent_channels": latent_channels,
            "ae_steps": ae_steps, "ae_width": ae_width}
    for name in ("latent_channels", "ae_steps", "ae_width"):
        if isinstance(args[name], bool) or not isinstance(args[name], int) or args[name] < 1:
            raise ValueError(f"{name} must be a positive int, got {args[name]!r}")
    cache_file = cache_path(cache_dir, "digits_latents", _CACHE_VERSION, args)

    payload = None
    if cache_file.exists():
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            if not (isinstance(payload, dict) and payload.get("args") == args
                    and _CACHE_KEYS <= set(payload)):
                raise ValueError("entries missing or not made with these arguments")
            ae = DigitsAutoencoder(**payload["autoencoder_config"])
            ae.load_state_dict(payload["autoencoder_state"])
        except Exception as e:  # any unreadable / inconsistent file: rebuild it
            warnings.warn(f"digits latent cache {cache_file} is unreadable ({e}); "
                          "retraining the autoencoder and overwriting it", stacklevel=2)
            payload = None

    if payload is None:
        split = load_digits_split(holdout=holdout, seed=seed)
        ae = train_autoencoder(split["train_images"], latent_channels=latent_channels,
                               width=ae_width, steps=ae_steps, seed=seed, progress=progress)
        payload = {
            "args": args, "num_classes": NUM_DIGIT_CLASSES,
            "latents": _encode_mean(ae, split["train_images"]), "labels": split["train_labels"],
            "test_latents": _encode_mean(ae, split["test_images"]),
            "test_labels": split["test_labels"],
            "train_images": split["train_images"], "test_images": split["test_images"],
            "autoencoder_config": dict(ae.config), "autoencoder_state": ae.state_dict()}
        atomic_torch_save(payload, cache_file)

    out = {k: v for k, v in payload.items() if k != "args"}
    out.update(autoencoder=ae.eval(), cache_file=str(cache_file))
    return out
