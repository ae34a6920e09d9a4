"""Latent sources for the trainer: every route ends in latents (N, C, H, W) float32.

Routes (one module each):
    digits.digits_latents(cache_dir)          the bundled sklearn digits, through the small
                                              autoencoder of :mod:`.autoencoder` (cached on disk)
    latent_files.load_latents_file(path)      precomputed latents: .npy / .npz / .pt / .pth / .safetensors
    images.encode_image_folder(dir, vae_path) an image folder through a *local* diffusers AutoencoderKL

and stats.LatentStats, the per-element standardisation applied before training;
common holds the cache and batching helpers they share.  Labels are int64 (N,)
class indices, or None for unconditional data.
"""

from .digits import NUM_DIGIT_CLASSES, NUM_DIGITS, digits_latents, load_digits_split
from .images import IMAGE_SUFFIXES, encode_image_folder, list_images, load_image
from .latent_files import LATENT_SUFFIXES, load_latents_file
from .stats import LatentStats

__all__ = ["load_digits_split", "digits_latents", "load_latents_file", "list_images",
           "load_image", "encode_image_folder", "LatentStats", "NUM_DIGITS",
           "NUM_DIGIT_CLASSES", "IMAGE_SUFFIXES", "LATENT_SUFFIXES"]
