"""One-call drop-in of the fused NsLN + adaLN-modulate kernel into DiT-family models.

``patch_dit(model)`` finds facebookresearch/DiT's layout by structure (any class
name, any fork: SiT, fast-DiT, REPA, ...) and routes every
``modulate(norm(x), shift, scale) = norm(x) * (1 + scale[:, None]) + shift[:, None]``
through ``lct_kernels.nsln_modulate`` (one kernel, fp32 statistics), and a block's
gated residuals ``x + gate[:, None] * y`` through ``lct_kernels.gated_residual``.
``unpatch_dit(model)`` undoes it.  See ``patch_dit`` for the contract.
"""

import inspect
import math
import types
import warnings

import torch
from torch import nn

from ..ops import gated_residual as _gated
from ..ops import layer_norm as ops
from .layer_norm import _is_unit, patch_layernorms, unpatch_layernorms

_BLOCK = ("norm1", "attn", "norm2", "mlp", "adaLN_modulation")
_FINAL = ("norm_final", "linear", "adaLN_modulation")
_STATE = "_lct_dit"  # instance attribute of a patched module: what was changed
_DIT_EPS = 1e-6  # DiT's LayerNorm eps: the eps of a modulated norm that does not name its own

LOOKED_FOR = ("blocks with norm1, attn, norm2, mlp and adaLN_modulation (6 chunks: shift, "
              "scale, gate for the attention and for the MLP) and final layers with "
              "norm_final, linear and adaLN_modulation (2 chunks: shift, scale)")


# ----------------------------------------------------------------------------
# The forwards: facebookresearch/DiT's, written once with the modulated norm as a
# parameter (the reference math for the probe, the fused kernel once patched).
# ----------------------------------------------------------------------------
def _modulate_reference(norm, x, shift, scale):
    """DiT's modulate(norm(x), shift, scale), by the norm module itself."""
    return norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def _call_modulated(norm, x, shift, scale):
    """A modulated norm, forward(x, shift, scale), called as is."""
    return norm(x, shift, scale)


def _nsln_modulate(x, shift, scale, bias, eps, backend):
    """nsln_modulate with PyTorch's dtype rules.

    Outside autocast the kernel wants one dtype, so everything is cast to the
    promoted dtype (what eager type promotion gives); under autocast mixed dtypes
    are accepted (computed in fp32; y has x's dtype)."""
    if not torch.is_autocast_enabled(x.device.type):
        dtype = torch.promote_types(torch.promote_types(x.dtype, shift.dtype), scale.dtype)
        if bias is not None:
            dtype = torch.promote_types(dtype, bias.dtype)
        x, shift, scale = x.to(dtype), shift.to(dtype), scale.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    return ops.nsln_modulate(x, shift, scale, bias, eps, backend=backend)


def _modulate_fused(norm, x, shift, scale):
    """modulate(norm(x), shift, scale) of a (patched) LayerNorm in one kernel.

    A weight other than the frozen unit weight (changed after patching, or under
    torch.compile, where the unit check is not traced) is honoured by the unfused
    path, never dropped."""
    weight = norm.weight
    if weight is not None and (weight.requires_grad or not _is_unit(weight)):
        return _modulate_reference(norm, x, shift, scale)
    return _nsln_modulate(x, shift, scale, norm.bias, norm.eps, getattr(norm, "backend", None))


def _residual_reference(block, x, gate, y):
    """DiT's gated residual x + gate.unsqueeze(1) * y."""
    return x + gate.unsqueeze(1) * y


def _residual_fused(block, x, gate, y):
    """The gated residual in one pass forward and one backward (lct_kernels.gated_residual;
    a CPU kernel: CUDA tensors run the same formula in eager PyTorch)."""
    backend = "torch" if getattr(block.norm1, "backend", None) == "torch" else None
    return _gated.gated_residual(x, gate, y, backend=backend)


def _block_math(self, x, c, modnorm, residual=_residual_reference):
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = (
        self.adaLN_modulation(c).chunk(6, dim=1))
    x = residual(self, x, gate_msa, self.attn(modnorm(self.norm1, x, shift_msa, scale_msa)))
    x = residual(self, x, gate_mlp, self.mlp(modnorm(self.norm2, x, shift_mlp, scale_mlp)))
    return x


def _final_math(self, x, c, modnorm):
    shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
    return self.linear(modnorm(self.norm_final, x, shift, scale))


def _patched_block_forward(self, x, c):
    """facebookresearch/DiT's DiTBlock.forward with both modulates and both gated
    residuals fused (lct_kernels.patch_dit)."""
    return _block_math(self, x, c, _modulate_fused, _residual_fused)


def _patched_final_forward(self, x, c):
    """facebookresearch/DiT's FinalLayer.forward with the modulate fused (lct_kernels.patch_dit)."""
    return _final_math(self, x, c, _modulate_fused)


def _patched_modulated_norm_forward(self, x, shift, scale):
    """NsLN(x) * (1 + scale[:, None]) + shift[:, None] in one kernel (lct_kernels.patch_dit)."""
    return _nsln_modulate(x, shift, scale, self.bias, self._lct_dit_eps,
                          getattr(self, "backend", None))


def _modulated_norm_reference(norm, x, shift, scale, eps):
    h = torch.nn.functional.layer_norm(x, (x.shape[-1],), None, norm.bias, eps)
    return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


# ----------------------------------------------------------------------------
# Recognition
# ----------------------------------------------------------------------------
def _kind(module):
    def has(names):
        return all(isinstance(getattr(module, n, None), nn.Module) for n in names)
    if has(_BLOCK):
        return "block"
    if has(_FINAL):
        return "final"
    return None


def _last_linear(module):
    linears = [m for m in module.modules() if isinstance(m, nn.Linear)]
    return linears[-1] if linears else None


def _positional_arity(fn):
    """Parameters of a bound forward: (count, has *args/**kwargs, names)."""
    sig = inspect.signature(fn)
    names = [p.name for p in sig.parameters.values()]
    var = any(p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in sig.parameters.values())
    return len(names), var, names


def _norm_layout(norm, D):
    """"layernorm" (an nn.LayerNorm over D), "modulated" (forward(x, shift, scale)) or None."""
    if isinstance(norm, nn.LayerNorm):
        return "layernorm" if tuple(norm.normalized_shape) == (D,) else None
    try:
        count, var, _ = _positional_arity(norm.forward)
    except (TypeError, ValueError):
        return None
    return "modulated" if count == 3 and not var else None


def _check(module, kind, non_scaling):
    """(layout, D, norm names) of a recognised module, or raise _Refused(reason)."""
    chunks = 6 if kind == "block" else 2
    norms = ("norm1", "norm2") if kind == "block" else ("norm_final",)
    linear = _last_linear(module.adaLN_modulation)
    if linear is None or linear.out_features % chunks:
        got = "no nn.Linear" if linear is None else f"{linear.out_features} outputs"
        raise _Refused(f"adaLN_modulation must end in an nn.Linear with {chunks} * D outputs "
                       f"({chunks} chunks), got {got}")
    D = linear.out_features // chunks
    count, var, names = _positional_arity(module.forward)
    if count != 2 or var:
        raise _Refused(f"forward must take exactly (x, c), got ({', '.join(names)})")
    layouts = {_norm_layout(getattr(module, n), D) for n in norms}
    if None in layouts or len(layouts) != 1:
        kinds = ", ".join(f"{n}={type(getattr(module, n)).__name__}" for n in norms)
        raise _Refused(f"{'/'.join(norms)} must be nn.LayerNorm({D}) or modulated norms "
                       f"forward(x, shift, scale) over D={D}, got {kinds}")
    layout = layouts.pop()
    for n in norms:
        norm = getattr(module, n)
        if layout == "layernorm":
            if norm._forward_hooks or norm._forward_pre_hooks:
                raise _Refused(f"{n} has forward hooks, which the fused kernel would bypass")
            w = norm.weight
            if w is not None and not non_scaling and (w.requires_grad or not _is_unit(w)):
                raise _Refused(f"{n} has a learnable weight, which nsln_modulate does not "
                               "apply; use non_scaling=True (NsLN: weight fixed at 1)")
        else:
            bias = getattr(norm, "bias", None)
            if not (bias is None or (isinstance(bias, torch.Tensor) and tuple(bias.shape) == (D,))):
                raise _Refused(f"{n} (a modulated norm) must have a bias of shape ({D},) or None")
            if getattr(norm, "weight", None) is not None:
                raise _Refused(f"{n} (a modulated norm) has a weight; only NsLN / plain "
                               "LayerNorm without scale is fused")
    return layout, D, norms


class _Refused(Exception):
    pass


class _Call(nn.Module):
    """Runs fn(target, *args) under torch.func.functional_call (no hooks of target)."""

    def __init__(self, target, fn):
        super().__init__()
        self.target = target
        self.fn = fn

    def forward(self, *args):
        return self.fn(self.target, *args)


def _probe(module, kind, layout, D, norms):
    """Check the module computes DiT's math, in float64 on random inputs.

    adaLN-zero initialises the modulation and the final linear to zero, which would
    hide a different forward: adaLN_modulation's parameters and every parameter that
    is all zeros are drawn at random for the probe; the others are float64 copies
    of the module's own (which are never changed)."""
    ref = next((p for p in module.parameters()), None)
    device = ref.device if ref is not None else torch.device("cpu")
    gen = torch.Generator(device=device).manual_seed(0)

    def draw(shape, std):
        return torch.randn(shape, generator=gen, dtype=torch.float64, device=device) * std

    def draw_param(shape):
        # rank one (u v^T / sqrt(fan-in)) for matrices: per-sample modulation that varies
        # with c, for O(rows + columns) random numbers instead of a full matrix of them
        if len(shape) < 2:
            return draw(shape, 0.5)
        fan_in = math.prod(shape[1:])
        return (draw((shape[0], 1), 1.0) * draw((1, fan_in), 1 / math.sqrt(fan_in))).view(shape)

    adaln = {id(p) for p in module.adaLN_modulation.parameters()}
    probed = (module if layout == "layernorm" else
              nn.ModuleDict({n: getattr(module, n) for n in norms}))
    original = type(module).forward
    modes = {m: m.training for m in module.modules()}
    module.eval()  # dropout off: the comparison must be deterministic
    try:
        with torch.no_grad():
            state = {}
            for name, p in probed.named_parameters():
                if id(p) in adaln or not p.any():
                    p = draw_param(p.shape)
                state["target." + name] = p.detach().to(torch.float64)
            for name, b in probed.named_buffers():
                state["target." + name] = b.to(torch.float64) if b.is_floating_point() else b
            # Rows at unit and at 1e-3 scale: the latter have a variance comparable to eps,
            # so a norm with another eps is caught too.
            x = draw((2, 5, D), 1.0) * torch.tensor([1.0, 1e-3, 1.0, 1e-3, 1.0],
                                                    dtype=torch.float64, device=device)[:, None]
            c = draw((2, D), 1.0)
            if layout == "layernorm":
                math_fn = _block_math if kind == "block" else _final_math
                got = torch.func.functional_call(_Call(module, original), state, (x, c))
                want = torch.func.functional_call(
                    _Call(module, lambda m, a, b: math_fn(m, a, b, _modulate_reference)), state,
                    (x, c))
                pairs = [("forward", got, want, None)]
            else:
                pairs = []
                for n in norms:
                    shift, scale = draw((2, D), 1.0), draw((2, D), 1.0)
                    norm = getattr(module, n)
                    eps = getattr(norm, "eps", _DIT_EPS)
                    prefix = f"target.{n}."
                    sub = {"target." + k[len(prefix):]: v for k, v in state.items()
                           if k.startswith(prefix)}
                    got = torch.func.functional_call(_Call(norm, type(norm).forward), sub,
                                                     (x, shift, scale))
                    want = torch.func.functional_call(
                        _Call(norm, lambda m, a, s, t: _modulated_norm_reference(m, a, s, t, eps)),
                        sub, (x, shift, scale))
                    pairs.append((n, got, want, eps))
    except Exception as exc:  # a fork's forward may not run on the probe: refuse, say why
        raise _Refused(f"the probe forward failed ({type(exc).__name__}: {exc})") from None
    finally:
        for m, mode in modes.items():
            m.training = mode
    for what, got, want, eps in pairs:
        if not isinstance(got, torch.Tensor) or got.shape != want.shape:
            raise _Refused(f"{what} returns {type(got).__name__} "
                           f"{tuple(getattr(got, 'shape', ()))}, DiT's math gives "
                           f"{tuple(want.shape)}")
        err = (got.to(torch.float64) - want).abs().max().item()
        if not err <= 1e-6 * (1 + want.abs().max().item()):
            detail = ("its forward is not DiT's (modulate(norm(x), shift, scale), gated "
                      "residuals)" if eps is None else
                      f"it is not NsLN(x) * (1 + scale) + shift with eps={eps}")
            raise _Refused(f"{what} differs from DiT's math on random weights (max error "
                           f"{err:.3g}): {detail}")


# ----------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------
def patch_dit(model, non_scaling=False, qk_norm=True):
    """Fuse every ``modulate(norm(x), shift, scale)`` of a DiT-family model, in place.

    Recognised by structure (class names do not matter):

    * a **block** is a module with submodules ``norm1``, ``attn``, ``norm2``, ``mlp``
      and ``adaLN_modulation``, whose last ``nn.Linear`` has 6 * D outputs, and a
      ``forward(x, c)`` that computes facebookresearch/DiT's::

          shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = \\
              self.adaLN_modulation(c).chunk(6, dim=1)
          x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
          x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))

      with ``modulate(x, shift, scale) = x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)``;
    * a **final layer** has ``norm_final``, ``linear`` and ``adaLN_modulation`` (2 * D
      outputs) and computes ``self.linear(modulate(self.norm_final(x), shift, scale))``
      with ``shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)``.

    x is (B, T, D), c is (B, D).  The norms are either ``nn.LayerNorm(D)``
    (subclasses included) without a learnable weight (DiT's
    ``elementwise_affine=False``; a bias is fine), whose ``modulate`` the block's
    forward applies, or *modulated norms* with ``forward(x, shift, scale)``
    computing ``layer_norm(x, bias, eps) * (1 + scale) + shift`` themselves (as
    ``lct_kernels.train``'s DiT does; ``eps`` is the module's ``eps`` attribute,
    else DiT's 1e-6; ``bias`` (D,) or None; no weight).

    How: the forward is not read, it is *tested*.  Each candidate runs once on
    float64 inputs (float64 copies of its weights, with adaLN_modulation's and
    all-zero ones drawn at random, since adaLN-zero's zeros would hide any
    difference; its own weights untouched, dropout off, no hooks of the module
    itself) against DiT's math written out with its own submodules: a float64
    copy of one block at a time, on the model's device (a few seconds for a
    DiT-XL on a CPU).  If it matches, a block's (final layer's) ``forward`` becomes
    DiT's forward with the fused kernel, set on the instance (the class and
    every other instance are untouched), its gated residuals ``x + gate * y`` run
    through ``lct_kernels.gated_residual`` (one pass each way on the CPU; the same
    formula in eager PyTorch on CUDA); a modulated norm's ``forward`` becomes
    the kernel.  The LayerNorms are switched to ``FusedLayerNorm`` /
    ``NonScalingLayerNorm`` by ``patch_layernorms``, so a call of the norm alone
    runs fused too.  Refused, with one warning naming each module and why, and
    left untouched: a forward with other parameters than (x, c) (e.g. RoPE
    arguments), another number of chunks, other norms (RMSNorm, a learnable
    LayerNorm weight without ``non_scaling``), norms with forward hooks (the
    fused kernel would bypass them), a forward that differs from DiT's on the
    probe or fails on it (e.g. a fixed token count: the probe uses T = 5).
    Not detectable, hence the contract: behaviour that only shows on other
    inputs than the probe's (branches on T, on the batch, on the training mode).

    In place: parameters (same tensors, so optimizers stay valid), buffers,
    hooks of the blocks and the training mode are kept; the state_dict is
    unchanged except for the NsLN biases ``non_scaling=True`` adds to norms that
    had none (zeros, so outputs are unchanged at patch time; add them to an
    existing optimizer, e.g. ``opt.add_param_group``).  A second call does
    nothing more (a call with other options raises: unpatch first).

    Args:
        model: any ``nn.Module`` (the model itself may be a block).
        non_scaling: also make the block and final norms sLCT's NsLN with a
            learnable bias (a LayerNorm weight is reset to ones and frozen, as
            ``patch_layernorms(non_scaling=True)``).
        qk_norm: in patched blocks, switch timm-style qk-norm LayerNorms
            (``attn.q_norm``, ``attn.k_norm``) to the fused kernels:
            ``FusedLayerNorm`` (exact, any weight), or ``NonScalingLayerNorm``
            with ``non_scaling=True`` (weight reset to ones and frozen).

    Returns the number of modules patched (blocks and final layers: depth + 1
    for a DiT); 0, with a warning naming what was looked for, if nothing matched.
    The output dtype of a fused modulate is the promoted dtype of x, shift and
    scale outside autocast, x's dtype under autocast (fp32 statistics)."""
    fn = "patch_dit"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: model must be a torch.nn.Module, got {type(model).__name__}")
    for name, value in (("non_scaling", non_scaling), ("qk_norm", qk_norm)):
        if not isinstance(value, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {value!r}")
    options = dict(non_scaling=non_scaling, qk_norm=qk_norm)
    count, found, refused = 0, 0, []
    for name, module in model.named_modules():
        kind = _kind(module)
        if kind is None:
            continue
        found += 1
        done = module.__dict__.get(_STATE)
        if done is not None:
            if done["options"] != options:
                raise ValueError(f"{fn}: {name or type(module).__name__} is already patched "
                                 f"with {done['options']}; call unpatch_dit before patching "
                                 f"with {options}")
            continue
        try:
            layout, D, norms = _check(module, kind, non_scaling)
            _probe(module, kind, layout, D, norms)
        except _Refused as why:
            refused.append(f"{name or '(model)'} ({type(module).__name__}): {why}")
            continue
        _apply(module, kind, layout, D, norms, non_scaling, qk_norm)
        module.__dict__[_STATE]["options"] = options
        count += 1
    if refused:
        warnings.warn(f"{fn}: left {len(refused)} module(s) unpatched: " + "; ".join(refused),
                      stacklevel=2)
    elif found == 0:
        warnings.warn(f"{fn}: nothing to patch in {type(model).__name__}: looked for "
                      f"{LOOKED_FOR}", stacklevel=2)
    return count


def _apply(module, kind, layout, D, norms, non_scaling, qk_norm):
    state = {"layout": layout, "class_switched": [], "added_bias": []}
    targets = [(n, getattr(module, n)) for n in norms]
    if kind == "block" and qk_norm:
        attn = module.attn
        targets += [(f"attn.{n}", getattr(attn, n)) for n in ("q_norm", "k_norm")
                    if isinstance(getattr(attn, n, None), nn.LayerNorm)]
    ref = _last_linear(module.adaLN_modulation).weight
    for n, norm in targets:
        is_qk = n.startswith("attn.")
        if is_qk or layout == "layernorm":
            if patch_layernorms(norm, non_scaling=non_scaling):
                state["class_switched"].append(n)
        if non_scaling and not is_qk and getattr(norm, "bias", None) is None:
            # NsLN's learnable bias, zero: outputs unchanged at patch time.
            norm.bias = nn.Parameter(torch.zeros(D, device=ref.device, dtype=ref.dtype))
            state["added_bias"].append(n)
        if layout == "modulated" and not is_qk:
            norm._lct_dit_eps = getattr(norm, "eps", _DIT_EPS)
            norm.forward = types.MethodType(_patched_modulated_norm_forward, norm)
    if layout == "layernorm":
        forward = _patched_block_forward if kind == "block" else _patched_final_forward
        module.forward = types.MethodType(forward, module)
    module.__dict__[_STATE] = state


def unpatch_dit(model):
    """Undo ``patch_dit``: the forwards and norm classes it changed are restored.

    Parameters keep their current values; NsLN biases that ``non_scaling=True``
    added stay (nn.LayerNorm applies a bias), so outputs and the state_dict are
    those of the patched model.  Returns the number of modules restored."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"unpatch_dit: model must be a torch.nn.Module, got "
                        f"{type(model).__name__}")
    count = 0
    for module in model.modules():
        state = module.__dict__.pop(_STATE, None)
        if state is None:
            continue
        module.__dict__.pop("forward", None)
        for n in ("norm1", "norm2", "norm_final"):
            norm = getattr(module, n, None)
            if norm is not None and "_lct_dit_eps" in norm.__dict__:
                del norm.__dict__["_lct_dit_eps"]
                norm.__dict__.pop("forward", None)
        for n in state["class_switched"]:
            unpatch_layernorms(module.get_submodule(n))
        count += 1
    return count
