"""Pictures of a run: image grids of samples and the loss / c / N curves."""

import csv
import math
from pathlib import Path

import numpy as np
import torch


def image_grid(images, nrow=None, pad=4, upscale=None):
    """(n, C, H, W) images in [-1, 1] -> (rows*H', cols*W', 3 or 1) uint8 grid.

    Small images (the 8x8 digits) are upscaled with nearest neighbours so the
    PNG is viewable."""
    images = images.detach().float().cpu().clamp(-1, 1)
    n, C, H, W = images.shape
    if C not in (1, 3):  # latents: show the first channel
        images, C = images[:, :1], 1
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    upscale = upscale or max(1, 64 // max(H, W))
    images = images.repeat_interleave(upscale, 2).repeat_interleave(upscale, 3)
    H, W = H * upscale, W * upscale
    grid = torch.full((C, ncol * (H + pad) + pad, nrow * (W + pad) + pad), -1.0)
    for k in range(n):
        r, c = divmod(k, nrow)
        grid[:, pad + r * (H + pad): pad + r * (H + pad) + H,
             pad + c * (W + pad): pad + c * (W + pad) + W] = images[k]
    arr = ((grid + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).permute(1, 2, 0).numpy()
    return arr


def save_image_grid(images, path, nrow=None):
    """Writes ``image_grid(images)`` to ``path`` (PNG)."""
    from PIL import Image

    arr = image_grid(images, nrow)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr).save(path)
    return path


def read_metrics(path):
    """metrics.csv -> dict of column name -> float array."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return {}
    out = {}
    for key in rows[0]:
        try:
            out[key] = np.array([float(r[key]) if r[key] != "" else np.nan for r in rows])
        except ValueError:
            continue
    return out


def plot_metrics(csv_path, png_path, extra=()):
    """loss.png: loss, c and N against step (plus any ``extra`` columns present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = read_metrics(csv_path)
    if "step" not in cols or len(cols["step"]) == 0:
        return None
    panels = [("loss", "loss", True), ("c", "Cauchy / robust c", True), ("N", "grid points N", True)]
    panels += [(name, name, False) for name in extra
               if name in cols and np.isfinite(cols[name]).any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    for ax, (key, title, logy) in zip(np.atleast_1d(axes), panels):
        if key not in cols:
            continue
        finite = np.isfinite(cols[key])
        sparse = finite.sum() < 0.5 * len(finite)  # evaluation columns: a point every K steps
        ax.plot(cols["step"][finite], cols[key][finite], "o-" if sparse else "-", lw=1.2, ms=3)
        ax.set_title(title)
        ax.set_xlabel("step")
        values = cols[key][np.isfinite(cols[key])]
        if logy and values.size and (values > 0).all():
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
