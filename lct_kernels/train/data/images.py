"""Image folders: listing (labels from first-level subfolders), loading, and encoding
with a *local* diffusers AutoencoderKL (nothing is downloaded)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = ["IMAGE_SUFFIXES", "list_images", "load_image", "encode_image_folder"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


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
