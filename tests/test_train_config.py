"""Trainer config: presets, files, dotted overrides, and errors that name the field."""

import pytest

from lct_kernels.train.config import (
    PRESETS, ConfigError, TrainConfig, build_config, from_dict, save_config,
)


def test_defaults_are_the_paper_code_recipe():
    cfg = TrainConfig()
    o, p = cfg.objective, cfg.optim
    assert (o.sigma_min, o.sigma_max, o.rho, o.sigma_data) == (0.002, 80.0, 7.0, 0.5)
    assert (o.p_mean, o.p_std, o.s0, o.s1) == (-1.1, 2.0, 10, 640)
    assert (o.loss, o.diff_coef, o.diff_fraction, o.ot, o.adaptive_c) == ("cauchy", 5.0, 0.75, True, True)
    assert (p.lr, p.weight_decay, p.ema_decay, p.grad_clip, p.warmup_steps) == (1e-4, 1e-4, 0.9999, 0, 0)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_builds(name, tmp_path):
    extra = [f"data.latents={tmp_path / 'x.npy'}"] if name.endswith(("128", "256")) else []
    cfg = build_config(name, overrides=extra)
    assert isinstance(cfg, TrainConfig)


def test_ict_preset_is_the_baseline():
    cfg = build_config("ict")
    assert cfg.objective.loss == "pseudo_huber"
    assert not cfg.objective.diffusion_loss and not cfg.objective.ot and not cfg.objective.adaptive_c
    assert not cfg.model.nsln


def test_paper_presets_are_dit_b2_and_need_a_latents_file():
    with pytest.raises(ConfigError, match="data.latents"):
        build_config("slct-b2-128")
    cfg = build_config("slct-b2-256", overrides=["data.latents=z.npy"])
    assert (cfg.model.size, cfg.model.patch_size, cfg.optim.batch_size) == ("B", 2, 256)


def test_overrides_are_typed():
    cfg = build_config("demo", overrides=["optim.lr=3e-4", "run.steps=1_000", "model.nsln=false",
                                          "objective.loss=geman_mcclure"])
    assert cfg.optim.lr == 3e-4 and cfg.run.steps == 1000 and cfg.model.nsln is False
    assert cfg.objective.loss == "geman_mcclure"


@pytest.mark.parametrize("override, field", [
    ("optim.lrr=1", "optim.lrr"),
    ("nosection.x=1", "nosection.x"),
    ("optim.lr=fast", "optim.lr"),
    ("optim.lr=-1", "optim.lr"),
    ("run.steps=2.5", "run.steps"),
    ("run.steps=0", "run.steps"),
    ("model.nsln=maybe", "model.nsln"),
    ("model.patch_size=3", "model.patch_size"),
    ("model.size=huge", "model.size"),
    ("objective.loss=l2", "objective.loss"),
    ("objective.c_convention=median", "objective.c_convention"),
    ("objective.s1=5", "objective.s1"),
    ("optim.ema_decay=1.0", "optim.ema_decay"),
    ("run.sigma_mid=100", "run.sigma_mid"),
    ("data.source=web", "data.source"),
])
def test_bad_keys_and_values_name_the_field(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        build_config("demo", overrides=[override])


def test_override_without_equals_sign():
    with pytest.raises(ConfigError, match="section.field=value"):
        build_config("demo", overrides=["optim.lr"])


def test_unknown_preset():
    with pytest.raises(ConfigError, match="preset"):
        build_config("nope")


@pytest.mark.parametrize("suffix, text", [
    (".toml", "[optim]\nlr = 0.002\n[run]\nsteps = 7\n"),
    (".yaml", "optim:\n  lr: 0.002\nrun:\n  steps: 7\n"),
    (".json", '{"optim": {"lr": 0.002}, "run": {"steps": 7}}'),
])
def test_config_files(tmp_path, suffix, text):
    path = tmp_path / f"c{suffix}"
    path.write_text(text)
    cfg = build_config("demo", path, overrides=["run.steps=9"])  # overrides win over the file
    assert cfg.optim.lr == 0.002 and cfg.run.steps == 9


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        build_config("demo", tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[optim]\nlr = \n")
    with pytest.raises(ConfigError, match="cannot parse"):
        build_config("demo", bad)
    wrong = tmp_path / "wrong.toml"
    wrong.write_text("[optimizer]\nlr = 1\n")
    with pytest.raises(ConfigError, match="optimizer"):
        build_config("demo", wrong)


def test_saved_config_round_trips(tmp_path):
    cfg = build_config("ict", overrides=["optim.lr=2e-4", "data.cache_dir=/tmp/x y"])
    save_config(cfg, tmp_path / "config.toml")
    again = build_config("demo", tmp_path / "config.toml")
    assert again == cfg
    assert from_dict(cfg.to_dict()) == cfg
