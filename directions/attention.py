"""Attention eigendirections: editing directions from a self-attention layer's weights alone.

docs/math.md, section 'Attention eigendirections'. Shift every token of the layer's input (the
LayerNorm output fed to q, k and v) by the same unit vector n. To first order, query token i's
output moves by J_i n with

    J_i = sum_h W_o[:, h] (W_v[h] + Cov_i(W_v[h] x, W_k[h] x) W_q[h] / sqrt(d_h)),

Cov_i being the attention-weighted covariance of the tokens query i attends to. Under the
whitened-token assumption of "Self-Attention Decomposition for Training Free Diffusion Editing"
(arXiv 2510.22650), token covariance s^2 I, every J_i equals

    J = sum_h W_o[:, h] W_v[h] (I + c W_k[h]^T W_q[h]),   c = s^2 / sqrt(d_h),

so |dO|^2 = N |J n|^2 and the most effective directions are the top right singular vectors of J.
J is never formed for wide layers: it is applied to blocks of vectors in O(d * inner) and its top
singular vectors come from block Krylov iteration stopped on the Ritz residuals, far cheaper than
an eigendecomposition of J^T J (docs/math.md, section 'Matrix-free top singular vectors').
"""
import math
from dataclasses import dataclass

import torch
from einops import rearrange

METHODS = ("whitened", "value", "qkv-stack")
EXACT_SVD_MAX_WIDTH = 256
OVERSAMPLE = 6  # extra vectors in each Krylov block beyond the directions asked for
RESIDUAL_TOLERANCE = 5e-3  # Ritz residual over Ritz value: gains within 0.25%


@dataclass(frozen=True)
class AttentionWeights:
    """One self-attention layer, torch Linear convention: q, k, v [heads * d_head, d], out [d_out, heads * d_head]."""
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    heads: int

    @property
    def width(self) -> int:
        return self.q.shape[1]

    @property
    def head_width(self) -> int:
        return self.q.shape[0] // self.heads


def whitening_constant(head_width: int, token_variance: float = 1.0) -> float:
    """c = s^2 / sqrt(d_h). s^2 = 1 is the variance of a LayerNorm output's features before its gain."""
    return token_variance / math.sqrt(head_width)


def shift_operator(weights: AttentionWeights, method: str, token_variance: float = 1.0):
    """(apply, apply_t): x [d, p] -> A x and y -> A^T y for the method's matrix A, never formed.

    ``whitened``: A = J above, applied as W_o G with G = W_v + c blockdiag_h(W_v[h] W_k[h]^T) W_q
    ([inner, d], cheap to form). ``value``: A = W_o W_v (c = 0). ``qkv-stack``: A = [W_q; W_k; W_v],
    SeFa's factorisation, whose right singular vectors are the eigenvectors of
    W_q^T W_q + W_k^T W_k + W_v^T W_v.
    """
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    q, k, v, out = weights.q, weights.k, weights.v, weights.out
    if method == "qkv-stack":
        return (lambda x: torch.cat([q @ x, k @ x, v @ x])), \
            (lambda y: sum(w.T @ part for w, part in zip((q, k, v), y.chunk(3))))
    mixed = v
    if method == "whitened":
        c = whitening_constant(weights.head_width, token_variance)
        per_head = [rearrange(w, "(h e) d -> h e d", h=weights.heads) for w in (v, k, q)]
        value_key = torch.einsum("hed,hfd->hef", per_head[0], per_head[1])  # W_v[h] W_k[h]^T
        mixed = v + c * rearrange(torch.einsum("hef,hfd->hed", value_key, per_head[2]), "h e d -> (h e) d")
    return (lambda x: out @ (mixed @ x)), (lambda y: mixed.T @ (out.T @ y))


def top_right_singular(apply, apply_t, width: int, count: int, like: torch.Tensor,
                       tolerance: float = RESIDUAL_TOLERANCE, seed: int = 0):
    """The ``count`` top right singular vectors (rows, [count, width]) and values of an operator.

    Narrow operators are formed and decomposed exactly. Otherwise block Krylov iteration on A^T A
    grows an orthonormal basis a block at a time and takes Rayleigh-Ritz pairs (theta_i, v_i) from
    it, stopping on a measured criterion: every pair's residual |A^T A v_i - theta_i v_i| is at most
    ``tolerance`` * theta_i, so an eigenvalue of A^T A lies within that fraction of each theta_i
    and each gain is within half of it (docs/math.md, section 'Matrix-free top singular vectors').
    Near-tied singular values, whose vectors no method can pin, still meet it: the residual only
    asks for vectors whose gains are true top gains. A basis that would pass half the width is
    abandoned for the exact decomposition. The start block is drawn from ``seed`` on the CPU, so
    the result does not depend on the device's random generator. ``like`` gives the device and
    dtype the operator works in.
    """
    device, dtype = like.device, like.dtype
    count = min(count, width)
    block = count + OVERSAMPLE
    if width <= EXACT_SVD_MAX_WIDTH or 2 * block > width // 2:
        return _exact(apply, width, count, device, dtype)
    start = torch.randn(width, block, generator=torch.Generator().manual_seed(seed)).to(device, dtype)
    basis = torch.linalg.qr(start).Q
    products = apply_t(apply(basis))  # A^T A basis, a block at a time: the only operator products made
    while True:
        gram = basis.T @ products
        gram_values, gram_vectors = torch.linalg.eigh((gram + gram.T) / 2)
        values = gram_values.flip(0)[:count].clamp(min=0)
        coefficients = gram_vectors.flip(1)[:, :count].to(dtype)
        ritz = basis @ coefficients
        residual = products @ coefficients - ritz * values.to(dtype)
        if (residual.norm(dim=0) <= tolerance * values).all():
            return fix_signs(ritz.T), values.sqrt().to(dtype)
        if basis.shape[1] + block > width // 2:
            return _exact(apply, width, count, device, dtype)
        grown = products[:, -block:]
        for _ in range(2):  # twice is enough (Giraud et al.): the new block orthogonal to the basis in float32
            grown = grown - basis @ (basis.T @ grown)
        new = torch.linalg.qr(grown).Q
        basis, products = torch.cat([basis, new], dim=1), torch.cat([products, apply_t(apply(new))], dim=1)


def _exact(apply, width: int, count: int, device, dtype):
    _, values, vh = torch.linalg.svd(apply(torch.eye(width, device=device, dtype=dtype)), full_matrices=False)
    return fix_signs(vh[:count]), values[:count]


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its component of largest magnitude is positive (reproducible signs)."""
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    return vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


@torch.no_grad()
def attention_directions(weights: AttentionWeights, count: int, method: str = "whitened",
                         token_variance: float = 1.0):
    """Top ``count`` unit directions [count, d] of a self-attention layer's input, with gains [count]."""
    apply, apply_t = shift_operator(weights, method, token_variance)
    return top_right_singular(apply, apply_t, weights.width, count, like=weights.q)


def shift_jacobian(tokens: torch.Tensor, weights: AttentionWeights) -> torch.Tensor:
    """Exact first-order response [N, d_out, d]: how each output token moves per unit shift of all tokens.

    The formula the whitened operator approximates, evaluated on real tokens [N, d]
    (docs/math.md, section 'First-order response of a self-attention layer').
    """
    heads, scale = weights.heads, weights.head_width ** -0.5
    q, k, v = (rearrange(tokens @ w.T, "n (h e) -> h n e", h=heads) for w in (weights.q, weights.k, weights.v))
    attn = torch.softmax(torch.einsum("hie,hje->hij", q, k) * scale, dim=-1)
    v_mean, k_mean = attn @ v, attn @ k
    covariance = (torch.einsum("hij,hje,hjf->hief", attn, v, k)
                  - torch.einsum("hie,hif->hief", v_mean, k_mean))
    w_q = rearrange(weights.q, "(h e) d -> h e d", h=heads)
    w_v = rearrange(weights.v, "(h e) d -> h e d", h=heads)
    per_head = w_v[:, None] + scale * torch.einsum("hief,hfd->hied", covariance, w_q)
    w_o = rearrange(weights.out, "o (h e) -> h o e", h=heads)
    return torch.einsum("hoe,hied->iod", w_o, per_head)
