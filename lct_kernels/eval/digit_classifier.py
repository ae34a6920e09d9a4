"""A small CNN classifier of the 8x8 digits: the feature space for the sample metrics.

FID-style metrics need features in which "looks like a digit" is measurable; for the
bundled 8x8 digits an Inception network makes no sense, so we train a tiny one here.

    model, info = load_digit_classifier(cache_dir)    # trained once, then cached
    feats = digit_features(model, images)              # (N, 128) float32
    preds = predict_digits(model, images)              # (N,) int64

Images are (N, 1, 8, 8) float32 in [-1, 1], as produced by
:func:`lct_kernels.train.data.digits.load_digits_split` and the digits autoencoder's decoder.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..train.data.autoencoder import _check_images
from ..train.data.common import atomic_torch_save, cache_path, epoch_batches
from ..train.data.digits import NUM_DIGIT_CLASSES, load_digits_split

__all__ = ["DigitClassifier", "train_digit_classifier", "load_digit_classifier",
           "digit_features", "predict_digits", "DEFAULT_STEPS"]

DEFAULT_STEPS = 800
# Bump when the architecture or the training recipe changes: old cache files then
# hash to other names and are never read back.
_CACHE_VERSION = 1


class DigitClassifier(nn.Module):
    """Conv classifier: (B, 1, 8, 8) in [-1, 1] -> logits (B, 10).

    Two 3x3 convs at 8x8 (width // 2, then width channels), a 2x2 max-pool to 4x4,
    a 3x3 conv (2 * width channels), a 2x2 max-pool to 2x2, then a linear layer to
    ``feature_dim`` units (ReLU) and a linear head to 10 logits. :meth:`features`
    returns the ``feature_dim`` penultimate activations (after the ReLU, like
    Inception's pool features for FID). All parameters float32.

    Attributes:
        config: the constructor kwargs; ``DigitClassifier(**m.config)`` rebuilds the
            architecture (load the weights with ``load_state_dict``).
    """

    def __init__(self, width: int = 32, feature_dim: int = 128):
        super().__init__()
        for name, value in (("width", width), ("feature_dim", feature_dim)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        self.config = {"width": width, "feature_dim": feature_dim}
        self.feature_dim = feature_dim
        h = max(1, width // 2)
        self.body = nn.Sequential(
            nn.Conv2d(1, h, 3, padding=1), nn.ReLU(),
            nn.Conv2d(h, width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 8x8 -> 4x4
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.MaxPool2d(2),                                   # 4x4 -> 2x2
            nn.Flatten(),
            nn.Linear(2 * width * 4, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, NUM_DIGIT_CLASSES)

    def features(self, x: Tensor) -> Tensor:
        """Penultimate activations (B, feature_dim) of images ``x`` (B, 1, 8, 8)."""
        _check_images(x)
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        """Logits (B, 10) of images ``x`` (B, 1, 8, 8) float in [-1, 1]."""
        return self.head(self.features(x))


def _random_shifts(x: Tensor, gen: torch.Generator) -> Tensor:
    """Shift each image of ``x`` (B, 1, 8, 8) by an independent uniform offset in
    {-1, 0, 1}^2 pixels, filling the uncovered border with the background value -1."""
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)  # (B, 1, 10, 10)
    dy = torch.randint(0, 3, (b, 1, 1), generator=gen)
    dx = torch.randint(0, 3, (b, 1, 1), generator=gen)
    ar = torch.arange(8)
    rows = (ar[None, :, None] + dy).expand(b, 8, 8)
    cols = (ar[None, None, :] + dx).expand(b, 8, 8)
    idx = torch.arange(b)[:, None, None].expand(b, 8, 8)
    return padded[:, 0][idx, rows, cols].unsqueeze(1)


def train_digit_classifier(
    images: Tensor,
    labels: Tensor,
    *,
    steps: int = DEFAULT_STEPS,
    batch_size: int = 128,
    lr: float = 3e-3,
    weight_decay: float = 1e-4,
    width: int = 32,
    feature_dim: int = 128,
    augment: bool = True,
    seed: int = 0,
    progress: bool = False,
    num_threads: int | None = 1,
) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on ``images`` (N, 1, 8, 8) float32 in [-1, 1] and
    ``labels`` (N,) int64 in [0, 10).

    Cross-entropy, AdamW with a cosine-decayed learning rate, minibatches from
    epoch-wise shuffling; with ``augment`` every training image is shifted by a
    random offset in {-1, 0, 1}^2 pixels (generated digits are not always exactly
    centred, and the shifts keep 1500 images from being memorised).

    Deterministic: weight init, shuffling and shifts come from ``seed`` inside
    ``torch.random.fork_rng`` and a seeded generator, so the same arguments give
    identical weights on the same machine and the caller's global RNG is untouched.

    num_threads: torch intra-op threads while training (restored afterwards); None
    keeps the current setting. The default 1 matches the digits autoencoder: the
    layers are tiny, and spinning OpenMP threads on shared cores cost more than a
    second thread gains.

    Returns the model in eval mode, on the CPU, float32.
    """
    _check_images(images, "images")
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor, got {type(labels).__name__}")
    if labels.dim() != 1 or labels.shape[0] != images.shape[0]:
        raise ValueError(f"labels must have shape ({images.shape[0]},) to match images, "
                         f"got {tuple(labels.shape)}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got dtype {labels.dtype}")
    if images.shape[0] == 0:
        raise ValueError("images is empty: need at least one image to train on")
    if not torch.isfinite(images).all():
        raise ValueError("images contains NaN or inf")
    if labels.min() < 0 or labels.max() >= NUM_DIGIT_CLASSES:
        raise ValueError(f"labels must lie in [0, {NUM_DIGIT_CLASSES}), found "
                         f"[{int(labels.min())}, {int(labels.max())}]")
    for name, value in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr must be a positive finite number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and weight_decay >= 0
            and math.isfinite(weight_decay)):
        raise ValueError(f"weight_decay must be a finite number >= 0, got {weight_decay!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    if num_threads is not None and (isinstance(num_threads, bool)
                                    or not isinstance(num_threads, int) or num_threads < 1):
        raise ValueError(f"num_threads must be a positive int or None, got {num_threads!r}")
    for name, value in (("width", width), ("feature_dim", feature_dim)):
        # checked here, not by building a model: that would draw from the global RNG
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")

    x = images.detach().to(device="cpu", dtype=torch.float32).contiguous()
    y = labels.detach().to(device="cpu", dtype=torch.int64)
    old_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(x, y, steps, batch_size, lr, weight_decay, width, feature_dim, augment,
                      seed, progress)
    finally:
        torch.set_num_threads(old_threads)


def _train(x, y, steps, batch_size, lr, weight_decay, width, feature_dim, augment, seed,
           progress):
    from tqdm.auto import tqdm  # optional `train` extra; only needed here

    n = x.shape[0]
    batch_size = min(batch_size, n)
    # devices=[]: CPU only; do not fork (or initialise) CUDA state.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(width=width, feature_dim=feature_dim).train()
        opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
        # Own generator for data order and shifts, so they do not depend on how
        # many numbers the weight init consumed.
        gen = torch.Generator().manual_seed(seed)
        batches = epoch_batches(n, batch_size, steps, gen)
        bar = tqdm(batches, total=steps, desc="digit classifier", disable=not progress, leave=False)
        for idx in bar:
            xb = _random_shifts(x[idx], gen) if augment else x[idx]
            loss = F.cross_entropy(model(xb), y[idx])
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"classifier loss became {loss.item()}; try a smaller lr (got {lr})")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if progress:
                bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        bar.close()
    return model.eval()


def _batched(model: DigitClassifier, images: Tensor, batch_size: int, fn) -> list[Tensor]:
    if not isinstance(model, DigitClassifier):
        raise TypeError(f"model must be a DigitClassifier, got {type(model).__name__}")
    _check_images(images, "images")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    try:
        return [fn(chunk.to(device=param.device, dtype=param.dtype)).cpu()
                for chunk in images.split(batch_size)]
    finally:
        model.train(was_training)


@torch.no_grad()
def digit_features(model: DigitClassifier, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Penultimate features (N, model.feature_dim) float32 on the CPU of ``images``
    (N, 1, 8, 8) in [-1, 1] (N may be 0). Runs in eval mode on the model's device and
    restores the model's previous mode."""
    out = _batched(model, images, batch_size, model.features)
    if not out:
        return torch.empty(0, model.feature_dim, dtype=torch.float32)
    return torch.cat(out).float()


@torch.no_grad()
def predict_digits(model: DigitClassifier, images: Tensor, batch_size: int = 1024) -> Tensor:
    """Predicted classes (N,) int64 on the CPU (argmax of the logits) of ``images``
    (N, 1, 8, 8) in [-1, 1] (N may be 0). Eval mode; the model's mode is restored."""
    out = _batched(model, images, batch_size, lambda x: model(x).argmax(dim=1))
    if not out:
        return torch.empty(0, dtype=torch.int64)
    return torch.cat(out).to(torch.int64)


def _accuracy(model: DigitClassifier, images: Tensor, labels: Tensor) -> float:
    if images.shape[0] == 0:
        return float("nan")  # holdout=0: there is no held-out split to score
    return float((predict_digits(model, images) == labels).double().mean())


def load_digit_classifier(cache_dir: str | os.PathLike, *, holdout: int = 297, seed: int = 0,
                          steps: int = DEFAULT_STEPS,
                          progress: bool = False) -> tuple[DigitClassifier, dict]:
    """The digits classifier, trained on ``load_digits_split(holdout, seed)``'s train split
    (``train_digit_classifier(..., steps=steps, seed=seed)``) once and cached.

    The cache file is ``cache_dir/digit_classifier-<hash>.pt``, the hash covering
    holdout, seed, steps and a recipe version; a second call with the same arguments
    loads it (no training). A corrupt or mismatched cache file is retrained and
    overwritten, with a warning. Writes are atomic (temp file + rename).

    Returns (model in eval mode on the CPU, info) with info = {"test_accuracy": float
    on the held-out split (nan when holdout == 0), "train_accuracy": float,
    "cache_file": str}. Accuracies are recomputed on every call (a fraction of a
    second), so they always describe the weights actually returned.
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an int, got {seed!r}")
    split = load_digits_split(holdout=holdout, seed=seed)  # validates holdout
    args = {"holdout": holdout, "seed": seed, "steps": steps}
    cache_file = cache_path(cache_dir, "digit_classifier", _CACHE_VERSION, args)

    model = None
    if cache_file.exists():
        try:
            payload = torch.load(cache_file, map_location="cpu", weights_only=True)
            if not (isinstance(payload, dict) and payload.get("args") == args
                    and payload.get("version") == _CACHE_VERSION
                    and {"config", "state"} <= set(payload)):
                raise ValueError("entries missing or not made with these arguments")
            model = DigitClassifier(**payload["config"])
            model.load_state_dict(payload["state"])
        except Exception as e:  # any unreadable / inconsistent file: rebuild it
            warnings.warn(f"digit classifier cache {cache_file} is unreadable ({e}); "
                          "retraining the classifier and overwriting it", stacklevel=2)
            model = None

    if model is None:
        # Looked up on the module at call time, so tests can stub the trainer out.
        model = train_digit_classifier(split["train_images"], split["train_labels"],
                                       steps=steps, seed=seed, progress=progress)
        atomic_torch_save({"version": _CACHE_VERSION, "args": args,
                            "config": dict(model.config), "state": model.state_dict()},
                           cache_file)

    model = model.eval()
    info = {"test_accuracy": _accuracy(model, split["test_images"], split["test_labels"]),
            "train_accuracy": _accuracy(model, split["train_images"], split["train_labels"]),
            "cache_file": str(cache_file)}
    return model, info
