"""Sample-quality metrics (FD, precision/recall, sliced W2, class histogram) and the digits
classifier whose features they use.

CPU only and light: the metrics run on small toy sets with known answers, and the
classifier trains for a couple of hundred steps at most (caches under tmp_path)."""

import math
import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

from lct_kernels.eval import digit_classifier as DC
from lct_kernels.eval import metrics as M
from lct_kernels.train.data import load_digits_split

SMALL_STEPS = 200  # ~2 s on one thread, ~97% held-out accuracy


def _spd(d, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return scale * (a @ a.T / d + 0.1 * torch.eye(d, dtype=torch.float64))


def _fd_sqrtm_reference(mu1, s1, mu2, s2):
    # The textbook formula with scipy's general (non-symmetric) matrix square root.
    covmean = scipy.linalg.sqrtm(s1.numpy() @ s2.numpy())
    covmean = np.real(covmean)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1.numpy()) + np.trace(s2.numpy())
                 - 2 * np.trace(covmean))


# ----------------------------------------------------------------------------- feature statistics
def test_feature_statistics_match_numpy():
    x = torch.randn(50, 6)
    mu, sigma = M.feature_statistics(x)
    assert mu.dtype == sigma.dtype == torch.float64
    assert mu.shape == (6,) and sigma.shape == (6, 6)
    x64 = x.double().numpy()
    np.testing.assert_allclose(mu.numpy(), x64.mean(0), rtol=0, atol=1e-14)
    np.testing.assert_allclose(sigma.numpy(), np.cov(x64, rowvar=False, ddof=1), rtol=0, atol=1e-13)
    assert torch.equal(sigma, sigma.T)


@pytest.mark.parametrize("bad", [torch.randn(1, 4), torch.randn(5), torch.randn(3, 2, 2),
                                 torch.tensor([[0.0, float("nan")], [1.0, 2.0]])])
def test_feature_statistics_rejects_bad_input(bad):
    with pytest.raises(ValueError):
        M.feature_statistics(bad)
    with pytest.raises(TypeError, match="features"):
        M.feature_statistics(np.zeros((4, 2)))


# ----------------------------------------------------------------------------- Frechet distance
def test_frechet_distance_diagonal_closed_form():
    mu1 = torch.tensor([0.0, 1.0, -2.0, 0.5], dtype=torch.float64)
    mu2 = torch.tensor([1.0, 1.0, 0.0, -0.5], dtype=torch.float64)
    a = torch.tensor([1.0, 4.0, 0.25, 9.0], dtype=torch.float64)
    b = torch.tensor([2.0, 1.0, 0.25, 0.0], dtype=torch.float64)  # one zero variance
    expected = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    got = M.frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b))
    assert isinstance(got, float)
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_frechet_distance_general_spd_matches_sqrtm_reference(seed):
    d = 7
    g = torch.Generator().manual_seed(100 + seed)
    mu1, mu2 = torch.randn(2, d, generator=g, dtype=torch.float64)
    s1, s2 = _spd(d, 2 * seed), _spd(d, 2 * seed + 1, scale=3.0)
    got = M.frechet_distance(mu1, s1, mu2, s2)
    assert got == pytest.approx(_fd_sqrtm_reference(mu1, s1, mu2, s2), rel=1e-9, abs=1e-10)
    # symmetric in its two Gaussians
    assert M.frechet_distance(mu2, s2, mu1, s1) == pytest.approx(got, rel=1e-10)


def test_frechet_distance_is_zero_for_identical_and_stable_for_singular_covariances():
    d = 12
    mu, s = torch.randn(d, dtype=torch.float64), _spd(d, 5)
    assert abs(M.frechet_distance(mu, s, mu, s)) < 1e-8
    # Rank-3 covariance (D > N features): eigh keeps the trace term real, and for
    # equal covariances only the mean term is left.
    low = torch.randn(d, 3, dtype=torch.float64)
    singular = low @ low.T
    shift = torch.zeros(d, dtype=torch.float64)
    shift[0] = 2.0
    assert M.frechet_distance(mu, singular, mu + shift, singular) == pytest.approx(4.0, abs=1e-9)
    x = torch.randn(5, 20)  # 5 samples of 20 features: singular sample covariance
    assert abs(M.frechet_distance_features(x, x)) < 1e-8
    dead = torch.relu(torch.randn(300, 16) - 1.0)
    dead[:, :5] = 0.0  # dead ReLU units: zero-variance columns
    assert abs(M.frechet_distance_features(dead, dead.clone())) < 1e-8
    # singular vs full rank still matches the closed form on diagonal covariances
    a = torch.tensor([0.0, 0.0, 1.0, 4.0], dtype=torch.float64)
    b = torch.tensor([1.0, 0.0, 1.0, 1.0], dtype=torch.float64)
    z = torch.zeros(4, dtype=torch.float64)
    assert M.frechet_distance(z, torch.diag(a), z, torch.diag(b)) == pytest.approx(
        float((a.sqrt() - b.sqrt()).square().sum()), abs=1e-12)


def test_frechet_distance_of_gaussian_samples():
    d, n = 4, 20_000
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n, d, generator=g, dtype=torch.float64)
    assert M.frechet_distance_features(a, b) < 0.01  # sampling noise ~ D^2 / N
    shift = torch.tensor([1.0, -1.0, 1.0, 1.0], dtype=torch.float64)  # ||shift||^2 = 4
    assert M.frechet_distance_features(a, b + shift) == pytest.approx(4.0, abs=0.1)
    assert M.frechet_distance_features(a, b) == pytest.approx(M.frechet_distance_features(b, a),
                                                              rel=1e-9, abs=1e-12)


def test_frechet_distance_shape_checks():
    mu, s = torch.zeros(3), torch.eye(3)
    with pytest.raises(ValueError, match="mu2"):
        M.frechet_distance(mu, s, torch.zeros(4), s)
    with pytest.raises(ValueError, match="sigma2"):
        M.frechet_distance(mu, s, mu, torch.eye(4))
    with pytest.raises(ValueError, match="sigma1"):
        M.frechet_distance(mu, torch.zeros(3), mu, s)
    with pytest.raises(ValueError, match="mu1"):
        M.frechet_distance(torch.zeros(3, 1), s, mu, s)
    with pytest.raises(TypeError, match="sigma1"):
        M.frechet_distance(mu, [[1.0]], mu, s)
    with pytest.raises(ValueError, match="same D"):
        M.frechet_distance_features(torch.randn(5, 3), torch.randn(5, 4))


# ----------------------------------------------------------------------------- precision / recall
def _pr_reference(real, fake, k):
    # Naive: full distance matrices, sorted rows.
    def radii(x):
        d = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")
        return d.sort(dim=1).values[:, k]  # column 0 is the point itself
    real, fake = real.double(), fake.double()
    d_fr = torch.cdist(fake, real, compute_mode="donot_use_mm_for_euclid_dist")
    precision = (d_fr <= radii(real)[None, :]).any(1).double().mean().item()
    recall = (d_fr.T <= radii(fake)[None, :]).any(1).double().mean().item()
    return precision, recall


def test_precision_recall_identical_and_disjoint_sets():
    real = torch.randn(200, 5)
    assert M.precision_recall(real, real.clone(), k=3) == {"precision": 1.0, "recall": 1.0}
    far = M.precision_recall(real, real + 100.0, k=3)
    assert far == {"precision": 0.0, "recall": 0.0}


def test_precision_recall_mode_dropping_is_exact():
    # Two clusters 1000 apart, each of diameter < 2; the fake set is exactly the
    # first cluster: every fake point is a real point (precision 1), and the fake
    # balls (radius < 2) cover only that cluster: recall exactly 1/2.
    g = torch.Generator().manual_seed(0)
    a = torch.rand(60, 3, generator=g)
    b = torch.rand(60, 3, generator=g) + torch.tensor([1000.0, 0.0, 0.0])
    real = torch.cat([a, b])
    out = M.precision_recall(real, a, k=3)
    assert out == {"precision": 1.0, "recall": 0.5}
    # and the other way round: the fake set covers both modes, the real set one
    swapped = M.precision_recall(a, real, k=3)
    assert swapped == {"precision": 0.5, "recall": 1.0}


def test_precision_recall_exact_with_duplicates():
    # With k=1 and every point duplicated, each radius is exactly 0: only exact
    # distances (no |a|^2 + |b|^2 - 2ab rounding) keep the twins inside each other's ball.
    x = torch.randn(40, 8) * 1e3
    real = torch.cat([x, x])
    assert M.precision_recall(real, x, k=1)["precision"] == 1.0
    assert M.precision_recall(real, x + 1e-3, k=1)["precision"] == 0.0


def test_precision_recall_blocks_match_naive_reference(monkeypatch):
    g = torch.Generator().manual_seed(1)
    real = torch.randn(130, 4, generator=g)
    fake = torch.randn(97, 4, generator=g) * 1.3 + 0.4
    want = _pr_reference(real, fake, k=5)
    got = M.precision_recall(real, fake, k=5)
    assert (got["precision"], got["recall"]) == want
    assert 0.0 < want[0] < 1.0 and 0.0 < want[1] < 1.0  # a non-trivial case
    monkeypatch.setattr(M, "_BLOCK_ELEMENTS", 7)  # many ragged row blocks
    assert M.precision_recall(real, fake, k=5) == got
    # (N, ...) inputs are flattened
    assert M.precision_recall(real.reshape(130, 2, 2), fake.reshape(97, 2, 2), k=5) == got


@pytest.mark.parametrize("k", [0, -1, 10, 11, True, 2.0])
def test_precision_recall_rejects_bad_k(k):
    with pytest.raises(ValueError, match="k"):
        M.precision_recall(torch.randn(10, 2), torch.randn(20, 2), k=k)


def test_precision_recall_rejects_bad_sets():
    with pytest.raises(ValueError, match="same number of features"):
        M.precision_recall(torch.randn(10, 2), torch.randn(10, 3))
    with pytest.raises(ValueError, match="fake"):
        M.precision_recall(torch.randn(10, 2), torch.randn(10))
    with pytest.raises(ValueError, match="NaN"):
        M.precision_recall(torch.full((10, 2), float("nan")), torch.randn(10, 2))


# ----------------------------------------------------------------------------- sliced Wasserstein
def test_sliced_wasserstein_zero_for_identical_sets():
    x = torch.randn(100, 3, 4)
    assert M.sliced_wasserstein(x, x.clone()) == 0.0
    assert M.sliced_wasserstein(x, x[torch.randperm(100)]) < 1e-12  # order does not matter


@pytest.mark.parametrize("seed", [0, 3])
def test_sliced_wasserstein_is_exact_w2_in_one_dimension(seed):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 1, generator=g, dtype=torch.float64)
    y = torch.rand(300, 1, generator=g, dtype=torch.float64) * 3
    exact = (x.flatten().sort().values - y.flatten().sort().values).square().mean().sqrt().item()
    got = M.sliced_wasserstein(x, y, n_projections=5, seed=seed)
    assert got == pytest.approx(exact, rel=1e-12)
    assert M.sliced_wasserstein(x, x + 0.75, seed=seed) == pytest.approx(0.75, rel=1e-12)


def test_sliced_wasserstein_grows_with_the_shift():
    d = 4
    g = torch.Generator().manual_seed(2)
    x = torch.randn(200, d, generator=g, dtype=torch.float64)
    s = torch.tensor([1.0, -2.0, 0.5, 1.0], dtype=torch.float64)
    values = [M.sliced_wasserstein(x, x + c * s, n_projections=4096) for c in (0.5, 1.0, 2.0, 4.0)]
    assert values == sorted(values) and values[0] > 0
    # The same directions for every call: W2 is linear in the shift.
    assert values[2] == pytest.approx(2 * values[1], rel=1e-10)
    # sqrt(E <s, theta>^2) over uniform unit theta in R^d is ||s|| / sqrt(d)
    assert values[1] == pytest.approx(s.norm().item() / math.sqrt(d), rel=0.05)


def test_sliced_wasserstein_different_sizes():
    # Midpoint grids on [0, 1]: every interior quantile of y is exactly its level q;
    # x (smaller) agrees except at levels outside [0.5/N, 1 - 0.5/N], where it is
    # held at its end samples.
    n, m = 10, 40
    x = ((torch.arange(n, dtype=torch.float64) + 0.5) / n)[:, None]
    y = ((torch.arange(m, dtype=torch.float64) + 0.5) / m)[:, None]
    q = (torch.arange(m, dtype=torch.float64) + 0.5) / m
    expected = (q.clamp(0.5 / n, 1 - 0.5 / n) - q).square().mean().sqrt().item()
    assert M.sliced_wasserstein(x, y) == pytest.approx(expected, rel=1e-12)
    assert M.sliced_wasserstein(y, x) == pytest.approx(expected, rel=1e-12)
    # constant sets of different sizes: the distance between the constants
    assert M.sliced_wasserstein(torch.full((3, 1), 2.0), torch.full((8, 1), -1.0)) == \
        pytest.approx(3.0, rel=1e-12)
    # multi-dimensional, different sizes, same distribution: small
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(2000, 3, generator=g), torch.randn(1500, 3, generator=g)
    assert M.sliced_wasserstein(a, b) < 0.1 < M.sliced_wasserstein(a, b + 1.0)


def test_sliced_wasserstein_seeding_and_validation():
    x, y = torch.randn(50, 6), torch.randn(60, 6) + 0.3
    state = torch.get_rng_state()
    v0 = M.sliced_wasserstein(x, y, n_projections=16, seed=0)
    assert torch.equal(state, torch.get_rng_state())  # global RNG untouched
    assert M.sliced_wasserstein(x, y, n_projections=16, seed=0) == v0
    assert M.sliced_wasserstein(x, y, n_projections=16, seed=1) != v0
    with pytest.raises(ValueError, match="same number of features"):
        M.sliced_wasserstein(x, torch.randn(50, 5))
    with pytest.raises(ValueError, match="n_projections"):
        M.sliced_wasserstein(x, y, n_projections=0)
    with pytest.raises(ValueError, match="1-D"):
        M.sliced_wasserstein(torch.randn(50), torch.randn(50))
    with pytest.raises(ValueError, match="at least 1 sample"):
        M.sliced_wasserstein(torch.randn(0, 6), y)


# ----------------------------------------------------------------------------- class histogram
def test_class_histogram_counts_coverage_entropy():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 18 + [3] * 2)  # N = 100, 5 classes
    h = M.class_histogram(labels, 5)
    assert h["counts"] == [50, 30, 18, 2, 0]
    assert h["coverage"] == pytest.approx(4 / 5)
    # threshold 0.25 * 100 / 5 = 5 samples: class 3 (2 samples) does not count
    assert h["coverage_quarter"] == pytest.approx(3 / 5)
    p = np.array([0.5, 0.3, 0.18, 0.02])
    assert h["entropy"] == pytest.approx(-(p * np.log(p)).sum() / np.log(5), rel=1e-12)

    uniform = M.class_histogram(torch.arange(10).repeat(7), 10)
    assert uniform["coverage"] == uniform["coverage_quarter"] == 1.0
    assert uniform["entropy"] == pytest.approx(1.0, abs=1e-12)
    single = M.class_histogram(torch.full((9,), 4), 10)
    assert single["counts"][4] == 9 and single["coverage"] == pytest.approx(0.1)
    assert single["entropy"] == 0.0
    assert M.class_histogram(torch.tensor([1.0, 0.0]), 2)["counts"] == [1, 1]


@pytest.mark.parametrize("labels,num_classes,err", [
    (torch.tensor([0, 10]), 10, ValueError), (torch.tensor([-1]), 10, ValueError),
    (torch.tensor([], dtype=torch.int64), 10, ValueError), (torch.zeros(2, 2), 10, ValueError),
    (torch.tensor([0.5]), 10, ValueError), (torch.tensor([0]), 0, ValueError),
    ([0, 1], 10, TypeError)])
def test_class_histogram_rejects_bad_input(labels, num_classes, err):
    with pytest.raises(err):
        M.class_histogram(labels, num_classes)


# ----------------------------------------------------------------------------- digit classifier
@pytest.fixture(scope="module")
def classifier(tmp_path_factory):
    cache = tmp_path_factory.mktemp("clf_cache")
    model, info = DC.load_digit_classifier(cache, steps=SMALL_STEPS)
    return model, info, cache


def test_classifier_trains_and_reports_accuracy(classifier):
    model, info, cache = classifier
    assert isinstance(model, DC.DigitClassifier) and not model.training
    assert info["test_accuracy"] > 0.9 and info["train_accuracy"] > 0.9
    assert info["cache_file"].startswith(str(cache)) and info["cache_file"].endswith(".pt")
    split = load_digits_split()
    preds = DC.predict_digits(model, split["test_images"])
    assert preds.dtype == torch.int64 and preds.shape == (297,)
    assert (preds == split["test_labels"]).double().mean().item() == info["test_accuracy"]


def test_classifier_cache_hit_does_not_train(classifier, monkeypatch):
    model, info, cache = classifier

    def boom(*args, **kwargs):
        raise AssertionError("trained although the cache should have been used")

    monkeypatch.setattr(DC, "train_digit_classifier", boom)
    again, info2 = DC.load_digit_classifier(cache, steps=SMALL_STEPS)
    assert info2 == info
    for (k, v), (k2, v2) in zip(model.state_dict().items(), again.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)


def test_classifier_cache_is_keyed_by_arguments_and_rebuilds_corrupt_files(tmp_path, monkeypatch):
    calls = []

    def stub(images, labels, *, steps, seed, progress):  # an untrained model, instantly
        calls.append((images.shape[0], steps, seed))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return DC.DigitClassifier().eval()

    monkeypatch.setattr(DC, "train_digit_classifier", stub)
    _, info_a = DC.load_digit_classifier(tmp_path, steps=5)
    _, info_b = DC.load_digit_classifier(tmp_path, steps=6)
    _, info_c = DC.load_digit_classifier(tmp_path, steps=5, holdout=97, seed=1)
    assert calls == [(1500, 5, 0), (1500, 6, 0), (1700, 5, 1)]
    assert len({info_a["cache_file"], info_b["cache_file"], info_c["cache_file"]}) == 3

    with open(info_a["cache_file"], "wb") as f:
        f.write(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        _, info = DC.load_digit_classifier(tmp_path, steps=5)
    assert len(calls) == 4 and info["cache_file"] == info_a["cache_file"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the rewritten file loads cleanly
        DC.load_digit_classifier(tmp_path, steps=5)
    assert len(calls) == 4
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(ValueError, match="steps"):
        DC.load_digit_classifier(tmp_path, steps=0)


def test_classifier_training_is_deterministic_and_leaves_global_state():
    split = load_digits_split()
    x, y = split["train_images"][:256], split["train_labels"][:256]
    threads = torch.get_num_threads()
    rng = torch.get_rng_state()
    a = DC.train_digit_classifier(x, y, steps=15, seed=3)
    b = DC.train_digit_classifier(x, y, steps=15, seed=3)
    c = DC.train_digit_classifier(x, y, steps=15, seed=4)
    assert torch.equal(rng, torch.get_rng_state())
    assert torch.get_num_threads() == threads
    assert not a.training
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_classifier_features_and_predictions(classifier):
    model, _, _ = classifier
    images = load_digits_split()["test_images"][:37]
    model.train()  # the helpers evaluate in eval mode and restore the caller's mode
    feats = DC.digit_features(model, images, batch_size=10)
    assert model.training
    model.eval()
    assert feats.shape == (37, model.feature_dim) and feats.dtype == torch.float32
    assert 64 <= model.feature_dim <= 128
    torch.testing.assert_close(feats, model.features(images).detach())
    logits = model(images).detach()
    assert torch.equal(DC.predict_digits(model, images, batch_size=8), logits.argmax(1))
    assert DC.digit_features(model, images[:0]).shape == (0, model.feature_dim)
    assert DC.predict_digits(model, images[:0]).shape == (0,)
    # features of the real test set vs a blurred copy: the metrics see the difference
    blurred = torch.nn.functional.avg_pool2d(images, 3, stride=1, padding=1,
                                             count_include_pad=False)
    ref = DC.digit_features(model, load_digits_split()["train_images"][:300])
    assert M.frechet_distance_features(ref, feats) < M.frechet_distance_features(
        ref, DC.digit_features(model, blurred))


def test_classifier_input_validation(classifier):
    model, _, _ = classifier
    with pytest.raises(ValueError, match="shape"):
        DC.digit_features(model, torch.zeros(2, 1, 7, 8))
    with pytest.raises(TypeError, match="images"):
        DC.predict_digits(model, torch.zeros(2, 1, 8, 8, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch_size"):
        DC.digit_features(model, torch.zeros(2, 1, 8, 8), batch_size=0)
    x = torch.zeros(4, 1, 8, 8)
    with pytest.raises(ValueError, match="labels"):
        DC.train_digit_classifier(x, torch.zeros(3, dtype=torch.int64), steps=1)
    with pytest.raises(ValueError, match="labels"):
        DC.train_digit_classifier(x, torch.full((4,), 10), steps=1)
    with pytest.raises(TypeError, match="labels"):
        DC.train_digit_classifier(x, torch.zeros(4), steps=1)
    with pytest.raises(ValueError, match="steps"):
        DC.train_digit_classifier(x, torch.zeros(4, dtype=torch.int64), steps=0)
