"""Training data for the trainer: every route ends in latents (N, C, H, W) float32.

Routes:
    digits_latents(cache_dir)           the bundled sklearn digits, through a small
                                        autoencoder trained here (cached on disk)
    load_latents_file(path)             precomputed latents: .npy / .npz / .pt / .pth / .safetensors
    encode_image_folder(dir, vae_path)  an image folder through a *local* diffusers AutoencoderKL

and LatentStats, the per-element standardisation applied before training.
Labels are int64 (N,) class indices, or None for unconditional data.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from .autoencoder import DigitsAutoencoder, train_autoencoder

__all__ = ["load_digits_split", "digits_latents", "load_latents_file", "list_images",
           "load_image", "encode_image_folder", "LatentStats"]

NUM_DIGITS = 1797  # images in sklearn's bundled digits set
NUM_DIGIT_CLASSES = 10
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LATENT_SUFFIXES = (".npy", ".npz", ".pt", ".pth", ".safetensors")
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


def _atomic_torch_save(obj, path: Path) -> None:
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
        _atomic_torch_save(payload, cache_file)

    out = {k: v for k, v in payload.items() if k != "args"}
    out.update(autoencoder=ae.eval(), cache_file=str(cache_file))
    return out


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


def list_images(images_dir: str | os.PathLike) -> tuple[list[Path], Tensor | None, list[str]]:
    """Every image (.png .jpg .jpeg .webp .bmp, any case) under ``images_dir``, recursively.

    Paths are sorted by their path relative to ``images_dir``. If every image sits
    inside a first-level subfolder, that folder is its class: labels are int64 (N,)
    indices into the sorted class names. Otherwise labels are None and names [].
    """
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"images_dir is not a directory: {root}")
    paths = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not paths:
        raise ValueError(f"no images ({', '.join(IMAGE_SUFFIXES)}) found under {root}")
    rel = [p.relative_to(root).parts for p in paths]
    if not all(len(parts) > 1 for parts in rel):
        if any(len(parts) > 1 for parts in rel):
            warnings.warn(f"{root} mixes images in subfolders with images at its top level; "
                          "treating the folder as unlabelled", stacklevel=2)
        return paths, None, []
    class_names = sorted({parts[0] for parts in rel})
    index = {name: i for i, name in enumerate(class_names)}
    return paths, torch.tensor([index[parts[0]] for parts in rel], dtype=torch.int64), class_names


def load_image(path: str | os.PathLike, image_size: int) -> Tensor:
    """One image as (3, image_size, image_size) float32 in [-1, 1].

    Converted to RGB, center-cropped to a square (the shorter side), then resized
    (bicubic; PIL widens the filter when shrinking, so large images do not alias).
    """
    from PIL import Image

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
    except (OSError, ValueError) as e:
        raise ValueError(f"could not read image {path}: {e}") from e
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    im = im.crop((left, top, left + s, top + s))
    if s != image_size:
        im = im.resize((image_size, image_size), Image.Resampling.BICUBIC)
    arr = np.asarray(im, dtype=np.float32)  # (S, S, 3) in 0..255
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous() / 127.5 - 1.0


def encode_image_folder(
    images_dir: str | os.PathLike, vae_path: str | os.PathLike, *, image_size: int = 256,
    batch_size: int = 32, device: str | torch.device = "cpu", progress: bool = True,
    sample_posterior: bool = True, seed: int = 0,
) -> tuple[Tensor, Tensor | None, list[str]]:
    """Encode an image folder with a local diffusers ``AutoencoderKL``.

    ``vae_path`` must be a local directory (config.json + weights); hub ids are
    refused, nothing is downloaded. Images come from :func:`list_images` (labels
    from first-level subfolders) and :func:`load_image`. Each latent is a
    posterior sample (seeded by ``seed``), or the mean with
    ``sample_posterior=False``, times ``vae.config.scaling_factor``
    (no ``shift_factor`` is applied).

    Returns (latents float32 (N, C, image_size/f, image_size/f) on the CPU,
    labels int64 (N,) or None, class names).
    """
    vae_dir = Path(vae_path)
    if not vae_dir.is_dir():
        raise FileNotFoundError(
            f"vae_path {str(vae_path)!r} is not a local directory. Pass a directory holding a "
            "diffusers AutoencoderKL (config.json + diffusion_pytorch_model.safetensors); "
            "hub ids are not downloaded")
    if not (vae_dir / "config.json").is_file():
        raise FileNotFoundError(f"vae_path {vae_dir} has no config.json; expected a diffusers "
                                "AutoencoderKL directory (config.json + weights)")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    paths, labels, class_names = list_images(images_dir)
    try:
        from diffusers import AutoencoderKL
    except ImportError as e:
        raise ImportError("encoding images needs diffusers: `pip install diffusers`") from e
    from tqdm.auto import tqdm

    device = torch.device(device)
    vae = AutoencoderKL.from_pretrained(str(vae_dir), local_files_only=True).to(device).eval()
    scale = float(vae.config.scaling_factor)
    dtype = next(vae.parameters()).dtype
    gen = torch.Generator(device=device).manual_seed(seed)
    out = []
    with torch.inference_mode():
        for i in tqdm(range(0, len(paths), batch_size), desc="encoding images",
                      disable=not progress, leave=False):
            x = torch.stack([load_image(p, image_size) for p in paths[i:i + batch_size]])
            dist = vae.encode(x.to(device=device, dtype=dtype)).latent_dist
            z = dist.sample(generator=gen) if sample_posterior else dist.mean
            out.append((z * scale).float().cpu())
    return torch.cat(out), labels, class_names


@dataclass(eq=False)  # a generated __eq__ would compare tensors ambiguously
class LatentStats:
    """Per-element standardisation of latents to a target std (0.5 in the paper).

    mean, std: float32 tensors shaped like one latent (C, H, W) (any per-sample
    shape works). ``standardize`` maps data to per-element mean 0, std target_std.
    """

    mean: Tensor
    std: Tensor
    target_std: float = 0.5

    def __post_init__(self):
        if not (isinstance(self.mean, Tensor) and isinstance(self.std, Tensor)
                and self.mean.shape == self.std.shape):
            raise ValueError("LatentStats mean and std must be tensors of the same shape")
        self.mean = self.mean.detach().to(torch.float32)
        self.std = self.std.detach().to(torch.float32)
        self.target_std = float(self.target_std)
        if not ((self.std > 0).all() and self.target_std > 0):
            raise ValueError("LatentStats std and target_std must be > 0")

    @classmethod
    def compute(cls, latents: Tensor, target_std: float = 0.5, eps: float = 1e-6) -> "LatentStats":
        """Stats over dim 0 of ``latents`` (N, C, H, W), N >= 1: mean and population std
        (correction 0, so the standardised set has std exactly ``target_std``),
        std clamped to >= ``eps`` so constant elements do not divide by zero.
        Accumulated in float64."""
        if not isinstance(latents, Tensor) or latents.dim() < 2 or latents.shape[0] == 0:
            shape = tuple(latents.shape) if isinstance(latents, Tensor) else type(latents).__name__
            raise ValueError(f"latents must be a non-empty (N, C, H, W) tensor, got {shape}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps}")
        z = latents.detach().to(device="cpu", dtype=torch.float64)
        if not torch.isfinite(z).all():
            raise ValueError("latents contain NaN or inf; cannot compute stats")
        std, mean = torch.std_mean(z, dim=0, correction=0)
        return cls(mean=mean, std=std.clamp_min(eps), target_std=target_std)

    def _stats_like(self, z: Tensor) -> tuple[Tensor, Tensor]:
        k = self.mean.dim()
        if not (isinstance(z, Tensor) and z.is_floating_point() and z.dim() >= k
                and tuple(z.shape[z.dim() - k:]) == tuple(self.mean.shape)):
            got = (z.dtype, tuple(z.shape)) if isinstance(z, Tensor) else type(z).__name__
            raise ValueError("LatentStats expects floating-point latents shaped "
                             f"(..., {', '.join(map(str, self.mean.shape))}), got {got}")
        return (self.mean.to(device=z.device, dtype=z.dtype),
                self.std.to(device=z.device, dtype=z.dtype))

    def standardize(self, z: Tensor) -> Tensor:
        """(z - mean) / std * target_std for z (..., C, H, W), in z's dtype and device."""
        mean, std = self._stats_like(z)
        return (z - mean) / std * self.target_std

    def destandardize(self, x: Tensor) -> Tensor:
        """Inverse of :meth:`standardize`: x * std / target_std + mean."""
        mean, std = self._stats_like(x)
        return x * std / self.target_std + mean

    def state_dict(self) -> dict:
        return {"mean": self.mean.clone(), "std": self.std.clone(), "target_std": self.target_std}

    @classmethod
    def from_state_dict(cls, d: dict) -> "LatentStats":
        if not isinstance(d, dict):
            raise TypeError(f"LatentStats state dict must be a dict, got {type(d).__name__}")
        missing = sorted({"mean", "std", "target_std"} - set(d))
        if missing:
            raise ValueError(f"LatentStats state dict is missing {missing}")
        return cls(mean=d["mean"], std=d["std"], target_std=d["target_std"])
