"""Constants and helpers shared by the integration tests (the fixtures are in conftest.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

# The tiny run: 16x16 RGB images, a VAE with one downsampling (2 blocks) -> 4x8x8 latents,
# the tiny DiT with patch 2 (16 tokens); a few steps, logging every step.
IMAGE_SIZE = 16
CLASSES = ("circle", "square")
PER_CLASS = 8
TRAIN_STEPS = 4


def draw_image(kind, index, size=IMAGE_SIZE):
    """A small RGB PIL image: a filled circle or square whose position and colour vary
    with ``index`` (so the class is visible and the images differ)."""
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (size, size), (20 + 10 * index % 60, 30, 40))
    d = ImageDraw.Draw(im)
    o = index % 4
    box = (2 + o, 2 + o // 2, size - 5 + o // 2, size - 4)
    colour = (200, 60 + 20 * (index % 5), 50) if kind == "circle" else (60, 80 + 15 * (index % 6), 210)
    (d.ellipse if kind == "circle" else d.rectangle)(box, fill=colour)
    return im


def train_args(out, images, vae, steps=TRAIN_STEPS, *extra):
    """lct-train's argv for a tiny CPU run on an image folder through a local VAE."""
    return ["--preset", "demo", "--images", str(images), "--vae", str(vae), "--out", str(out),
            "--steps", str(steps), "--device", "cpu", "--no-progress", "--overwrite",
            f"data.image_size={IMAGE_SIZE}", "optim.batch_size=8", "optim.warmup_steps=0",
            "run.log_every=1", f"run.ckpt_every={steps}", "run.sample_every=2",
            "run.n_samples=4", "run.eval_every=0", *extra]


def run_cli(name, argv, tmp_cwd):
    """Run an installed console script (lct-train, lct-sample, lct-eval) in a subprocess,
    from ``tmp_cwd`` (outside the source tree); returns the CompletedProcess."""
    exe = Path(sys.executable).parent / name
    if not exe.exists():
        pytest.fail(f"the console script {name} is not installed next to {sys.executable}")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("PYTHONPATH", None)
    return subprocess.run([str(exe), *map(str, argv)], cwd=tmp_cwd, env=env, capture_output=True,
                          text=True, timeout=600)
