"""Stage 1 of the trainer: the digits, their autoencoder, latent files, image folders, latent stats.

CPU only and fast: autoencoders here train for at most a few hundred steps at
small widths, and every cache lives under pytest's tmp_path."""

import json
import sys
import warnings
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from lct_kernels.train import data as D
from lct_kernels.train.data import digits as DG
from lct_kernels.train.data.autoencoder import DigitsAutoencoder, reconstruction_mse, train_autoencoder

SMALL_AE = dict(latent_channels=2, ae_steps=150, ae_width=16, progress=False)


@pytest.fixture(scope="module")
def split():
    return D.load_digits_split()


def _rows(images):
    return Counter(row.tobytes() for row in images.reshape(len(images), -1).numpy())


# ----------------------------------------------------------------------------- load_digits_split
def test_digits_split_shapes_dtypes_and_range(split):
    assert split["train_images"].shape == (1500, 1, 8, 8)
    assert split["test_images"].shape == (297, 1, 8, 8)
    assert split["train_images"].dtype == split["test_images"].dtype == torch.float32
    assert split["train_labels"].shape == (1500,) and split["test_labels"].shape == (297,)
    assert split["train_labels"].dtype == split["test_labels"].dtype == torch.int64
    both = torch.cat([split["train_images"], split["test_images"]])
    # 0..16 maps onto [-1, 1] exactly: blank pixels are -1, full ink is +1
    assert both.min() == -1.0 and both.max() == 1.0
    assert set(split["train_labels"].tolist()) == set(range(10))


def test_digits_split_partitions_the_data_set_and_is_stratified(split):
    everything = D.load_digits_split(holdout=0)
    assert everything["test_images"].shape == (0, 1, 8, 8)
    assert _rows(split["train_images"]) + _rows(split["test_images"]) == _rows(
        everything["train_images"])
    per_class = torch.bincount(split["test_labels"], minlength=10)
    assert per_class.min() >= 27 and per_class.max() <= 33  # ~29.7 of each digit


def test_digits_split_is_deterministic_by_seed(split):
    again = D.load_digits_split(holdout=297, seed=0)
    for key in split:
        assert torch.equal(split[key], again[key])
    other = D.load_digits_split(holdout=297, seed=1)
    assert not torch.equal(split["test_images"], other["test_images"])
    small = D.load_digits_split(holdout=5, seed=3)  # below 10: a plain random split
    assert small["test_images"].shape[0] == 5
    assert torch.equal(small["test_labels"], D.load_digits_split(holdout=5, seed=3)["test_labels"])


@pytest.mark.parametrize("holdout", [-1, 1797, 5000, 2.5, True])
def test_digits_split_rejects_bad_holdout(holdout):
    with pytest.raises(ValueError, match="holdout"):
        D.load_digits_split(holdout=holdout)


def test_digits_split_without_sklearn_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"lct_kernels\[train\]"):
        D.load_digits_split()


# ----------------------------------------------------------------------------- autoencoder
def test_autoencoder_shapes_and_config_rebuild():
    ae = DigitsAutoencoder(latent_channels=3, width=16)
    x = torch.rand(5, 1, 8, 8) * 2 - 1
    mean, logvar = ae.encode(x)
    assert mean.shape == logvar.shape == (5, 3, 4, 4)
    y = ae.decode(mean)
    assert y.shape == (5, 1, 8, 8) and y.dtype == torch.float32
    assert y.abs().max() <= 1.0
    recon, m, lv = ae.train()(x)
    assert recon.shape == x.shape and m.shape == lv.shape == (5, 3, 4, 4)
    ae.eval()
    assert torch.equal(ae(x)[0], ae(x)[0])  # eval decodes the mean: no noise
    rebuilt = DigitsAutoencoder(**ae.config)
    rebuilt.load_state_dict(ae.state_dict())
    assert torch.equal(rebuilt.eval()(x)[0], ae(x)[0])


def test_autoencoder_rejects_bad_shapes_and_arguments():
    ae = DigitsAutoencoder(latent_channels=2, width=8)
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        ae.encode(torch.zeros(2, 1, 28, 28))
    with pytest.raises(ValueError, match=r"\(B, 2, 4, 4\)"):
        ae.decode(torch.zeros(2, 3, 4, 4))
    with pytest.raises(ValueError, match="width"):
        DigitsAutoencoder(width=0)
    with pytest.raises(ValueError, match="steps"):
        train_autoencoder(torch.zeros(4, 1, 8, 8), steps=0)


def test_training_lowers_reconstruction_error_far_below_untrained(split):
    torch.manual_seed(0)
    untrained = reconstruction_mse(DigitsAutoencoder().eval(), split["test_images"])  # ~0.8
    ae = train_autoencoder(split["train_images"], steps=300, progress=False)  # ~0.024 at 300
    assert not ae.training and next(ae.parameters()).device.type == "cpu"
    trained = reconstruction_mse(ae, split["test_images"])  # held-out digits
    assert trained < 0.06 * untrained, (trained, untrained)
    assert trained < 0.04


def test_training_is_deterministic_and_leaves_global_state_alone(split):
    images = split["train_images"][:300]
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = train_autoencoder(images, width=8, steps=20, batch_size=64, seed=7, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads  # trains on one thread, then restores
    b = train_autoencoder(images, width=8, steps=20, batch_size=64, seed=7, progress=False)
    c = train_autoencoder(images, width=8, steps=20, batch_size=64, seed=8, progress=False)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


# ----------------------------------------------------------------------------- digits_latents
@pytest.fixture(scope="module")
def digits_cache(tmp_path_factory):
    cache_dir = tmp_path_factory.mktemp("digits_cache")
    return cache_dir, D.digits_latents(cache_dir, **SMALL_AE)


def test_digits_latents_contents(digits_cache):
    cache_dir, out = digits_cache
    assert out["latents"].shape == (1500, 2, 4, 4) and out["latents"].dtype == torch.float32
    assert out["test_latents"].shape == (297, 2, 4, 4)
    assert out["labels"].shape == (1500,) and out["labels"].dtype == torch.int64
    assert out["test_images"].shape == (297, 1, 8, 8)
    assert out["train_images"].shape == (1500, 1, 8, 8)
    assert out["num_classes"] == 10
    ae = out["autoencoder"]
    assert isinstance(ae, DigitsAutoencoder) and not ae.training
    assert out["autoencoder_config"] == {"latent_channels": 2, "width": 16}
    # the latents are the posterior means of the train split under that autoencoder
    with torch.no_grad():
        assert torch.allclose(ae.encode(out["train_images"])[0], out["latents"], atol=1e-6)
    split = D.load_digits_split()
    assert torch.equal(out["train_images"], split["train_images"])
    cache_file = out["cache_file"]
    assert cache_file.startswith(str(cache_dir)) and (cache_dir / cache_file.split("/")[-1]).is_file()
    assert not list(cache_dir.glob("*.tmp"))  # atomic write left no temp file behind


def test_digits_latents_second_call_loads_the_cache(digits_cache, monkeypatch):
    cache_dir, first = digits_cache

    def no_training(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(DG, "train_autoencoder", no_training)
    second = D.digits_latents(cache_dir, **{**SMALL_AE, "progress": True})  # progress: not hashed
    assert second["cache_file"] == first["cache_file"]
    for key in ("latents", "labels", "test_latents", "test_labels", "test_images"):
        assert torch.equal(second[key], first[key])
    x = first["test_images"][:8]
    assert torch.equal(second["autoencoder"].decode(second["autoencoder"].encode(x)[0]),
                       first["autoencoder"].decode(first["autoencoder"].encode(x)[0]))


def test_digits_latents_different_arguments_use_different_files(tmp_path):
    a = D.digits_latents(tmp_path, latent_channels=1, ae_steps=10, ae_width=8, progress=False)
    b = D.digits_latents(tmp_path, latent_channels=1, ae_steps=11, ae_width=8, progress=False)
    c = D.digits_latents(tmp_path, latent_channels=1, ae_steps=10, ae_width=8, holdout=100,
                         progress=False)
    assert len({a["cache_file"], b["cache_file"], c["cache_file"]}) == 3
    assert len(list(tmp_path.glob("digits_latents-*.pt"))) == 3
    assert a["latents"].shape == (1500, 1, 4, 4) and c["latents"].shape == (1697, 1, 4, 4)


def test_digits_latents_retrains_over_a_corrupt_cache_with_a_warning(tmp_path, monkeypatch):
    args = dict(latent_channels=1, ae_steps=10, ae_width=8, progress=False)
    first = D.digits_latents(tmp_path, **args)
    with open(first["cache_file"], "wb") as f:
        f.write(b"not a torch file")
    with pytest.warns(UserWarning, match="unreadable"):
        again = D.digits_latents(tmp_path, **args)
    assert torch.equal(again["latents"], first["latents"])  # same seed, same autoencoder
    monkeypatch.setattr(DG, "train_autoencoder", lambda *a, **k: pytest.fail("retrained twice"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(D.digits_latents(tmp_path, **args)["latents"], first["latents"])


# ----------------------------------------------------------------------------- load_latents_file
@pytest.fixture
def z_and_y():
    return torch.randn(6, 4, 2, 2, dtype=torch.float64), torch.tensor([0, 3, 1, 1, 2, 0])


def _check(result, z, y):
    latents, labels = result
    assert latents.dtype == torch.float32 and latents.shape == z.shape
    assert torch.allclose(latents, z.float())
    if y is None:
        assert labels is None
    else:
        assert labels.dtype == torch.int64 and torch.equal(labels, y.long())


def _save(path, z, y):
    """Write latents z (and labels y, if given) the way a user of ``path``'s format would."""
    if path.suffix == ".npy":  # labels go in a sidecar <stem>.labels.npy
        np.save(path, z.numpy())
        if y is not None:
            np.save(path.with_name(path.stem + ".labels.npy"), y.numpy().astype(np.int32))
    elif path.suffix == ".npz":
        np.savez(path, latents=z.numpy(), **({} if y is None else {"labels": y.numpy()}))
    elif path.suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({"latents": z.float(), **({} if y is None else {"labels": y})}, str(path))
    else:  # .pt / .pth: a bare tensor when unlabelled, else a dict
        torch.save(z if y is None else {"latents": z.float(), "labels": y}, path)
    return path


@pytest.mark.parametrize("labelled", [True, False])
@pytest.mark.parametrize("suffix", [".npy", ".npz", ".pt", ".pth", ".safetensors"])
def test_latents_file_round_trip(tmp_path, z_and_y, suffix, labelled):
    z, y = z_and_y[0], z_and_y[1] if labelled else None
    path = _save(tmp_path / f"lat{suffix}", z, y)
    _check(D.load_latents_file(path), z, y)
    _check(D.load_latents_file(str(path)), z, y)  # str paths work too


def test_safetensors_missing_says_what_to_install(tmp_path, z_and_y, monkeypatch):
    (tmp_path / "s.safetensors").write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match="pip install safetensors"):
        D.load_latents_file(tmp_path / "s.safetensors")


def test_latents_file_errors_name_the_problem(tmp_path, z_and_y):
    z, y = z_and_y
    with pytest.raises(FileNotFoundError, match="nope.npy"):
        D.load_latents_file(tmp_path / "nope.npy")
    (tmp_path / "x.h5").write_bytes(b"")
    with pytest.raises(ValueError, match=r"\.h5.*\.npy.*\.safetensors"):
        D.load_latents_file(tmp_path / "x.h5")

    cases = {
        "flat.pt": (torch.randn(6, 16), r"\(N, D\).*\(N, C, H, W\)"),
        "three_d.pt": (torch.randn(6, 4, 4), r"\(N, C, H, W\)"),
        "empty.pt": (torch.randn(0, 4, 2, 2), "N >= 1"),
        "nan.pt": ({"latents": z.clone().index_fill_(0, torch.tensor([2]), float("nan"))},
                   "NaN or inf"),
        "short.pt": ({"latents": z, "labels": y[:5]}, "6 latents but 5 labels"),
        "negative.pt": ({"latents": z, "labels": y - 1}, ">= 0"),
        "fraction.pt": ({"latents": z, "labels": y.double() + 0.5}, "integer class indices"),
        "labels2d.pt": ({"latents": z, "labels": y[:, None]}, "1-D"),
        "nokey.pt": ({"z": z}, "no 'latents' entry; found \\['z'\\]"),
    }
    for name, (obj, message) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(ValueError, match=message):
            D.load_latents_file(tmp_path / name)

    (tmp_path / "junk.npz").write_bytes(b"definitely not a zip")
    with pytest.raises(ValueError, match="could not read latents file .*junk.npz"):
        D.load_latents_file(tmp_path / "junk.npz")
    torch.save([z], tmp_path / "list.pt")
    with pytest.raises(ValueError, match="tensor or a dict"):
        D.load_latents_file(tmp_path / "list.pt")


# ----------------------------------------------------------------------------- image folders
def _png(path, size=(6, 4), color=(255, 255, 255), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color if mode == "RGB" else color[0]).save(path)
    return path


def test_list_images_flat_folder_is_unlabelled(tmp_path):
    _png(tmp_path / "b.png")
    _png(tmp_path / "a.JPG")
    _png(tmp_path / "c.webp")
    (tmp_path / "notes.txt").write_text("ignored")
    paths, labels, names = D.list_images(tmp_path)
    assert [p.name for p in paths] == ["a.JPG", "b.png", "c.webp"]
    assert labels is None and names == []


def test_list_images_first_level_subfolders_are_classes(tmp_path):
    _png(tmp_path / "dog" / "x.png")
    _png(tmp_path / "cat" / "b.jpeg")
    _png(tmp_path / "cat" / "a.bmp")
    _png(tmp_path / "dog" / "nested" / "y.png")  # deeper files keep their first-level class
    paths, labels, names = D.list_images(str(tmp_path))
    assert [p.relative_to(tmp_path).as_posix() for p in paths] == [
        "cat/a.bmp", "cat/b.jpeg", "dog/nested/y.png", "dog/x.png"]
    assert names == ["cat", "dog"]
    assert labels.dtype == torch.int64 and labels.tolist() == [0, 0, 1, 1]


def test_list_images_mixed_layout_warns_and_is_unlabelled(tmp_path):
    _png(tmp_path / "top.png")
    _png(tmp_path / "cls" / "a.png")
    with pytest.warns(UserWarning, match="mixes"):
        paths, labels, names = D.list_images(tmp_path)
    assert len(paths) == 2 and labels is None and names == []


def test_load_image_center_crops_scales_and_resizes(tmp_path):
    img = Image.new("RGB", (6, 4), (255, 0, 0))  # 6 wide: red columns 0 and 5 are cropped
    img.paste((255, 255, 255), (1, 0, 3, 4))  # columns 1-2 white
    img.paste((0, 0, 0), (3, 0, 5, 4))  # columns 3-4 black
    img.save(tmp_path / "wide.png")
    x = D.load_image(tmp_path / "wide.png", 4)  # crop to the central 4x4, no resize
    assert x.shape == (3, 4, 4) and x.dtype == torch.float32
    assert torch.equal(x[:, :, :2], torch.ones(3, 4, 2))
    assert torch.equal(x[:, :, 2:], -torch.ones(3, 4, 2))
    big = D.load_image(tmp_path / "wide.png", 16)
    assert big.shape == (3, 16, 16) and big.min() >= -1 and big.max() <= 1
    gray = D.load_image(_png(tmp_path / "g.png", (5, 5), (128,), mode="L"), 5)
    assert gray.shape == (3, 5, 5)  # grayscale is converted to RGB
    assert torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=1e-6)


def test_image_folder_and_image_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        D.list_images(tmp_path / "missing")
    (tmp_path / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images"):
        D.list_images(tmp_path)
    (tmp_path / "bad.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="bad.png"):
        D.load_image(tmp_path / "bad.png", 8)
    with pytest.raises(ValueError, match="image_size"):
        D.load_image(_png(tmp_path / "ok.png"), 0)


def test_encode_image_folder_needs_a_local_vae_directory(tmp_path):
    _png(tmp_path / "imgs" / "a.png")
    with pytest.raises(FileNotFoundError, match="not a local directory.*config.json"):
        D.encode_image_folder(tmp_path / "imgs", "stabilityai/sd-vae-ft-mse")
    (tmp_path / "vae").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        D.encode_image_folder(tmp_path / "imgs", tmp_path / "vae")


def test_encode_image_folder_without_diffusers_says_what_to_install(tmp_path, monkeypatch):
    _png(tmp_path / "imgs" / "a.png")
    (tmp_path / "vae").mkdir()
    (tmp_path / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match="pip install diffusers"):
        D.encode_image_folder(tmp_path / "imgs", tmp_path / "vae", progress=False)


# ----------------------------------------------------------------------------- LatentStats
@pytest.fixture
def skewed_latents():
    g = torch.Generator().manual_seed(0)
    scale = torch.rand(3, 4, 4, generator=g) * 5 + 0.1
    offset = torch.randn(3, 4, 4, generator=g) * 10
    return torch.randn(400, 3, 4, 4, generator=g) * scale + offset


def test_latent_stats_standardize_to_target_std(skewed_latents):
    z = skewed_latents
    stats = D.LatentStats.compute(z)
    assert stats.mean.shape == stats.std.shape == (3, 4, 4)
    assert stats.mean.dtype == stats.std.dtype == torch.float32 and stats.target_std == 0.5
    z64 = z.double()
    assert torch.allclose(stats.mean.double(), z64.mean(0), rtol=1e-6, atol=1e-6)
    assert torch.allclose(stats.std.double(), z64.std(0, correction=0), rtol=1e-6)
    x = stats.standardize(z).double()
    assert torch.allclose(x.mean(0), torch.zeros(3, 4, 4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(0, correction=0), torch.full((3, 4, 4), 0.5, dtype=torch.float64),
                          rtol=1e-5)
    assert torch.allclose(stats.destandardize(stats.standardize(z)), z, rtol=1e-5, atol=1e-4)


def test_latent_stats_follow_the_input_dtype_and_other_targets(skewed_latents):
    stats = D.LatentStats.compute(skewed_latents, target_std=1.0)
    z64 = skewed_latents.double()
    x = stats.standardize(z64)
    assert x.dtype == torch.float64
    assert torch.allclose(x.std(0, correction=0), torch.ones(3, 4, 4, dtype=torch.float64),
                          rtol=1e-5)
    assert stats.standardize(skewed_latents[0]).shape == (3, 4, 4)  # one latent, no batch dim


def test_latent_stats_clamp_constant_elements():
    z = torch.randn(10, 1, 2, 2)
    z[:, 0, 0, 0] = 3.0
    stats = D.LatentStats.compute(z, eps=1e-3)
    assert stats.std[0, 0, 0] == pytest.approx(1e-3)
    assert torch.isfinite(stats.standardize(z)).all()


def test_latent_stats_state_dict_round_trip(tmp_path, skewed_latents):
    stats = D.LatentStats.compute(skewed_latents, target_std=0.5)
    torch.save(stats.state_dict(), tmp_path / "stats.pt")
    back = D.LatentStats.from_state_dict(torch.load(tmp_path / "stats.pt", weights_only=True))
    assert torch.equal(back.mean, stats.mean) and torch.equal(back.std, stats.std)
    assert back.target_std == stats.target_std
    assert torch.equal(back.standardize(skewed_latents), stats.standardize(skewed_latents))


def test_latent_stats_errors(skewed_latents):
    stats = D.LatentStats.compute(skewed_latents)
    with pytest.raises(ValueError, match=r"\(\.\.\., 3, 4, 4\)"):
        stats.standardize(torch.zeros(2, 4, 4, 4))
    with pytest.raises(ValueError, match="non-empty"):
        D.LatentStats.compute(torch.zeros(0, 3, 4, 4))
    with pytest.raises(ValueError, match="NaN"):
        D.LatentStats.compute(torch.full((2, 1, 1, 1), float("nan")))
    with pytest.raises(ValueError, match="missing \\['target_std'\\]"):
        D.LatentStats.from_state_dict({"mean": stats.mean, "std": stats.std})
    with pytest.raises(ValueError, match="> 0"):
        D.LatentStats(mean=stats.mean, std=stats.std, target_std=0.0)
