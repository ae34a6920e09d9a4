"""``lct-train --images DIR --vae PATH`` and ``lct-sample`` through a real diffusers
AutoencoderKL (tiny, randomly initialised, saved locally with ``save_pretrained``).

Contracts checked against diffusers itself, not against our code:
* training latents: the VAE's posterior sample (seed 0, images in sorted path order)
  times ``vae.config.scaling_factor``; the checkpoint's latent statistics are their
  per-element mean and population std;
* decoding: images = ``vae.decode(z / scaling_factor).sample`` clamped to [-1, 1], with
  z = x * std / target_std + mean the de-standardised sampled latent x;
* the sample grids are RGB images of the decoded size, one row of ``n_samples``
  tiles in a 10-column grid (class-conditional run).
"""

import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch

diffusers = pytest.importorskip("diffusers")
PIL = pytest.importorskip("PIL")

from integration_support import CLASSES, IMAGE_SIZE, PER_CLASS, TRAIN_STEPS, run_cli, train_args  # noqa: E402

README = Path(__file__).resolve().parents[2] / "README.md"


def load_vae(path):
    return diffusers.AutoencoderKL.from_pretrained(str(path), local_files_only=True).eval()


def reference_latents(image_folder, vae):
    """Posterior samples (seed 0) of every image in sorted path order, times scaling_factor."""
    paths = sorted(p for p in image_folder.rglob("*.png"))
    x = torch.stack([torch.from_numpy(np.asarray(PIL.Image.open(p).convert("RGB"), np.float32))
                     .permute(2, 0, 1) / 127.5 - 1.0 for p in paths])
    with torch.no_grad():
        dist = vae.encode(x).latent_dist
        z = dist.sample(generator=torch.Generator().manual_seed(0))
    return (z * vae.config.scaling_factor).double()


def test_images_run_latents_are_the_vae_posterior(images_run, image_folder, tiny_vae_dir):
    vae = load_vae(tiny_vae_dir)
    ckpts = sorted((images_run / "checkpoints").glob("ckpt-*.pt"))
    assert ckpts, f"no checkpoint in {images_run}"
    state = torch.load(ckpts[-1], map_location="cpu", weights_only=False)
    z = reference_latents(image_folder, vae)
    assert z.shape[1:] == (4, IMAGE_SIZE // 2, IMAGE_SIZE // 2)
    assert tuple(state["latent_shape"]) == tuple(z.shape[1:])
    assert state["num_classes"] == len(CLASSES)
    assert state["decoder"] == {"kind": "vae", "path": str(tiny_vae_dir)}
    stats = state["latent_stats"]
    torch.testing.assert_close(stats["mean"].double(), z.mean(0), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["std"].double(), z.std(0, correction=0), atol=1e-5,
                               rtol=1e-5)
    summary = json.loads((images_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == TRAIN_STEPS


def test_images_run_writes_decoded_grids(images_run):
    grids = sorted((images_run / "samples").glob("*.png"))
    names = {g.name for g in grids}
    for step in (2, TRAIN_STEPS):
        for k in (1, 2):
            assert f"step{step:08d}_{k}step.png" in names, names
    tile = IMAGE_SIZE * max(1, 64 // IMAGE_SIZE)  # image_grid upscales to >= 64 pixels
    pad = 4
    for g in grids:
        with PIL.Image.open(g) as im:
            # RGB: decoded images (a grid of raw 4-channel latents would be greyscale)
            assert im.mode == "RGB", (g, im.mode)
            assert im.size == (10 * (tile + pad) + pad, tile + 2 * pad), (g, im.size)


def test_lct_sample_decodes_through_the_same_vae(images_run, tiny_vae_dir, tmp_path):
    out = tmp_path / "sampled"
    proc = run_cli("lct-sample", ["--ckpt", images_run, "--steps", "2", "--n", "6", "--out", out,
                                  "--device", "cpu"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    images = torch.from_numpy(np.load(out / "samples_2step.npy")).double()
    latents = torch.from_numpy(np.load(out / "samples_2step_latents.npy"))
    info = json.loads((out / "samples_2step.json").read_text())
    assert info["decoded"] is True and info["n"] == 6
    assert images.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    state = torch.load(sorted((images_run / "checkpoints").glob("ckpt-*.pt"))[-1],
                       map_location="cpu", weights_only=False)
    s = state["latent_stats"]
    vae = load_vae(tiny_vae_dir)
    z = latents.float() * s["std"] / s["target_std"] + s["mean"]
    with torch.no_grad():
        want = vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1).double()
    torch.testing.assert_close(images, want, atol=1e-4, rtol=1e-4)
    labels = np.load(out / "samples_2step_labels.npy")
    assert labels.tolist() == [i % len(CLASSES) for i in range(6)]


def test_missing_vae_directory_is_a_clear_error(image_folder, tmp_path):
    proc = run_cli("lct-train", train_args(tmp_path / "run", image_folder, tmp_path / "no-vae"),
                   tmp_path)
    assert proc.returncode != 0
    assert "vae_path" in proc.stderr and "not a local directory" in proc.stderr, proc.stderr


def readme_recipe():
    """The shell commands of README's "Your own VAE" recipe."""
    text = README.read_text()
    m = re.search(r"### Your own VAE\n(.*?)\n```bash\n(.*?)```", text, re.S)
    assert m, "README.md has no '### Your own VAE' section with a bash block"
    lines = [ln.split("#")[0].strip() for ln in m.group(2).splitlines()]
    return [shlex.split(ln) for ln in lines if ln]


def test_readme_your_own_vae_recipe(image_folder, tiny_vae_dir, tmp_path):
    """README's recipe, command by command, in a folder holding my_images/ and my_vae/
    (only the run's size is shrunk, by appended overrides, which win)."""
    (tmp_path / "my_images").symlink_to(image_folder, target_is_directory=True)
    (tmp_path / "my_vae").symlink_to(tiny_vae_dir, target_is_directory=True)
    commands = readme_recipe()
    assert [c[0] for c in commands] == ["lct-train", "lct-sample"], commands
    # options go first, overrides last (argparse takes the positional overrides in one run)
    small = {"lct-train": (["--steps", "2", "--device", "cpu", "--no-progress"],
                           [f"data.image_size={IMAGE_SIZE}", "optim.batch_size=8",
                            "run.n_samples=2", "run.sample_every=0", "run.ckpt_every=2"]),
             "lct-sample": (["--n", "4", "--device", "cpu"], [])}
    for cmd in commands:
        options, overrides = small[cmd[0]]
        proc = run_cli(cmd[0], options + cmd[1:] + overrides, tmp_path)
        assert proc.returncode == 0, f"{cmd}: {proc.stderr}"
    sampled = [a for a in commands[1]]
    out = Path(tmp_path, sampled[sampled.index("--out") + 1])
    assert (out / "samples_2step.png").is_file() or (out / "samples_1step.png").is_file()
    assert len(list(Path(tmp_path, "my_images").rglob("*.png"))) == PER_CLASS * len(CLASSES)
