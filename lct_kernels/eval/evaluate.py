"""Evaluation of a trained model (``lct-eval``).

On the embedded digits, fully offline:
  * the Fréchet distance (FD) between generated and held-out images in the
    feature space of a small digit classifier (trained once, cached; its held-out
    accuracy is reported), and the same FD between the training and held-out
    images as the floor a perfect model would reach;
  * precision and recall (k-NN manifolds, k = 3) in that feature space;
  * class coverage and the per-class histogram of the classifier's labels for the
    samples (and, for a class-conditional model, how often it agrees with the
    requested class);
  * the sliced Wasserstein distance between generated and held-out latents.

On real data (``--real DIR``): FID and recall with torch-fidelity against a
folder of real images, computed with an Inception weights file the user
provides (``--inception-weights FILE``).  Nothing is ever downloaded.
"""

import functools
import json
import math
from pathlib import Path

import torch

from . import metrics as M
from ..train.data.digits import load_digits_split
from ..train.data.stats import LatentStats
from ..train.plots import image_grid
from ..train.sampling import default_sigma_mid, sample

K_NEAREST = 3


def _generate(model, state, cfg, steps, n, seed, device, sigma_mid, batch=500):
    """(latents (n, C, H, W), requested labels or None) from the EMA model."""
    o = cfg.objective
    num_classes = state["num_classes"]
    labels = torch.arange(n, device=device) % num_classes if num_classes else None
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for start in range(0, n, batch):
        m = min(batch, n - start)
        out.append(sample(model, (m,) + tuple(state["latent_shape"]), steps,
                          None if labels is None else labels[start:start + m], sigma_mid,
                          generator=g, device=device, sigma_min=o.sigma_min,
                          sigma_max=o.sigma_max, sigma_data=o.sigma_data, rho=o.rho))
    return torch.cat(out), labels


def digits_reference(state, cfg, cache_dir):
    """Held-out images and latents (encoded with the run's own autoencoder), the
    training images, and the cached classifier."""
    from ..train.data.autoencoder import DigitsAutoencoder
    from .digit_classifier import load_digit_classifier

    split = load_digits_split(holdout=cfg.data.holdout, seed=0)
    if len(split["test_images"]) < 2 * K_NEAREST:
        raise ValueError("data.holdout: evaluation needs held-out digits (holdout > 6)")
    dec = state["decoder"]
    ae = DigitsAutoencoder(**dec["config"])
    ae.load_state_dict(dec["state"])
    ae.eval()
    stats = LatentStats.from_state_dict(state["latent_stats"])
    with torch.no_grad():
        test_latents = stats.standardize(ae.encode(split["test_images"])[0])
    classifier, info = load_digit_classifier(cache_dir, holdout=cfg.data.holdout, seed=0)
    return {"test_images": split["test_images"], "test_labels": split["test_labels"],
            "train_images": split["train_images"], "test_latents": test_latents,
            "classifier": classifier, "classifier_info": info}


def evaluate_digits(model, state, cfg, decode, steps=(1, 2), n=1000, seed=0, sigma_mid=None,
                    device="cpu", cache_dir=None, reference=None):
    """Metrics of a digits run for each number of sampling steps.

    Returns {"classifier_test_accuracy", "fd_train_vs_heldout", "n", "steps": {
    "1": {...}, "2": {...}}}, plus the generated images under "images" (not JSON)."""
    from .digit_classifier import digit_features, predict_digits
    from ..train.pipeline import default_cache_dir

    ref = reference or digits_reference(state, cfg, cache_dir or cfg.data.cache_dir
                                        or default_cache_dir())
    clf = ref["classifier"]
    real_feats = digit_features(clf, ref["test_images"])
    result = {
        "n": n, "seed": seed,
        "classifier_test_accuracy": ref["classifier_info"]["test_accuracy"],
        "fd_train_vs_heldout": M.frechet_distance_features(
            digit_features(clf, ref["train_images"]), real_feats),
        "steps": {}, "images": {},
    }
    o = cfg.objective
    mid = sigma_mid or cfg.run.sigma_mid or default_sigma_mid(o.sigma_min, o.sigma_max, o.rho)
    for k in steps:
        latents, labels = _generate(model, state, cfg, k, n, seed, device, mid)
        images = decode(latents).cpu()
        feats = digit_features(clf, images)
        predicted = predict_digits(clf, images)
        hist = M.class_histogram(predicted, 10)
        entry = {
            "fd": M.frechet_distance_features(real_feats, feats),
            **M.precision_recall(real_feats, feats, k=K_NEAREST),
            "sliced_wasserstein_latent": M.sliced_wasserstein(latents.cpu(), ref["test_latents"]),
            "class_coverage": hist["coverage"], "class_histogram": hist["counts"],
            "class_entropy": hist["entropy"],
        }
        if labels is not None:
            entry["label_agreement"] = float((predicted == labels.cpu()).float().mean())
        if k == 2:
            entry["sigma_mid"] = mid
        result["steps"][str(k)] = entry
        result["images"][str(k)] = images
    return result


class PeriodicDigitsEval:
    """The trainer's periodic evaluation (``run.eval_every``), passed to
    ``Trainer(..., evaluator=PeriodicDigitsEval())`` by ``lct-train``.

    ``evaluator(trainer)`` returns {"fd_1step", "precision_1step", "recall_1step",
    "fd_2step", ...}: :func:`evaluate_digits` of the EMA model on ``run.eval_n``
    samples, or {} for data that is not the digits (other data sets need real images
    and Inception weights: ``lct-eval``).  The held-out reference and the decoder are
    built on the first call and reused.
    """

    def __init__(self):
        self._reference = None
        self._decode = None

    def __call__(self, trainer):
        from ..train.pipeline import default_cache_dir, make_decoder

        data, cfg = trainer.data, trainer.cfg
        if data.decoder.get("kind") != "digits":
            return {}
        state = {"num_classes": data.num_classes, "latent_shape": data.latent_shape,
                 "decoder": data.decoder, "latent_stats": data.stats.state_dict()}
        if self._reference is None:
            self._reference = digits_reference(state, cfg, cfg.data.cache_dir or default_cache_dir())
        if self._decode is None:
            self._decode = make_decoder(data.decoder, data.stats, trainer.device)
        result = evaluate_digits(trainer.ema, state, cfg, self._decode, n=cfg.run.eval_n,
                                 device=trainer.device, reference=self._reference)
        row = {}
        for k, e in result["steps"].items():
            row[f"fd_{k}step"] = e["fd"]
            row[f"precision_{k}step"] = e["precision"]
            row[f"recall_{k}step"] = e["recall"]
        return row


def check_real_data_inputs(real_dir, inception_weights):
    """Fails fast (before any sampling) when FID on real data cannot run: a missing
    weights file or real-image folder (FileNotFoundError naming what to provide), or
    torch-fidelity not installed (ImportError)."""
    weights = Path(inception_weights) if inception_weights else None
    if weights is None or not weights.is_file():
        raise FileNotFoundError(
            "FID on real data needs the Inception-v3 weights file that torch-fidelity uses "
            "(pt_inception-2015-12-05-6726825d.pth): download it once on a machine with "
            "internet access and pass --inception-weights FILE (nothing is downloaded at run "
            f"time); got {inception_weights!r}")
    if not real_dir or not Path(real_dir).is_dir():
        raise FileNotFoundError(f"--real: folder of real images not found: {real_dir}")
    try:
        import torch_fidelity  # noqa: F401
    except ImportError:
        raise ImportError("FID on real data needs torch-fidelity (pip install torch-fidelity)") from None
    st = weights.stat()
    _check_inception_weights(str(weights.resolve()), st.st_size, st.st_mtime_ns)
    return weights


# torch-fidelity's FeatureExtractorInceptionV3: its first convolution and its 1008-way fc
_INCEPTION_KEYS = {"Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "fc.weight": (1008, 2048)}


@functools.lru_cache(maxsize=4)
def _check_inception_weights(path, _size, _mtime_ns):
    """ValueError unless ``path`` holds an Inception-v3 state dict in torch-fidelity's
    layout (checked once per file version; torch-fidelity would fail deep inside)."""
    what = ("--inception-weights: expected torch-fidelity's Inception-v3 state dict "
            "(pt_inception-2015-12-05-6726825d.pth)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        raise ValueError(f"{what}; {path} is not a readable torch file "
                         f"({type(exc).__name__}: {exc})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{what}; {path} holds a {type(state).__name__}, not a state dict")
    for key, shape in _INCEPTION_KEYS.items():
        t = state.get(key)
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else ("missing" if t is None else type(t).__name__)
            raise ValueError(f"{what}; in {path}, {key} should have shape {shape}, got {got}")


def real_data_metrics(fake_dir, real_dir, inception_weights):
    """FID and precision/recall (torch-fidelity) of a folder of generated images against
    a folder of real ones (searched recursively, so class subfolders work), with a
    local Inception weights file (never downloaded).  Precision and recall use the
    same Inception pool features as FID (torch-fidelity's default for them is VGG16,
    whose weights would be a second download)."""
    weights = check_real_data_inputs(real_dir, inception_weights)
    import torch_fidelity

    out = torch_fidelity.calculate_metrics(
        input1=str(fake_dir), input2=str(real_dir), fid=True, prc=True, verbose=False,
        cuda=torch.cuda.is_available(), feature_extractor="inception-v3-compat",
        feature_layer_fid="2048", feature_layer_prc="2048", samples_find_deep=True,
        feature_extractor_weights_path=str(weights))
    return {"fid": float(out["frechet_inception_distance"]),
            "precision": float(out.get("precision", math.nan)),
            "recall": float(out.get("recall", math.nan))}


def save_panel(images_by_steps, real_images, path, per_row=10, count=50):
    """PNG: samples at 1 and 2 steps beside real images (one grid each)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(f"{k} step{'s' if k != '1' else ''}", imgs) for k, imgs in images_by_steps.items()]
    panels.append(("real (held out)", real_images))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    for ax, (title, imgs) in zip(axes, panels):
        grid = image_grid(imgs[:count], nrow=per_row)
        ax.imshow(grid[:, :, 0] if grid.shape[2] == 1 else grid, cmap="gray")
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def to_json(result):
    """The JSON-serialisable part of an ``evaluate_digits`` result."""
    return {k: v for k, v in result.items() if k != "images"}


def write_report(result, out_dir, real_images=None):
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(to_json(result), indent=2))
    if real_images is not None and result.get("images"):
        save_panel(result["images"], real_images, out / "eval_panel.png")
    return out / "eval.json"
