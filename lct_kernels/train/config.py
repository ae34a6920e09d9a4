"""Trainer configuration: dataclasses, presets, config files, dotted overrides, validation.

A config is a ``TrainConfig`` of five sections (data, model, objective, optim, run).
It is built from a preset, then a TOML/YAML file, then ``section.field=value``
overrides, and validated as a whole before any training starts: a bad key or
value raises ``ConfigError`` naming the field.
"""

import copy
import dataclasses
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path


class ConfigError(ValueError):
    """A config key or value is invalid (the message names the field)."""


@dataclass
class DataConfig:
    source: str = "digits"          # "digits" (embedded), "latents" (a file) or "images" (a folder + local VAE)
    latents: str = ""               # source=latents: .npy/.npz/.pt/.safetensors file
    images: str = ""                # source=images: a folder of images (class subfolders give labels)
    vae: str = ""                   # source=images: a local diffusers AutoencoderKL directory
    image_size: int = 256           # source=images: centre crop + resize
    conditional: bool = True        # class-conditional when labels exist
    latent_std: float = 0.5         # per-element standardisation target (sigma_data)
    holdout: int = 297              # digits: held-out images (for evaluation)
    latent_channels: int = 2        # digits autoencoder: latents (C, 4, 4)
    ae_steps: int = 1500            # digits autoencoder training steps (stage 1, cached)
    ae_width: int = 32
    cache_dir: str = ""             # "" -> $LCT_CACHE_DIR or ~/.cache/lct_kernels


@dataclass
class ModelConfig:
    size: str = "tiny"              # tiny, S, B, L, XL
    patch_size: int = 1             # 1, 2 or 4
    norm: str = "nsln"              # qk-norm: "nsln" (sLCT: unit weight frozen, learnable bias,
                                    # eps 1e-5) or "layernorm" (learnable weight and bias)
    norm_bias: bool = False         # a learnable bias on norm1/norm2/norm_final (not in the
                                    # authors' DiT, whose block norms have no affine)
    fused: bool = True              # fused kernels or eager PyTorch for the same math (a backend
                                    # choice: it never changes the model)
    dropout: float = 0.0
    depth: int = 0                  # 0: the size's; otherwise overrides it
    hidden_size: int = 0            # 0: the size's
    num_heads: int = 0              # 0: the size's

    @property
    def nsln(self):
        """Whether the qk-norm is NsLN (``norm == "nsln"``; the pre-issue-13 field's name)."""
        return self.norm == "nsln"


@dataclass
class ObjectiveConfig:
    loss: str = "cauchy"            # cauchy (sLCT), pseudo_huber (iCT), geman_mcclure
    c_convention: str = "mean"      # "mean": rho(mean_elems d^2), the paper code; "sum": rho(||d||^2), iCT
    c: float = 0.0                  # 0 -> 0.00054 * sqrt(D) (iCT's constant)
    adaptive_c: bool = True         # sLCT: a c per curriculum stage from stage 2 (c_schedule)
    c_schedule: str = "paper"       # paper: exp(-1.15 ln s - 0.85); anchored: c1 (s/s0)^-1.15;
                                    # measured: sqrt(median(m) / 2) from each stage's first batches
    c_measure_batches: int = 4      # c_schedule=measured: batches per stage that measure m
    diffusion_loss: bool = True     # sLCT: EDM-weighted diffusion loss on the small-sigma quarter
    diff_coef: float = 5.0
    diff_fraction: float = 0.75     # indices >= floor(fraction * N) take the diffusion loss
    ot: bool = True                 # sLCT: exact minibatch OT coupling of data and noise
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0
    sigma_data: float = 0.5
    p_mean: float = -1.1
    p_std: float = 2.0
    s0: int = 10
    s1: int = 640


@dataclass
class OTConfig:
    scope: str = "rank"             # "rank": couple each process's share (the paper code);
                                    # "global": all-gather the global batch, one exact coupling


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 1e-4
    eps: float = 1e-8
    batch_size: int = 128
    epochs: int = 0                 # > 0: K = floor(|D| / batch_size) * epochs steps (paper code),
                                    # instead of run.steps (which must then be 0)
    warmup_steps: int = 0           # linear lr warmup (0: constant lr, as the paper)
    grad_clip: float = 0.0          # max grad norm (0: no clipping, as the paper)
    ema_decay: float = 0.9999       # evaluation EMA
    ema_warmup: bool = False        # decay min(ema_decay, (1 + k) / (10 + k)): useful for short runs


@dataclass
class RunConfig:
    steps: int = 1000               # total steps K (0 when optim.epochs sets the budget)
    seed: int = 0
    device: str = "auto"            # auto (cuda if available), cpu, cuda, cuda:N
    precision: str = "auto"         # auto (bf16 autocast on GPU, fp32 on CPU), fp32, bf16
    backend: str = ""               # force an lct_kernels backend ("" = automatic)
    log_every: int = 50
    sample_every: int = 0           # 0 -> at the end only
    ckpt_every: int = 500
    keep_ckpts: int = 3
    max_nonfinite: int = 20         # consecutive non-finite losses before the run stops
    n_samples: int = 64             # images in each sample grid
    eval_every: int = 0             # digits: evaluate (FD, precision/recall) every K steps; 0: off
    eval_n: int = 500               # samples per step count for that evaluation
    sigma_mid: float = 0.0          # 2-step sampler; 0 -> the paper code's default
    progress: bool = True
    tensorboard: bool = True        # log to TensorBoard too, if it is installed
    compile: bool = False           # torch.compile(fullgraph=True) the model (our ops inside)
    # CPU runs: keep freed activations in glibc's heap (lct_kernels.tune_cpu_heap): no
    # page faults for the next step's; process-wide, glibc only
    cpu_heap: bool = True
    # skip non-finite steps on the device (no host read): "auto" = on CUDA only, where a host
    # read waits for the GPU; on the CPU a read is free and the guard's copies are not
    sync_free: str = "auto"         # auto, true, false


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    ot: OTConfig = field(default_factory=OTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self):
        return dataclasses.asdict(self)


SECTIONS = ("data", "model", "objective", "ot", "optim", "run")
MODEL_SIZES = ("tiny", "S", "B", "L", "XL")
NORMS = ("nsln", "layernorm")
C_SCHEDULES = ("paper", "anchored", "measured")
LOSSES = ("cauchy", "pseudo_huber", "geman_mcclure")

# Presets: overrides on the defaults (which are the sLCT recipe of the paper code).
_DEMO = {
    "model.size": "tiny", "model.patch_size": 2,
    "objective.s1": 160,
    "optim.lr": 1e-3, "optim.batch_size": 128, "optim.ema_decay": 0.999, "optim.ema_warmup": True,
    "optim.warmup_steps": 100, "model.norm_bias": True,
    "run.steps": 2000, "run.log_every": 50, "run.sample_every": 500, "run.ckpt_every": 500,
}
_ICT = {
    "objective.loss": "pseudo_huber", "objective.diffusion_loss": False, "objective.ot": False,
    "objective.adaptive_c": False, "model.norm": "layernorm", "model.norm_bias": False,
}
_PAPER = {
    "data.source": "latents", "model.size": "B", "model.patch_size": 2,
    "run.steps": 294_000, "run.log_every": 100, "run.sample_every": 10_000,
    "run.ckpt_every": 5_000,
}
# Table 1 of the sLCT paper, per data set (epochs, total batch); the rest is the paper
# code's recipe (the defaults).  The DiT-B/2 (130 M parameters) stands in for the
# paper's 152 M ADM UNet, which this trainer does not implement.
_TABLE1 = {**_PAPER, "run.steps": 0, "objective.c_schedule": "paper"}
PAPER_PRESETS = {
    "slct-celebahq256": {**_TABLE1, "optim.epochs": 1400, "optim.batch_size": 128},
    "slct-church256": {**_TABLE1, "optim.epochs": 1800, "optim.batch_size": 256},
    "slct-ffhq256": {**_TABLE1, "optim.epochs": 1400, "optim.batch_size": 128},
}
PRESETS = {
    "demo": dict(_DEMO),
    "slct": {**_DEMO},
    "ict": {**_DEMO, **_ICT},
    "slct-b2-128": {**_PAPER, "optim.batch_size": 128},
    "slct-b2-256": {**_PAPER, "optim.batch_size": 256, "run.steps": 504_000},
    "ict-b2-128": {**_PAPER, **_ICT, "optim.batch_size": 128},
    **PAPER_PRESETS,
}
PRESET_HELP = {
    "demo": "the embedded digits, tiny DiT, full sLCT recipe; about 2.5 minutes on 2 CPU cores",
    "slct": "same as demo (the full sLCT recipe on the embedded data)",
    "ict": "the iCT-in-latent baseline on the embedded data: Pseudo-Huber, no diffusion loss, "
           "no OT, constant c, plain LayerNorm",
    "slct-b2-128": "paper scale: DiT-B/2 on 4x32x32 latents (data.latents=FILE), batch 128",
    "slct-b2-256": "paper scale: DiT-B/2 on 4x32x32 latents (data.latents=FILE), batch 256",
    "ict-b2-128": "paper scale iCT baseline: DiT-B/2, batch 128, Pseudo-Huber, no OT/diffusion loss",
    "slct-celebahq256": "Table 1, CelebA-HQ 256: 1400 epochs at batch 128 (27 000 latents: "
                        "294 000 steps), DiT-B/2, s 10 -> 640, EMA 0.9999",
    "slct-church256": "Table 1, LSUN Church 256: 1800 epochs at batch 256 (252 454 latents with "
                      "flips: 1 774 800 steps), DiT-B/2",
    "slct-ffhq256": "Table 1, FFHQ 256: 1400 epochs at batch 128 (70 000 latents: 764 400 steps), "
                    "DiT-B/2",
}


def _field_types(section_cls):
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(section_cls)}


def _coerce(key, value, typ):
    """Converts a CLI string / file value to the field's type, or raises ConfigError."""
    if typ is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        try:
            number = float(str(value).replace("_", ""))
        except ValueError:
            raise ConfigError(f"{key}: expected an integer, got {value!r}") from None
        if not number.is_integer():
            raise ConfigError(f"{key}: expected an integer, got {value!r}")
        return int(number)
    if typ is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def set_field(cfg, key, value):
    """Sets ``section.field`` (dotted key) to ``value`` converted to the field's type.

    ``model.nsln`` (the field before issue 13, still in old checkpoints) is read as the
    model it built: true -> norm=nsln with the block-norm biases, false -> layernorm."""
    if key == "model.nsln":
        on = _coerce(key, value, bool)
        cfg.model.norm, cfg.model.norm_bias = ("nsln", True) if on else ("layernorm", False)
        return
    parts = key.split(".")
    if len(parts) != 2 or parts[0] not in SECTIONS:
        raise ConfigError(
            f"unknown config key {key!r}: keys are section.field with section one of "
            f"{', '.join(SECTIONS)}"
        )
    section = getattr(cfg, parts[0])
    types = _field_types(type(section))
    if parts[1] not in types:
        raise ConfigError(
            f"unknown config key {key!r}: {parts[0]} has fields {', '.join(sorted(types))}"
        )
    setattr(section, parts[1], _coerce(key, value, types[parts[1]]))


def apply_mapping(cfg, mapping, prefix=""):
    """Applies a nested dict (from TOML/YAML/JSON) of overrides."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"config {prefix or 'file'}: expected a table/mapping, got {mapping!r}")
    for name, value in mapping.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if isinstance(value, dict):
            if prefix:
                raise ConfigError(f"unknown config key {key!r}: too deeply nested")
            if name not in SECTIONS:
                raise ConfigError(f"unknown config section {name!r}: sections are {', '.join(SECTIONS)}")
            apply_mapping(cfg, value, key)
        else:
            set_field(cfg, key, value)


def load_config_file(path):
    """Reads a .toml, .yaml/.yml or .json config file into a nested dict."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config: file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text()
    try:
        if suffix == ".toml":
            import tomllib

            return tomllib.loads(text)
        if suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise ConfigError("--config: reading YAML needs PyYAML (pip install pyyaml)") from None
            return yaml.safe_load(text) or {}
        if suffix == ".json":
            return json.loads(text)
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of any of the three formats
        raise ConfigError(f"--config: cannot parse {path}: {exc}") from None
    raise ConfigError(f"--config: unsupported extension {suffix!r} (use .toml, .yaml, .yml or .json)")


def build_config(preset="demo", config_file=None, overrides=()):
    """preset -> file -> ``key=value`` overrides -> validate.  Returns a TrainConfig."""
    if preset not in PRESETS:
        raise ConfigError(f"--preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
    cfg = TrainConfig()
    for key, value in PRESETS[preset].items():
        set_field(cfg, key, value)
    if config_file:
        apply_mapping(cfg, load_config_file(config_file))
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.field=value")
        key, value = item.split("=", 1)
        set_field(cfg, key.strip(), value.strip())
    validate(cfg)
    return cfg


def from_dict(d):
    """Rebuilds a TrainConfig from ``to_dict()`` output (e.g. a checkpoint); unknown keys are errors."""
    cfg = TrainConfig()
    apply_mapping(cfg, copy.deepcopy(d))
    validate(cfg)
    return cfg


def _require(cond, key, message):
    if not cond:
        raise ConfigError(f"{key}: {message}")


def validate(cfg):
    """Checks every field's range and the cross-field rules; raises ConfigError naming the field."""
    d, m, o, p, r = cfg.data, cfg.model, cfg.objective, cfg.optim, cfg.run
    _require(d.source in ("digits", "latents", "images"), "data.source",
             f"must be digits, latents or images, got {d.source!r}")
    if d.source == "latents":
        _require(bool(d.latents), "data.latents",
                 "data.source=latents needs a file: pass --latents FILE or data.latents=FILE")
    if d.source == "images":
        _require(bool(d.images), "data.images", "data.source=images needs --images DIR")
        _require(bool(d.vae), "data.vae", "data.source=images needs --vae PATH (a local AutoencoderKL)")
    _require(d.image_size >= 8, "data.image_size", f"must be >= 8, got {d.image_size}")
    _require(d.latent_std > 0 and math.isfinite(d.latent_std), "data.latent_std", "must be > 0")
    _require(0 <= d.holdout < 1797, "data.holdout", f"must be in [0, 1797), got {d.holdout}")
    _require(d.latent_channels >= 1, "data.latent_channels", "must be >= 1")
    _require(d.ae_steps >= 1, "data.ae_steps", "must be >= 1")
    _require(d.ae_width >= 8, "data.ae_width", "must be >= 8")

    _require(m.size.upper() in {s.upper() for s in MODEL_SIZES}, "model.size",
             f"must be one of {', '.join(MODEL_SIZES)}, got {m.size!r}")
    _require(m.norm in NORMS, "model.norm", f"must be one of {', '.join(NORMS)}, got {m.norm!r}")
    _require(m.patch_size in (1, 2, 4), "model.patch_size", f"must be 1, 2 or 4, got {m.patch_size}")
    _require(0.0 <= m.dropout < 1.0, "model.dropout", f"must be in [0, 1), got {m.dropout}")
    for key in ("depth", "hidden_size", "num_heads"):
        _require(getattr(m, key) >= 0, f"model.{key}", "must be >= 0 (0: the size's value)")

    _require(o.loss in LOSSES, "objective.loss", f"must be one of {', '.join(LOSSES)}, got {o.loss!r}")
    _require(o.c_convention in ("mean", "sum"), "objective.c_convention",
             f"must be 'mean' (paper code) or 'sum' (iCT), got {o.c_convention!r}")
    _require(o.c >= 0 and math.isfinite(o.c), "objective.c", "must be >= 0 (0: the iCT constant)")
    _require(o.c_schedule in C_SCHEDULES, "objective.c_schedule",
             f"must be one of {', '.join(C_SCHEDULES)}, got {o.c_schedule!r}")
    _require(o.c_measure_batches >= 1, "objective.c_measure_batches",
             f"must be >= 1, got {o.c_measure_batches}")
    _require(o.diff_coef >= 0, "objective.diff_coef", "must be >= 0")
    _require(0 < o.diff_fraction < 1, "objective.diff_fraction", "must be in (0, 1)")
    _require(0 < o.sigma_min < o.sigma_max, "objective.sigma_min",
             "must satisfy 0 < sigma_min < sigma_max")
    _require(o.rho > 0, "objective.rho", "must be > 0")
    _require(o.sigma_data > 0, "objective.sigma_data", "must be > 0")
    _require(o.p_std > 0, "objective.p_std", "must be > 0")
    _require(o.s0 >= 1, "objective.s0", "must be >= 1")
    _require(o.s1 >= o.s0, "objective.s1", f"must be >= objective.s0 ({o.s0})")

    _require(cfg.ot.scope in ("rank", "global"), "ot.scope",
             f"must be 'rank' (per-process coupling) or 'global', got {cfg.ot.scope!r}")
    _require(p.lr > 0, "optim.lr", "must be > 0")
    _require(p.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    _require(p.eps > 0, "optim.eps", "must be > 0")
    _require(p.batch_size >= 2, "optim.batch_size", f"must be >= 2, got {p.batch_size}")
    _require(p.epochs >= 0, "optim.epochs", f"must be >= 0 (0: run.steps sets the budget), got {p.epochs}")
    _require(p.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    _require(p.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0: no clipping)")
    _require(0 <= p.ema_decay < 1, "optim.ema_decay", f"must be in [0, 1), got {p.ema_decay}")

    _require(r.steps >= 0, "run.steps", f"must be >= 1, got {r.steps}")
    _require(not (r.steps > 0 and p.epochs > 0), "run.steps",
             f"run.steps and optim.epochs are both set ({r.steps} and {p.epochs}): give one "
             "budget and set the other to 0")
    _require(r.steps > 0 or p.epochs > 0, "run.steps",
             "must be >= 1, got 0 (or set optim.epochs >= 1 for an epoch budget)")
    _require(r.device == "auto" or r.device == "cpu" or r.device.startswith("cuda"), "run.device",
             f"must be auto, cpu or cuda[:N], got {r.device!r}")
    _require(r.precision in ("auto", "fp32", "bf16"), "run.precision",
             f"must be auto, fp32 or bf16, got {r.precision!r}")
    _require(r.backend in ("", "cuda", "triton", "cpu", "torch"), "run.backend",
             f"must be empty (automatic) or cuda, triton, cpu, torch; got {r.backend!r}")
    for key in ("log_every", "ckpt_every", "keep_ckpts", "max_nonfinite", "n_samples"):
        _require(getattr(r, key) >= 1, f"run.{key}", f"must be >= 1, got {getattr(r, key)}")
    _require(r.sample_every >= 0, "run.sample_every", "must be >= 0 (0: at the end only)")
    _require(r.eval_every >= 0, "run.eval_every", "must be >= 0 (0: no evaluation)")
    _require(r.eval_every == 0 or r.eval_every % r.log_every == 0, "run.eval_every",
             f"must be a multiple of run.log_every ({r.log_every})")
    _require(r.eval_n >= 10, "run.eval_n", "must be >= 10")
    _require(r.sigma_mid == 0 or o.sigma_min < r.sigma_mid < o.sigma_max, "run.sigma_mid",
             "must be 0 (default) or strictly between sigma_min and sigma_max")
    return cfg


def resolve_total_steps(cfg, n_latents):
    """The run's total steps K for a data set of ``n_latents`` latents.

    ``run.steps`` if set; otherwise K = floor(|D| / B) * optim.epochs with B = optim.batch_size,
    as the paper code (train_cm_latent.py: ``total_training_steps =
    math.ceil(len(dataset) // global_batch_size) * epochs``, an epoch dropping its last
    partial batch)."""
    if cfg.run.steps > 0:
        return cfg.run.steps
    B = cfg.optim.batch_size
    if n_latents < B:
        raise ValueError(f"resolve_total_steps: optim.epochs needs at least one batch per epoch: "
                         f"the batch {B} exceeds the {n_latents} latents")
    return (n_latents // B) * cfg.optim.epochs


def save_config(cfg, path):
    """Writes the resolved config as TOML (readable back with --config)."""
    lines = []
    for section in SECTIONS:
        lines.append(f"[{section}]")
        for name, value in dataclasses.asdict(getattr(cfg, section)).items():
            lines.append(f"{name} = {_toml_value(value)}")
        lines.append("")
    Path(path).write_text("\n".join(lines))


def _toml_value(value):
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))
