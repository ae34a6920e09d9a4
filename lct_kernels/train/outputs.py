"""The trainer's outputs in its run folder: clearing them, sample grids, metrics.csv and
TensorBoard.  ``RunOutputs`` is a mixin of :class:`lct_kernels.train.loop.Trainer` (it reads
``self.out``, ``self.cfg``, ``self.data``, ``self.ema``, ``self.device``, ``self.step``)."""

import csv

import torch

from .pipeline import make_decoder
from .plots import save_image_grid
from .sampling import default_sigma_mid, sample

METRIC_FIELDS = ["step", "loss", "cm_loss", "diff_loss", "c", "N", "lr", "grad_norm",
                 "steps_per_s", "ot_ms", "skipped"]
EVAL_FIELDS = ["fd_1step", "fd_2step", "precision_1step", "recall_1step", "precision_2step",
               "recall_2step"]


class RunOutputs:
    """Sample grids (samples/), metrics.csv and the TensorBoard writer of one run folder."""

    def _clear_outputs(self):
        import shutil

        for folder in (self.ckpt_dir, self.sample_dir, self.out / "tensorboard"):
            shutil.rmtree(folder, ignore_errors=True)
        for name in ("metrics.csv", "loss.png", "summary.json"):
            (self.out / name).unlink(missing_ok=True)

    def write_samples(self, tag=None):
        """1- and 2-step sample grids of the EMA model into samples/."""
        cfg = self.cfg
        n = cfg.run.n_samples
        labels = None
        if self.data.num_classes:
            labels = torch.arange(n, device=self.device) % self.data.num_classes
        decode = self._grids.get("decode")
        if "decode" not in self._grids:
            decode = self._grids["decode"] = make_decoder(self.data.decoder, self.data.stats,
                                                          self.device)
        o = cfg.objective
        sigma_mid = cfg.run.sigma_mid or default_sigma_mid(o.sigma_min, o.sigma_max, o.rho)
        paths = {}
        for steps in (1, 2):
            g = torch.Generator(device=self.device).manual_seed(cfg.run.seed + 12345)
            with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
                x = sample(self.ema, (n,) + self.data.latent_shape, steps, labels, sigma_mid,
                           generator=g, device=self.device, sigma_min=o.sigma_min,
                           sigma_max=o.sigma_max, sigma_data=o.sigma_data, rho=o.rho)
            images = decode(x) if decode is not None else x
            name = f"step{tag if tag is not None else self.step:08d}_{steps}step.png"
            paths[steps] = save_image_grid(images, self.sample_dir / name, nrow=10 if labels is not None else None)
        return paths

    def _open_metrics(self):
        path = self.out / "metrics.csv"
        rows = []
        if path.exists() and self.step > 0:  # resumed: keep the rows up to the checkpoint
            with open(path, newline="") as fh:
                rows = [r for r in csv.DictReader(fh) if int(float(r["step"])) <= self.step]
        fh = open(path, "w", newline="")
        writer = csv.DictWriter(fh, fieldnames=METRIC_FIELDS + EVAL_FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
        fh.flush()
        return fh, writer

    def _tensorboard(self):
        if not self.cfg.run.tensorboard:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed
            return None
        return SummaryWriter(str(self.out / "tensorboard"))
