"""The iCT / sLCT objective pieces, each against its formula (float64 references)."""

import math

import pytest
import torch

from lct_kernels.train import objective as obj
from lct_kernels.train.sampling import default_sigma_mid, sample, search_sigma_mid


class TestKarrasGrid:
    def test_endpoints_descending_and_formula(self):
        s = obj.karras_sigmas(11)
        assert s[0].item() == pytest.approx(80.0, rel=1e-12)
        assert s[-1].item() == pytest.approx(0.002, rel=1e-12)
        assert (s[:-1] > s[1:]).all()
        i = 4
        expected = (80 ** (1 / 7) + i / 10 * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
        assert s[i].item() == pytest.approx(expected, rel=1e-12)

    def test_rejects_fewer_than_two_points(self):
        with pytest.raises(ValueError, match="n must be >= 2"):
            obj.karras_sigmas(1)


class TestIndexSampler:
    def test_probabilities_are_erf_differences(self):
        s = obj.karras_sigmas(21)
        p = obj.index_probabilities(s)
        assert p.shape == (20,)
        assert p.sum().item() == pytest.approx(1.0, abs=1e-12)

        def cdf(sig):
            return math.erf((math.log(sig) + 1.1) / (math.sqrt(2) * 2.0))

        raw = [cdf(s[i].item()) - cdf(s[i + 1].item()) for i in range(20)]
        expected = torch.tensor(raw, dtype=torch.float64) / sum(raw)
        torch.testing.assert_close(p, expected, rtol=1e-10, atol=1e-12)

    def test_sampled_frequencies_follow_the_probabilities(self):
        s = obj.karras_sigmas(11)
        p = obj.index_probabilities(s)
        g = torch.Generator().manual_seed(0)
        idx = obj.sample_indices(p, 200_000, generator=g)
        assert idx.min() >= 0 and idx.max() <= 9
        freq = torch.bincount(idx, minlength=10).double() / idx.numel()
        torch.testing.assert_close(freq, p, atol=5e-3, rtol=0)


class TestCurriculum:
    def test_paper_schedule_has_seven_doubling_stages(self):
        K = 7000
        values = [obj.curriculum_intervals(k, K, 10, 640) for k in range(K)]
        assert sorted(set(values)) == [10, 20, 40, 80, 160, 320, 640]
        # K' = floor(K / (log2(64) + 1)) = 1000 steps per stage
        assert values[999] == 10 and values[1000] == 20 and values[6000] == 640

    def test_formula_and_cap(self):
        K, s0, s1 = 1000, 10, 160  # 5 stages of 200 steps
        for k in (0, 199, 200, 450, 799, 800, 999, 5000):
            expected = min(s0 * 2 ** (k // (K // 5)), s1)
            assert obj.curriculum_intervals(k, K, s0, s1) == expected


class TestWeightsAndC:
    def test_consistency_weight(self):
        s = obj.karras_sigmas(11)
        i = torch.tensor([0, 3, 9])
        torch.testing.assert_close(obj.consistency_weight(s, i), 1.0 / (s[i] - s[i + 1]))

    def test_stage_one_c_is_the_ict_constant(self):
        assert obj.cauchy_c(10, s0=10, dim=4096) == pytest.approx(0.00054 * 64)  # 0.03456
        assert obj.cauchy_c(10, s0=10, base_c=0.1) == 0.1

    @pytest.mark.parametrize("s, expected", [(20, 0.01364), (40, 0.00614), (80, 0.00277),
                                             (160, 0.00125), (320, 0.00056), (640, 0.00025)])
    def test_adaptive_c_from_stage_two(self, s, expected):
        assert obj.cauchy_c(s, s0=10, dim=4096) == pytest.approx(math.exp(-1.15 * math.log(s) - 0.85))
        assert obj.cauchy_c(s, s0=10, dim=4096) == pytest.approx(expected, rel=0.02)  # the digest rounds

    def test_constant_c_without_adaptive(self):
        assert obj.cauchy_c(640, s0=10, dim=4096, adaptive=False) == pytest.approx(0.03456)

    @pytest.mark.parametrize("loss", ["cauchy", "pseudo_huber", "geman_mcclure"])
    def test_sum_convention_equals_rho_of_the_squared_norm(self, loss):
        from lct_kernels.ops.robust_loss import LOSS_KINDS, rho_reference

        D, c = 64, 0.3
        m = torch.tensor([0.01, 0.5, 3.0], dtype=torch.float64)
        divisor, mult = obj.convention_scale(loss, "sum", D)
        kind = LOSS_KINDS[loss]
        via_kernel_form = mult * rho_reference(kind, m, c / divisor)
        direct = rho_reference(kind, D * m, c)
        torch.testing.assert_close(via_kernel_form, direct)
        assert obj.convention_scale(loss, "mean", D) == (1.0, 1.0)


class TestDiffusionLoss:
    def test_mask_is_index_space_quarter(self):
        N = 11  # floor(0.75 * 11) = 8
        idx = torch.arange(10)
        assert obj.diffusion_mask(idx, N).tolist() == [False] * 8 + [True] * 2
        N = 21  # floor(15.75) = 15
        assert obj.diffusion_mask(torch.arange(20), N).nonzero().flatten().tolist() == list(range(15, 20))

    def test_edm_weight(self):
        sig = torch.tensor([0.1, 1.0], dtype=torch.float64)
        torch.testing.assert_close(obj.edm_weight(sig), 1 / sig**2 + 1 / 0.25)


class TestParameterisation:
    def test_boundary_condition_f_equals_identity_at_sigma_min(self):
        sig = torch.tensor([0.002], dtype=torch.float64)
        c_skip, c_out, c_in = obj.cm_coefficients(sig)
        assert c_skip.item() == pytest.approx(1.0, abs=1e-15)
        assert c_out.item() == pytest.approx(0.0, abs=1e-15)
        assert c_in.item() == pytest.approx(1 / math.sqrt(0.002**2 + 0.25))

        class Garbage(torch.nn.Module):
            def forward(self, x, t, y=None):
                return torch.full_like(x, 123.0)

        x = torch.randn(3, 2, 4, 4)
        out = obj.denoise(Garbage(), x, torch.full((3,), 0.002))
        torch.testing.assert_close(out, x)

    def test_coefficients_match_the_formula(self):
        sig = torch.tensor([0.5, 80.0], dtype=torch.float64)
        c_skip, c_out, c_in = obj.cm_coefficients(sig)
        torch.testing.assert_close(c_skip, 0.25 / ((sig - 0.002) ** 2 + 0.25))
        torch.testing.assert_close(c_out, (sig - 0.002) * 0.5 / torch.sqrt(sig**2 + 0.25))

    def test_time_input_is_250_ln_sigma(self):
        sig = torch.tensor([0.002, 1.0, 80.0], dtype=torch.float64)
        torch.testing.assert_close(obj.time_input(sig), 250 * torch.log(sig))


class _Affine(torch.nn.Module):
    """F(x, t, y) = a * x: a differentiable stand-in for the network."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.3))

    def forward(self, x, t, y=None):
        return self.a * x


class TestLossAssembly:
    def test_matches_a_float64_reimplementation(self):
        torch.manual_seed(0)
        B, N = 16, 11
        data, noise = torch.randn(B, 2, 4, 4) * 0.5, torch.randn(B, 2, 4, 4)
        sigmas = obj.karras_sigmas(N)
        idx = torch.randint(0, N - 1, (B,))
        idx[:4] = torch.tensor([8, 9, 9, 8])  # some samples take the diffusion loss
        net = _Affine()
        total, cm, diff, mask = obj.consistency_losses(
            net, data, noise, None, idx, sigmas, loss="cauchy", c=0.05, diffusion=True,
            backend="torch")

        d, n, c = data.double(), noise.double(), 0.05
        a = 0.3

        def f(x, s):
            c_skip, c_out, c_in = obj.cm_coefficients(s.view(-1, 1, 1, 1))
            return c_skip * x + c_out * a * c_in * x

        t, t2 = sigmas[idx], sigmas[idx + 1]
        student = f(d + t.view(-1, 1, 1, 1) * n, t)
        teacher = f(d + t2.view(-1, 1, 1, 1) * n, t2)
        m = (student - teacher).pow(2).flatten(1).mean(1)
        cm_ref = torch.log1p(m / (2 * c * c)) / (t - t2)
        sel = idx >= 8
        e = (student - d).pow(2).flatten(1).mean(1)
        diff_ref = ((1 / t**2 + 4) * e)[sel].mean()
        torch.testing.assert_close(mask, sel)
        torch.testing.assert_close(cm.double(), cm_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(diff.double(), diff_ref, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(total.double(), cm_ref.mean() + 5 * diff_ref, rtol=1e-4, atol=1e-6)

    def test_gradient_reaches_the_student_only(self):
        torch.manual_seed(1)
        data, noise = torch.randn(8, 1, 2, 2), torch.randn(8, 1, 2, 2)
        net = _Affine()
        total, *_ = obj.consistency_losses(
            net, data, noise, None, torch.zeros(8, dtype=torch.long), obj.karras_sigmas(11),
            loss="pseudo_huber", c=0.1, diffusion=False)
        total.backward()
        assert net.a.grad is not None and torch.isfinite(net.a.grad)


class TestOTPairing:
    def test_unconditional_pairs_are_the_exact_assignment(self):
        from scipy.optimize import linear_sum_assignment

        torch.manual_seed(2)
        data, noise = torch.randn(32, 2, 4, 4), torch.randn(32, 2, 4, 4)
        x, n, y = obj.ot_pair(data, noise)
        assert torch.equal(x, data) and y is None
        cost = torch.cdist(data.flatten(1).double(), noise.flatten(1).double()) ** 2
        rows, cols = linear_sum_assignment(cost.numpy())
        assert torch.equal(n, noise[torch.as_tensor(cols)])

    def test_conditional_pairs_are_exact_within_each_class_and_labels_follow_data(self):
        from scipy.optimize import linear_sum_assignment

        torch.manual_seed(3)
        data, noise = torch.randn(40, 2, 4, 4), torch.randn(40, 2, 4, 4)
        labels = torch.arange(40) % 4
        x, n, y = obj.ot_pair(data, noise, labels)
        assert torch.equal(x, data) and torch.equal(y, labels)
        assert sorted(n.flatten(1).sum(1).tolist()) == sorted(noise.flatten(1).sum(1).tolist())
        for c in range(4):
            idx = (labels == c).nonzero().flatten()
            sub = torch.cdist(data[idx].flatten(1).double(), n[idx].flatten(1).double()) ** 2
            assert linear_sum_assignment(sub.numpy())[1].tolist() == list(range(len(idx)))


class TestSampling:
    def test_default_sigma_mid_is_the_paper_code_setting(self):
        s = obj.karras_sigmas(40)
        assert default_sigma_mid() == pytest.approx(s[22].item())
        assert 1.3 < default_sigma_mid() < 1.45

    def test_one_and_two_step_shapes_and_formula(self):
        net = _Affine()
        g = torch.Generator().manual_seed(0)
        x1 = sample(net, (5, 2, 4, 4), 1, generator=g)
        assert x1.shape == (5, 2, 4, 4) and x1.dtype == torch.float32
        g = torch.Generator().manual_seed(0)
        z = torch.randn(5, 2, 4, 4, generator=g)
        expected = obj.denoise(net, 80 * z, torch.full((5,), 80.0))
        torch.testing.assert_close(x1, expected.detach())
        x2 = sample(net, (5, 2, 4, 4), 2, sigma_mid=0.5, generator=torch.Generator().manual_seed(0))
        assert x2.shape == (5, 2, 4, 4) and not torch.equal(x1, x2)
        with pytest.raises(ValueError, match="steps"):
            sample(net, (2, 1, 2, 2), 3)
        with pytest.raises(ValueError, match="sigma_mid"):
            sample(net, (2, 1, 2, 2), 2, sigma_mid=100.0)

    def test_ternary_search_finds_the_minimum_of_a_unimodal_metric(self):
        best, value, history = search_sigma_mid(lambda s: (math.log(s) - math.log(0.8)) ** 2,
                                                lo=0.05, hi=10.0, iterations=20)
        assert best == pytest.approx(0.8, rel=0.02)
        assert len(history) == 40
