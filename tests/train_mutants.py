"""Hand mutants of the trainer's formulas (tests/README.md, "Mutants tried").

    python tests/train_mutants.py [NAME-SUBSTRING ...]

Copies lct_kernels/ and tests/ to a temporary folder, applies each mutant there (one
exact text replacement), runs the formula tests that should catch it with ``-x`` against
that copy (PYTHONPATH), and prints CAUGHT (with the first failing test) or SURVIVED.  The
checkout itself is never modified.  A mutant whose text is no longer in the source
prints NOT APPLIED: update its text when the code moves.  About 10-15 minutes on 2 cores.
"""
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
T = "tests/test_train_formulas.py"
S = "tests/test_train_formulas_step.py"
BUDGET = "tests/test_train_budget.py"
CSCHED = "tests/test_train_c_schedule.py"
PREC = "tests/test_train_precision.py"
NORM = "tests/test_train_norm.py"
INSPECT = "tests/test_train_inspect.py"
RADAM = "tests/test_optim_fused_radam.py"
UPDATE = "tests/test_train_fused_update.py"
GELU = "tests/test_bias_gelu.py"
GATED = "tests/test_gated_residual.py"
MODEL = "tests/test_train_model.py"
HEAP = "tests/test_cpu_heap.py"
M = [
 ("reuse z in the 2-step sampler", "train/sampling.py",
  "z2 = torch.randn(shape, generator=generator, device=device, dtype=torch.float32)", "z2 = z", [T]),
 ("EMA: decay and 1 - decay swapped", "train/loop.py",
  "torch._foreach_lerp_(ema_params, params, 1.0 - decay)", "torch._foreach_lerp_(ema_params, params, decay)", [T]),
 ("EMA warm-up (1+k)/(10+k) -> k/(10+k)", "train/loop.py",
  "(1 + step) / (10 + step)", "(step) / (10 + step)", [T]),
 ("teacher from the EMA model", "train/loop.py",
  "teacher_net=self.model if self.compiled is None", "teacher_net=self.ema if self.compiled is None", [T, S]),
 ("teacher with gradient (no no_grad)", "train/objective.py",
  "    with torch.no_grad():\n        teacher = run(", "    if True:\n        teacher = run(", [T]),
 ("teacher and student with separate dropout RNG", "train/objective.py",
  "            torch.manual_seed(dropout_seed)\n", "            pass\n", [T]),
 ("teacher and student draw dropout in sequence (no shared RNG fork)", "train/objective.py",
  "        with torch.random.fork_rng(devices=[data.device] if data.device.type == \"cuda\" else []):\n            torch.manual_seed(dropout_seed)\n",
  "        if True:\n", [T]),
 ("teacher at sigma_i instead of sigma_{i+1} noise level (x_t2 = x_t)", "train/objective.py",
  "    x_t2 = data + t2.view(shape).to(data.dtype) * noise", "    x_t2 = data + t.view(shape).to(data.dtype) * noise", [T]),
 ("pos-embed halves swapped (row first)", "train/model.py",
  "return torch.cat([encode(cols), encode(rows)], dim=1).float()", "return torch.cat([encode(rows), encode(cols)], dim=1).float()", [T]),
 ("pos-embed [cos | sin] per half", "train/model.py",
  "        return torch.cat([torch.sin(a), torch.cos(a)], dim=1)", "        return torch.cat([torch.cos(a), torch.sin(a)], dim=1)", [T]),
 ("unpatchify grid axes scrambled", "train/model.py",
  "h.permute(0, 5, 1, 3, 2, 4)", "h.permute(0, 5, 2, 3, 1, 4)", [T]),
 ("unpatchify channel-first patch layout", "train/model.py",
  "h = h.reshape(B, g, g, p, p, C)\n        return h.permute(0, 5, 1, 3, 2, 4)", "h = h.reshape(B, g, g, C, p, p)\n        return h.permute(0, 3, 1, 4, 2, 5)", [T]),
 ("adaLN chunk order: shift and scale swapped", "train/model.py",
  "shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, 1)",
  "scale_a, shift_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, 1)", [T]),
 ("adaLN chunk order: attention and MLP groups swapped", "train/model.py",
  "shift_a, scale_a, gate_a, shift_m, scale_m, gate_m = self.adaLN_modulation(c).chunk(6, 1)",
  "shift_m, scale_m, gate_m, shift_a, scale_a, gate_a = self.adaLN_modulation(c).chunk(6, 1)", [T]),
 ("final layer: shift and scale swapped", "train/model.py",
  "        shift, scale = self.adaLN_modulation(c).chunk(2, 1)", "        scale, shift = self.adaLN_modulation(c).chunk(2, 1)", [T]),
 ("time features [sin | cos]", "train/model.py",
  "return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)", "return torch.cat([torch.sin(args), torch.cos(args)], dim=-1)", [T]),
 ("adaptive c exponent -1.15 -> -1.1", "train/objective.py",
  "math.exp(-1.15 * math.log(intervals) - 0.85)", "math.exp(-1.1 * math.log(intervals) - 0.85)", [T]),
 ("c1 kept one stage less (s < s0)", "train/objective.py",
  "if not adaptive or intervals <= s0:", "if not adaptive or intervals < s0:", [T]),
 ("sum convention without the 1/sqrt(D)", "train/objective.py",
  "        return root, (root if loss == \"pseudo_huber\" else 1.0)", "        return 1.0, (root if loss == \"pseudo_huber\" else 1.0)", [T]),
 ("curriculum: one stage more", "train/objective.py",
  "(math.log2(math.floor(s1 / s0)) + 1)", "(math.log2(math.floor(s1 / s0)) + 2)", [T]),
 ("consistency weight 1/(sigma_i - sigma_{i+1}) -> 1/sigma_i", "train/objective.py",
  "return 1.0 / (sigmas[indices] - sigmas[indices + 1])", "return 1.0 / sigmas[indices]", [T, S]),
 ("diffusion mask on the large-sigma side", "train/objective.py",
  "return indices >= int(math.floor(fraction * n_points))", "return indices < int(math.floor((1 - fraction) * n_points))", [S]),
 ("diffusion mask >= -> >", "train/objective.py",
  "return indices >= int(math.floor(fraction * n_points))", "return indices > int(math.floor(fraction * n_points))", [S]),
 ("EDM weight without 1/sigma_d^2", "train/objective.py",
  "return 1.0 / sigma**2 + 1.0 / sigma_data**2", "return 1.0 / sigma**2", [S]),
 ("c_skip without the sigma_min offset", "train/objective.py",
  "c_skip = sigma_data**2 / ((sigma - sigma_min) ** 2 + sigma_data**2)", "c_skip = sigma_data**2 / (sigma ** 2 + sigma_data**2)", [T, S]),
 ("OT across classes (groups dropped)", "train/objective.py",
  "out = lk.ot_couple(data, noise, groups=groups, backend=backend", "out = lk.ot_couple(data, noise, groups=None, backend=backend", [S]),
 ("OT permutation applied to the data instead of the noise", "train/objective.py",
  "paired = data, noise[perm], labels", "paired = data[perm], noise, (labels[perm] if labels is not None else None)", [S]),
 ("diffusion coefficient ignored", "train/loop.py",
  "diffusion=o.diffusion_loss, diff_coef=diff_coef,", "diffusion=o.diffusion_loss, diff_coef=1.0,", [S]),
 # issue 13's other formulas: budgets, c schedules, precision, the NsLN variant, lct-inspect
 ("curriculum K' with log2 rounded down", "train/objective.py",
  "(math.log2(math.floor(s1 / s0)) + 1)", "(math.floor(math.log2(math.floor(s1 / s0))) + 1)", [BUDGET]),
 ("epoch budget with a last partial batch (ceil)", "train/config.py",
  "(n_latents // B) * cfg.optim.epochs", "(-(-n_latents // B)) * cfg.optim.epochs", [BUDGET]),
 ("CelebA-HQ preset 1400 -> 1200 epochs", "train/config.py",
  '"slct-celebahq256": {**_TABLE1, "optim.epochs": 1400,', '"slct-celebahq256": {**_TABLE1, "optim.epochs": 1200,', [BUDGET]),
 ("anchored c exponent -1.15 -> -1", "train/objective.py",
  "base_c * (intervals / s0) ** -1.15", "base_c * (intervals / s0) ** -1.0", [CSCHED]),
 ("measured c: kappa 1/sqrt(2) -> 1/2", "train/objective.py",
  "MEASURED_C_KAPPA = 1.0 / math.sqrt(2.0)", "MEASURED_C_KAPPA = 1.0 / 2.0", [CSCHED]),
 ("measured c from the mean of m instead of its median", "train/objective.py",
  "torch.quantile(m, 0.5)", "m.mean()", [CSCHED]),
 ("network ends (patch embed, final layer) in bf16 under autocast", "train/model.py",
  "    fp32_ends = True", "    fp32_ends = False", [PREC]),
 ("c_skip / c_out combination in bf16", "train/objective.py",
  "wide = torch.promote_types(x.dtype, torch.float32)", "wide = torch.bfloat16", [PREC]),
 ("qk-norm eps 1e-5 -> 1e-6", "train/model.py",
  "_QK_EPS = 1e-5", "_QK_EPS = 1e-6", [NORM]),
 ("eager NsLN with a learnable weight", "train/model.py",
  "norm.weight.requires_grad_(False)", "norm.weight.requires_grad_(True)", [NORM]),
 ("block-norm biases on by default", "train/config.py",
  "norm_bias: bool = False ", "norm_bias: bool = True ", [NORM, BUDGET]),
 ("kurtosis without the -3 (not excess)", "train/latent_report.py",
  "/ var.clamp_min(1e-300) ** 2 - 3.0", "/ var.clamp_min(1e-300) ** 2", [INSPECT]),
 ("z standardised with the sample std (n - 1)", "train/latent_report.py",
  "std, mean = torch.std_mean(x, dim=0, correction=0)", "std, mean = torch.std_mean(x, dim=0, correction=1)", [INSPECT]),
 # issue 14: the fused optimizer, the trainer's fused update, the fused bias + GELU
 ("RAdam first-moment bias correction with beta2", "ops/radam.py",
  "bias_correction1 = 1 - beta1 ** step", "bias_correction1 = 1 - beta2 ** step", [RADAM]),
 ("RAdam rectified from rho_t > 4", "ops/radam.py",
  "rectified = rho_t > 5.0", "rectified = rho_t > 4.0", [RADAM]),
 ("FusedRAdam EMA weight decay instead of 1 - decay", "optim.py",
  "ema_weight=1.0 - ema_decay if ema_decay", "ema_weight=ema_decay if ema_decay", [RADAM]),
 ("trainer's fused update without the EMA", "train/loop.py",
  "self.optimizer.step(ema_decay=decay)", "self.optimizer.step()", [UPDATE]),
 ("bias + GELU backward with dh and dbias requests swapped", "ops/bias_gelu.py",
  "need_dh, need_db = ctx.needs_input_grad[0], ctx.needs_input_grad[1]",
  "need_dh, need_db = ctx.needs_input_grad[1], ctx.needs_input_grad[0]", [GELU]),
 ("gated residual backward: dgate from dout * gate instead of dout * y", "ops/gated_residual.py",
  "dgate, dy, dbias = torch.ops.lct.gated_residual_bwd(dout.contiguous().to(y.dtype), gate, y,",
  "dgate, dy, dbias = torch.ops.lct.gated_residual_bwd(dout.contiguous().to(y.dtype), gate, gate[:, None].expand_as(y).contiguous(),",
  [GATED]),
 ("fused DiT block: the MLP's residual gated by the attention gate", "train/model.py",
  "return _gated.gated_residual(x, gate_m, y,", "return _gated.gated_residual(x, gate_a, y,",
  [MODEL]),
 ("fused DiT block: fc2's folded bias dropped", "train/model.py",
  "return _gated.gated_residual(x, gate_m, y, self.mlp.fc2.bias if fold else None,",
  "return _gated.gated_residual(x, gate_m, y, None,", [MODEL]),
 ("CPU attention: logits scaled by 1/d instead of 1/sqrt(d)", "train/model.py",
  ".mul_(1.0 / math.sqrt(q.shape[-1]))", ".mul_(1.0 / q.shape[-1])", [MODEL]),
 ("CPU attention: the explicit formula under an active dropout (dropout ignored)", "train/model.py",
  "q.is_cpu and dropout_p == 0.0 and T <=", "q.is_cpu and T <=", [MODEL]),
 ("CPU attention: softmax over the query axis", "train/model.py",
  "torch.matmul(logits.softmax(-1), v)", "torch.matmul(logits.softmax(-2), v)", [MODEL]),
 ("CPU heap: the trim threshold never set", "cpu_heap.py",
  "ok_trim = mallopt(_M_TRIM_THRESHOLD, trim_threshold_mb << 20) == 1", "ok_trim = True", [HEAP]),
 ("CPU heap: the mmap threshold never set", "cpu_heap.py",
  "ok_mmap = mallopt(_M_MMAP_THRESHOLD, mmap_threshold_mb << 20) == 1", "ok_mmap = True", [HEAP]),
]


def main(only):
    ROOT = Path(tempfile.mkdtemp(prefix="lct-mutants-"))
    shutil.copytree(REPO / "lct_kernels", ROOT / "lct_kernels")
    shutil.copytree(REPO / "tests", ROOT / "tests")
    results = []
    env = dict(os.environ, PYTHONPATH=str(ROOT), TRITON_INTERPRET="1")
    for name, rel, old, new, tests in M:
        if only and not any(o in name for o in only):
            continue
        path = ROOT / "lct_kernels" / rel
        src = path.read_text()
        n = src.count(old)
        if n != 1:
            results.append((name, f"NOT APPLIED (found {n}x)", ""))
            print(results[-1], flush=True)
            continue
        path.write_text(src.replace(old, new))
        try:
            r = subprocess.run([sys.executable, "-m", "pytest", *tests, "-x", "-q",
                                "-p", "no:cacheprovider"], cwd=ROOT, env=env, capture_output=True,
                               text=True, timeout=900)
            failed = [l for l in r.stdout.splitlines() if l.startswith("FAILED")]
            status = "CAUGHT" if r.returncode != 0 else "SURVIVED"
            results.append((name, status, failed[0].split(" - ")[0][7:] if failed else r.stdout.splitlines()[-1]))
        finally:
            path.write_text(src)
        print(results[-1], flush=True)
    shutil.rmtree(ROOT, ignore_errors=True)
    survived = [r for r in results if r[1] != "CAUGHT"]
    print(f"{len(results) - len(survived)} of {len(results)} mutants caught")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
