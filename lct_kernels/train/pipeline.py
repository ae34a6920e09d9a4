"""Assembles a run's pieces from its config: training latents, the decoder, the DiT.

Shared by the training loop, ``lct-sample`` and evaluation, so that a checkpoint
alone (config + latent stats + decoder record) rebuilds everything needed to
sample and decode.
"""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import digits as digits_data
from .data import images as image_data
from .data import latent_files
from .data.stats import LatentStats
from .model import build_dit


def default_cache_dir():
    """$LCT_CACHE_DIR, else $XDG_CACHE_HOME/lct_kernels, else ~/.cache/lct_kernels."""
    if os.environ.get("LCT_CACHE_DIR"):
        return Path(os.environ["LCT_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "lct_kernels"


@dataclass
class TrainingData:
    """Latents ready for training (standardised per element to std ``cfg.data.latent_std``).

    latents: (N, C, H, W) float32, CPU; labels: (N,) int64 or None (None when
    unconditional); decoder: a record that ``make_decoder`` turns into a function;
    test: held-out data for evaluation (digits only) or None."""

    latents: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int
    stats: LatentStats
    decoder: dict
    test: dict | None = None

    @property
    def latent_shape(self):
        return tuple(self.latents.shape[1:])


def prepare_data(cfg, progress=True):
    """Stage 1: the latents of ``cfg.data`` (the digits through the cached autoencoder, a
    latents file, or an image folder through a local VAE) and their statistics."""
    d = cfg.data
    test = None
    if d.source == "digits":
        bundle = digits_data.digits_latents(
            d.cache_dir or default_cache_dir(), holdout=d.holdout, seed=0,
            latent_channels=d.latent_channels, ae_steps=d.ae_steps, ae_width=d.ae_width,
            progress=progress,
        )
        raw, labels = bundle["latents"], bundle["labels"]
        decoder = {"kind": "digits", "config": bundle["autoencoder_config"],
                   "state": bundle["autoencoder_state"]}
        test = {"latents": bundle["test_latents"], "labels": bundle["test_labels"],
                "images": bundle["test_images"]}
        num_classes = bundle["num_classes"]
    elif d.source == "latents":
        raw, labels = latent_files.load_latents_file(d.latents)
        decoder = {"kind": "none"}
        num_classes = int(labels.max()) + 1 if labels is not None else 0
    else:
        raw, labels, names = image_data.encode_image_folder(
            d.images, d.vae, image_size=d.image_size, progress=progress,
            device="cuda" if torch.cuda.is_available() else "cpu",
        )
        decoder = {"kind": "vae", "path": str(d.vae)}
        num_classes = len(names) if labels is not None else 0
    if not d.conditional or labels is None:
        labels, num_classes = None, 0
    stats = LatentStats.compute(raw, target_std=d.latent_std)
    if test is not None:
        test["latents"] = stats.standardize(test["latents"])
    return TrainingData(stats.standardize(raw).float().contiguous(), labels, num_classes, stats,
                        decoder, test)


def make_decoder(decoder, stats, device="cpu"):
    """A function mapping standardised latents (n, C, H, W) to images in [-1, 1]
    (n, channels, h, w), or None when the run has no decoder (a latents file)."""
    kind = decoder.get("kind", "none")
    if kind == "digits":
        from .data.autoencoder import DigitsAutoencoder

        ae = DigitsAutoencoder(**decoder["config"])
        ae.load_state_dict(decoder["state"])
        ae = ae.to(device).eval()

        @torch.no_grad()
        def decode(x):
            return ae.decode(stats.destandardize(x.to(device).float())).clamp(-1, 1)

        return decode
    if kind == "vae":
        try:
            from diffusers import AutoencoderKL
        except ImportError:
            raise ImportError("decoding needs diffusers (pip install diffusers)") from None
        path = Path(decoder["path"])
        if not path.is_dir():
            raise FileNotFoundError(f"the run's VAE directory is missing: {path}")
        vae = AutoencoderKL.from_pretrained(path, local_files_only=True).to(device).eval()
        scale = float(getattr(vae.config, "scaling_factor", 0.18215))

        @torch.no_grad()
        def decode(x):
            z = stats.destandardize(x.to(device).float()) / scale
            return vae.decode(z).sample.clamp(-1, 1).float()

        return decode
    return None


def build_model(cfg, latent_shape, num_classes):
    """The DiT of ``cfg.model`` for latents of ``latent_shape`` = (C, H, W)."""
    C, H, W = latent_shape
    if H != W:
        raise ValueError(f"data: latents must be square (C, S, S), got {latent_shape}")
    if H % cfg.model.patch_size:
        raise ValueError(
            f"model.patch_size: {cfg.model.patch_size} does not divide the latent size {H}"
        )
    return build_dit(
        cfg.model.size, input_size=H, in_channels=C, patch_size=cfg.model.patch_size,
        num_classes=num_classes, nsln=cfg.model.norm == "nsln", norm_bias=cfg.model.norm_bias,
        fused=cfg.model.fused,
        dropout=cfg.model.dropout, backend=cfg.run.backend or None, depth=cfg.model.depth,
        hidden_size=cfg.model.hidden_size, num_heads=cfg.model.num_heads,
    )
