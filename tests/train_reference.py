"""Independent float64 references for the trainer's formulas (used by test_train_formulas*.py).

Written from the papers and the authors' code (facebookresearch/DiT, the iCT/sLCT code as
summarised in shared/research/papers.md), never from lct_kernels.train: nothing here
imports the trainer.  Every function takes and returns float64 tensors.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F

LN_EPS = 1e-6  # DiT's LayerNorm eps


# ---- facebookresearch/DiT, models.py, verbatim in numpy --------------------------------------
def dit_get_1d_sincos_pos_embed_from_grid(embed_dim, pos):
    omega = np.arange(embed_dim // 2, dtype=np.float64)
    omega /= embed_dim / 2.0
    omega = 1.0 / 10000**omega
    pos = pos.reshape(-1)
    out = np.einsum("m,d->md", pos, omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


def dit_get_2d_sincos_pos_embed(embed_dim, grid_size):
    """(grid_size**2, embed_dim): token t = row * grid_size + col."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # here w goes first
    grid = np.stack(grid, axis=0).reshape([2, 1, grid_size, grid_size])
    emb_h = dit_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[0])
    emb_w = dit_get_1d_sincos_pos_embed_from_grid(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def unpatchify_by_loops(h, C, p, g):
    """DiT's token -> pixel map, one element at a time: token t = i * g + j holds, at
    channel (a * p + b) * C + ch, the pixel (ch, i * p + a, j * p + b) ('nhwpqc->nchpwq')."""
    B = h.shape[0]
    out = torch.empty(B, C, g * p, g * p, dtype=h.dtype)
    for i in range(g):
        for j in range(g):
            for a in range(p):
                for b in range(p):
                    for ch in range(C):
                        out[:, ch, i * p + a, j * p + b] = h[:, i * g + j, (a * p + b) * C + ch]
    return out


def patchify_by_loops(x, p):
    """The patch embedding's input order: (B, C, H, W) -> (B, T, C * p * p), token
    t = i * g + j, element (ch, a, b) flattened as Conv2d's weight (D, C, p, p) is."""
    B, C, H, _ = x.shape
    g = H // p
    out = torch.empty(B, g * g, C * p * p, dtype=x.dtype)
    for i in range(g):
        for j in range(g):
            out[:, i * g + j] = x[:, :, i * p:(i + 1) * p, j * p:(j + 1) * p].reshape(B, -1)
    return out


# ---- the DiT forward, functional ----------------------------------------------------------
def timestep_features(t, dim=256, max_period=10000.0):
    """DiT's TimestepEmbedder.timestep_embedding: [cos | sin] of t * exp(-ln(P) k / half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float64) / half)
    args = t[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _linear(P, name, x):
    return x @ P[name + ".weight"].T + P[name + ".bias"]


def _layer_norm(x, weight=None, bias=None):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    y = (x - mu) / torch.sqrt(var + LN_EPS)
    if weight is not None:
        y = y * weight
    if bias is not None:
        y = y + bias
    return y


def _modulate(x, shift, scale):
    """DiT's modulate: x * (1 + scale) + shift, shift/scale (B, D) broadcast over tokens."""
    return x * (1 + scale[:, None]) + shift[:, None]


def dit_forward(P, x, t, y, *, patch_size, num_heads, depth, nsln):
    """F_theta(x, t, y) of DiT (adaLN-zero) from a parameter dict P (the module's
    state_dict names, float64); nsln: qk-norm and block norms as sLCT's NsLN
    (unit weight, learnable bias), else plain DiT (qk LayerNorm affine, block norms
    without parameters).  x (B, C, H, W), t (B,), y (B,) int64 or None."""
    B, C, H, _ = x.shape
    p = patch_size
    g = H // p
    W_x = P["x_embedder.weight"]
    D = W_x.shape[0]
    h = patchify_by_loops(x, p) @ W_x.reshape(D, -1).T + P["x_embedder.bias"]
    h = h + torch.from_numpy(dit_get_2d_sincos_pos_embed(D, g))[None]
    c = _linear(P, "t_embedder.2", F.silu(_linear(P, "t_embedder.0", timestep_features(t))))
    if y is not None:
        c = c + P["y_embedder.weight"][y]
    hd = D // num_heads

    def qk_norm(v, name):
        if nsln:
            return _layer_norm(v, None, P[name + ".bias"])
        return _layer_norm(v, P[name + ".weight"], P[name + ".bias"])

    def block_norm(v, name):
        return _layer_norm(v, None, P.get(name + ".bias"))

    for layer in range(depth):
        pre = f"blocks.{layer}."
        mod = _linear(P, pre + "adaLN_modulation.1", F.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        a = _modulate(block_norm(h, pre + "norm1"), shift_msa, scale_msa)
        qkv = _linear(P, pre + "attn.qkv", a).reshape(B, g * g, 3, num_heads, hd)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]  # (B, T, heads, hd)
        q, k = qk_norm(q, pre + "attn.q_norm"), qk_norm(k, pre + "attn.k_norm")
        att = torch.softmax(torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd), dim=-1)
        o = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, g * g, D)
        h = h + gate_msa[:, None] * _linear(P, pre + "attn.proj", o)
        m = _modulate(block_norm(h, pre + "norm2"), shift_mlp, scale_mlp)
        mlp = _linear(P, pre + "mlp.fc2", F.gelu(_linear(P, pre + "mlp.fc1", m), approximate="tanh"))
        h = h + gate_mlp[:, None] * mlp
    shift, scale = _linear(P, "final_layer.adaLN_modulation.1", F.silu(c)).chunk(2, dim=1)
    out = _linear(P, "final_layer.linear", _modulate(block_norm(h, "final_layer.norm_final"),
                                                      shift, scale))
    return unpatchify_by_loops(out, C, p, g)


# ---- the consistency model parameterisation and objective (papers.md) ---------------------
def karras(n, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """Descending: sigma_i = (smax^(1/rho) + i/(n-1) (smin^(1/rho) - smax^(1/rho)))^rho."""
    i = torch.arange(n, dtype=torch.float64)
    a, b = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return (a + i / (n - 1) * (b - a)) ** rho


def denoiser(F_net, x, sigma, sigma_min=0.002, sigma_data=0.5):
    """f(x, sigma) = c_skip x + c_out F(c_in x, 250 ln sigma) with the sigma_min offset."""
    s = sigma.view(-1, *([1] * (x.dim() - 1)))
    c_skip = sigma_data**2 / ((s - sigma_min) ** 2 + sigma_data**2)
    c_out = (s - sigma_min) * sigma_data / torch.sqrt(s**2 + sigma_data**2)
    c_in = 1 / torch.sqrt(s**2 + sigma_data**2)
    return c_skip * x + c_out * F_net(c_in * x, 250 * torch.log(sigma))


def rho_cauchy(m, c):
    return torch.log1p(m / (2 * c * c))


def rho_pseudo_huber(m, c):
    return torch.sqrt(m + c * c) - c
