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
import time
from dataclasses import dataclass

import torch
from einops import rearrange

METHODS = ("whitened", "value", "qkv-stack")
EXACT_SVD_MAX_WIDTH = 256
OVERSAMPLE = 6  # extra vectors in each Krylov block beyond the directions asked for
BLOCKS_PER_CHECK = 2  # after the first: each Rayleigh-Ritz check costs about as much as a block's products
RESIDUAL_TOLERANCE = 5e-3  # Ritz residual over Ritz value: gains within 0.25%
DEPENDENT = 1e-4  # a grown block's column this much smaller than its largest after orthogonalisation: dependent


@dataclass(frozen=True)
class AttentionWeights:
    """One self-attention layer, torch Linear convention: q, k, v [heads * d_head, d], out [d_out, heads * d_head].

    ``q_norm`` and ``k_norm`` ([d_head] gains, shared by the heads) say that each head's queries and keys
    pass an RMS norm with those gains before attention (the QK-norm of DiT blocks); None for none.
    ``q_bias``, ``k_bias`` and ``v_bias`` ([heads * d_head]) are the projections' biases where they have
    them: the norms see the first two, and the value bias counts where the queries also attend to
    tokens of other weights (joint attention's text tokens); otherwise it cancels from every derivative.
    """
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    out: torch.Tensor
    heads: int
    q_norm: torch.Tensor | None = None
    k_norm: torch.Tensor | None = None
    q_bias: torch.Tensor | None = None
    k_bias: torch.Tensor | None = None
    v_bias: torch.Tensor | None = None
    norm_eps: float = 1e-6

    @property
    def width(self) -> int:
        return self.q.shape[1]

    @property
    def head_width(self) -> int:
        return self.q.shape[0] // self.heads


def whitening_constant(head_width: int, token_variance: float = 1.0) -> float:
    """c = s^2 / sqrt(d_h). s^2 = 1 is the variance of a LayerNorm output's features before its gain."""
    return token_variance / math.sqrt(head_width)


def key_tilts(weights: AttentionWeights, token_variance: float = 1.0) -> torch.Tensor:
    """[heads, d_h, d_h]: c W_v[h] W_k[h]^T, the whitened operator's tilt of head h before W_q[h].

    With QK RMS-norms, c_h = s^2 (1 - 1/d_h) / (sqrt(d_h) r_q r_k), r the expected RMS of the head's
    projected token (sqrt((s^2 |W[h]|^2 + |b[h]|^2) / d_h)), and the norms' gains weigh the key
    features (docs/math.md, section 'Transformer (DiT) attention')."""
    heads, e = weights.heads, weights.head_width
    per_head = [rearrange(w, "(h e) d -> h e d", h=heads) for w in (weights.v, weights.k, weights.q)]
    value_key = torch.einsum("hed,hfd->hef", per_head[0], per_head[1])
    if weights.q_norm is None or token_variance == 0:  # no spread among the tokens: no tilt
        return whitening_constant(e, token_variance) * value_key

    def expected_rms(weight, bias):
        power = token_variance * torch.linalg.vector_norm(weight.flatten(1), dim=1).square()
        if bias is not None:
            power = power + rearrange(bias.to(weight.dtype), "(h e) -> h e", h=heads).pow(2).sum(1)
        return (power / e).sqrt()
    scale = math.sqrt(e) * expected_rms(per_head[2], weights.q_bias) * expected_rms(per_head[1], weights.k_bias)
    # a head whose queries or keys are all zero attends uniformly whatever the token: no tilt (not 0 / 0)
    c = torch.where(scale > 0, token_variance * (1 - 1 / e) / scale.clamp_min(torch.finfo(scale.dtype).tiny), 0.0)
    return c[:, None, None] * value_key * (weights.k_norm * weights.q_norm).to(value_key.dtype)


def shift_operator(weights: AttentionWeights, method: str, token_variance: float = 1.0,
                   product_dtype: torch.dtype | None = None):
    """(apply, apply_t): x [d, p] -> A x and y -> A^T y for the method's matrix A, never formed.

    ``whitened``: A = J above, W_o G with G = W_v + c blockdiag_h(W_v[h] W_k[h]^T) W_q ([inner, d],
    cheap to form). ``value``: A = W_o W_v (c = 0). ``qkv-stack``: A = [W_q; W_k; W_v], SeFa's
    factorisation, whose right singular vectors are the eigenvectors of W_q^T W_q + W_k^T W_k +
    W_v^T W_v. ``product_dtype``: run the products in that precision (bfloat16 halves their cost
    where the hardware has it), returning the input's dtype; by default the weights' own.
    """
    return _shift_operators(weights, method, token_variance, [(product_dtype, True)])[0]


def _shift_operators(weights: AttentionWeights, method: str, token_variance: float, variants):
    """One (apply, apply_t) per (product dtype, whether to form G) in ``variants``, sharing the work.
    Forming G pays when the operator makes many products; unformed, G x is W_v x + c blockdiag(W_v[h]
    W_k[h]^T) (W_q x), one more product per block."""
    if method not in METHODS:
        raise ValueError(f"method {method!r} is not one of {', '.join(METHODS)}")
    heads = weights.heads
    if method == "whitened":
        tilts = key_tilts(weights, token_variance)
    operators = []
    for product_dtype, formed in variants:
        dtype = product_dtype or weights.q.dtype
        if method == "qkv-stack":
            operators.append(_stack_pair([_products(w, dtype) for w in (weights.q, weights.k, weights.v)], dtype))
            continue
        if method == "value":
            mixed = _products(weights.v, dtype)
        elif formed:
            per_head = [rearrange(w.to(dtype), "(h e) d -> h e d", h=heads) for w in (weights.v, weights.q)]
            mixed = _products(rearrange(torch.baddbmm(per_head[0], tilts.to(dtype), per_head[1]), "h e d -> (h e) d"),
                              dtype)
        else:
            mixed = _unformed_mixed(_products(weights.v, dtype), _products(weights.q, dtype), tilts.to(dtype), heads)
        operators.append(_product_pair(mixed, _products(weights.out, dtype), dtype))
    return operators


def _products(weight: torch.Tensor, dtype: torch.dtype):
    """(x -> W x, y -> W^T y) in ``dtype``. In float32 and float64 the transposed product is taken as a row
    product, (y^T W)^T: BLAS runs it as fast as W x, where W^T y through the strided view ran 1.5x (1280 wide) to
    2x (3072) slower, and a transposed copy costs 2 ms (1280) to 26 ms (3072) (one core, AVX-512). In bfloat16
    only a contiguous matrix multiplies at full speed (either other way ran 2.2x slower), so W^T is copied."""
    weight = weight.to(dtype)
    if dtype in (torch.float32, torch.float64):
        return weight.__matmul__, lambda y: (y.T @ weight).T
    return weight.__matmul__, weight.T.contiguous().__matmul__


def _stack_pair(stacked, dtype):
    """A = [W_q; W_k; W_v] from their (x -> W x, y -> W^T y)."""
    def apply(x):
        return torch.cat([w(x.to(dtype)) for w, _ in stacked]).to(x.dtype)

    def apply_t(y):
        return sum(w_t(part.to(dtype)) for (_, w_t), part in zip(stacked, y.chunk(3))).to(y.dtype)
    return apply, apply_t


def _product_pair(mixed, out, dtype):
    """A = W_o G from G's and W_o's (x -> M x, y -> M^T y)."""
    (g, g_t), (o, o_t) = mixed, out
    return (lambda x: o(g(x.to(dtype))).to(x.dtype)), (lambda y: g_t(o_t(y.to(dtype))).to(y.dtype))


def _unformed_mixed(v, q, tilt, heads):
    """(x -> G x, y -> G^T y) without G: W_v x + blockdiag(tilt) (W_q x), and its transpose."""
    (w_v, w_v_t), (w_q, w_q_t) = v, q

    def apply(x):
        tilted = torch.einsum("hef,hfp->hep", tilt, rearrange(w_q(x), "(h f) p -> h f p", h=heads))
        return w_v(x) + rearrange(tilted, "h e p -> (h e) p")

    def apply_t(y):
        tilted = torch.einsum("hef,hep->hfp", tilt, rearrange(y, "(h e) p -> h e p", h=heads))
        return w_v_t(y) + w_q_t(rearrange(tilted, "h f p -> (h f) p"))
    return apply, apply_t


def fast_product_dtype(device: torch.device) -> torch.dtype | None:
    """bfloat16 where its matrix products are clearly faster than float32 on ``device`` (GPUs with
    bfloat16 units; CPUs with AVX-512 BF16 or AMX, timed once), else None."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else None
    if device.type != "cpu":
        return None
    if "cpu" not in _fast_dtypes:
        matrix, block = torch.randn(1280, 1280), torch.randn(1280, 16)
        seconds = {dtype: _best_time(lambda a=matrix.to(dtype), b=block.to(dtype): a @ b)
                   for dtype in (torch.float32, torch.bfloat16)}
        _fast_dtypes["cpu"] = torch.bfloat16 if seconds[torch.bfloat16] < 0.7 * seconds[torch.float32] else None
    return _fast_dtypes["cpu"]


_fast_dtypes = {}


def _best_time(function, repeats: int = 5) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        best = min(best, time.perf_counter() - start)
    return best


def top_right_singular(apply, apply_t, width: int, count: int, like: torch.Tensor,
                       tolerance: float = RESIDUAL_TOLERANCE, seed: int = 0, draft=None,
                       exact_width: int = EXACT_SVD_MAX_WIDTH, blocks_per_check: int = BLOCKS_PER_CHECK,
                       floor: float = 0.0):
    """The ``count`` top right singular vectors (rows, [count, width]) and values of an operator.

    Operators at most ``exact_width`` wide are formed and decomposed exactly. Otherwise block Krylov iteration on A^T A
    grows an orthonormal basis a block at a time and takes Rayleigh-Ritz pairs (theta_i, v_i) from
    it, stopping on a measured criterion: every pair's residual |A^T A v_i - theta_i v_i| is at most
    ``tolerance`` * theta_i, so an eigenvalue of A^T A lies within that fraction of each theta_i
    and each gain is within half of it (docs/math.md, section 'Matrix-free top singular vectors').
    Near-tied singular values, whose vectors no method can pin, still meet it: the residual only
    asks for vectors whose gains are true top gains. ``draft``: a cheaper (apply, apply_t) of nearly
    the same operator (bfloat16 products): the basis is grown with it, and its top Ritz vectors
    start the iteration with (apply, apply_t), which checks the rule on the operator itself. A basis
    that would pass half the width is abandoned for the exact decomposition. The start block is
    drawn from ``seed`` on the CPU, so the result does not depend on the device's random
    generator. ``like`` gives the device and dtype the operator works in. ``blocks_per_check``: blocks
    added between checks after the first (more where a check costs as much as a block's products). ``floor``:
    Ritz values below this fraction of the top one are held to the rule at that level, for operators of rank
    below ``count`` (a Jacobian under a small mask), whose null directions' residuals never fall below a
    fraction of their rounding-sized Ritz values.
    """
    device, dtype = like.device, like.dtype
    count = min(count, width)
    block = count + OVERSAMPLE
    if width <= exact_width or 2 * block > width // 2:
        return _exact(apply, width, count, device, dtype)
    start = torch.randn(width, block, generator=torch.Generator().manual_seed(seed), device="cpu").to(device, dtype)
    for operator in ([draft] if draft is not None else []) + [(apply, apply_t)]:
        found = _block_krylov(*operator, start, count, tolerance, blocks_per_check, floor)
        if found is None:
            return _exact(apply, width, count, device, dtype)
        start, values = found
    return fix_signs(start[:, :count].T), values[:count].sqrt()


def _block_krylov(apply, apply_t, start: torch.Tensor, count: int, tolerance: float, blocks_per_check: int,
                  floor: float):
    """Block Krylov on A^T A from ``start`` [width, block] until the top ``count`` Ritz pairs meet the
    residual rule: (the top ``block`` Ritz vectors [width, block], their values), or None once the
    basis would pass half the width. The basis, its products and the Gram matrix Q^T A^T A Q grow a
    block at a time in place (room for half the width), so no step copies what came before."""
    width, block = start.shape
    room = width // 2
    basis, products, gram = start.new_empty(width, room), start.new_empty(width, room), start.new_empty(room, room)
    basis[:, :block] = torch.linalg.qr(start).Q
    products[:, :block] = apply_t(apply(basis[:, :block]))  # A^T A basis: the only operator products made
    gram[:block, :block] = basis[:, :block].T @ products[:, :block]
    size = block
    while True:
        found, grown_products, small = basis[:, :size], products[:, :size], gram[:size, :size]
        gram_values, gram_vectors = torch.linalg.eigh((small + small.T) / 2)
        values = gram_values.flip(0)[:block].clamp(min=0)
        coefficients = gram_vectors.flip(1)[:, :block]
        ritz = found @ coefficients
        residual = grown_products @ coefficients[:, :count] - ritz[:, :count] * values[:count]
        if (residual.norm(dim=0) <= tolerance * values[:count].clamp(min=floor * values[0])).all():
            return ritz, values
        for _ in range(1 if size == block else blocks_per_check):
            if size + block > room:
                return None
            found, end = basis[:, :size], size + block
            grown = products[:, size - block:size]
            for _ in range(2):  # twice is enough (Giraud et al.): the new block orthogonal to the basis in float32
                grown = grown - found @ (found.T @ grown)
            new, r = torch.linalg.qr(grown)
            diagonal = r.diagonal().abs()
            if (diagonal <= DEPENDENT * diagonal.max()).any():  # the Krylov space ran out (rank below the block):
                new = torch.linalg.qr(new - found @ (found.T @ new)).Q  # QR's filler columns, made orthogonal too
            basis[:, size:end] = new
            products[:, size:end] = apply_t(apply(new))
            gram[:size, size:end] = found.T @ products[:, size:end]
            gram[size:end, :size] = gram[:size, size:end].T
            gram[size:end, size:end] = new.T @ products[:, size:end]
            size = end


def _exact(apply, width: int, count: int, device, dtype):
    _, values, vh = torch.linalg.svd(apply(torch.eye(width, device=device, dtype=dtype)), full_matrices=False)
    return fix_signs(vh[:count]), values[:count]


def fix_signs(vectors: torch.Tensor) -> torch.Tensor:
    """Flip each row so that its component of largest magnitude is positive (reproducible signs)."""
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    return vectors * torch.where(largest < 0, -1.0, 1.0).to(vectors.dtype)


@torch.no_grad()
def attention_directions(weights: AttentionWeights, count: int, method: str = "whitened",
                         token_variance: float = 1.0, fast: bool = True):
    """Top ``count`` unit directions [count, d] of a self-attention layer's input, with gains [count].
    ``fast``: grow the Krylov basis with bfloat16 products where the device runs them faster; the
    stopping rule is still checked, and the gains measured, in the weights' precision."""
    product_dtype = fast_product_dtype(weights.q.device) if fast and weights.width > EXACT_SVD_MAX_WIDTH else None
    if product_dtype is None:
        (apply, apply_t), draft = shift_operator(weights, method, token_variance), None
    else:  # the exact operator checks a block or two: cheaper unformed
        (apply, apply_t), draft = _shift_operators(weights, method, token_variance,
                                                   [(None, False), (product_dtype, True)])
    return top_right_singular(apply, apply_t, weights.width, count, like=weights.q, draft=draft)


def shift_jacobian(tokens: torch.Tensor, weights: AttentionWeights, rotations: torch.Tensor | None = None,
                   context: tuple | None = None) -> torch.Tensor:
    """Exact first-order response [N, d_out, d]: how each output token moves per unit shift of all tokens.

    The formula the whitened operator approximates, evaluated on real tokens [N, d] (docs/math.md,
    sections 'First-order response of a self-attention layer' and 'Transformer (DiT) attention'):
    with the layer's QK RMS-norms if it has them, ``rotations`` [N, d_h / 2, 2, 2] (each token's
    rotary matrices, applied to consecutive pairs of query and key features after the norm), and
    ``context``: (keys, values), each [heads, M, d_h], tokens the queries also attend to that the
    shift does not move (joint attention's text tokens), keys as the scores see them.
    """
    heads, scale = weights.heads, weights.head_width ** -0.5
    w_q, w_k, w_v = (rearrange(w, "(h e) d -> h e d", h=heads) for w in (weights.q, weights.k, weights.v))
    q, d_q = _normed(_project(tokens, w_q, weights.q_bias), w_q, weights.q_norm, weights.norm_eps)
    k, d_k = _normed(_project(tokens, w_k, weights.k_bias), w_k, weights.k_norm, weights.norm_eps)
    if rotations is not None:
        q, d_q, k, d_k = (_rotated(t, rotations) for t in (q, d_q, k, d_k))
    values = _project(tokens, w_v, weights.v_bias)
    moving = tokens.shape[0]
    if context is not None:
        k, values = torch.cat([k, context[0]], dim=1), torch.cat([values, context[1]], dim=1)
        d_k = torch.cat([d_k, d_k.new_zeros(heads, context[0].shape[1], *d_k.shape[2:])], dim=1)
    attn = torch.softmax(torch.einsum("hie,hje->hij", q, k) * scale, dim=-1)
    d_scores = (torch.einsum("hje,hied->hijd", k, d_q) + torch.einsum("hie,hjed->hijd", q, d_k)) * scale
    centred = values[:, None] - (attn @ values)[:, :, None]
    per_head = (attn[..., :moving].sum(-1)[..., None, None] * w_v[:, None]
                + torch.einsum("hij,hije,hijd->hied", attn, centred, d_scores))
    w_o = rearrange(weights.out, "o (h e) -> h o e", h=heads)
    return torch.einsum("hoe,hied->iod", w_o, per_head)


def _project(tokens, weight, bias):
    """[N, d] -> [h, N, e] through one head-split projection [h, e, d] and its bias [h * e], if any."""
    projected = torch.einsum("hed,nd->hne", weight, tokens)
    return projected if bias is None else projected + rearrange(bias, "(h e) -> h 1 e", h=weight.shape[0])


def _normed(projected, weight, gain, eps):
    """(features [h, N, e], their derivatives per unit input shift [h, N, e, d]), through an RMS norm with
    ``gain`` if there is one: d(g u / r) = g (I - u u^T / (e r^2)) du / r, r = sqrt(mean(u^2) + eps)."""
    if gain is None:
        return projected, weight[:, None].expand(-1, projected.shape[1], -1, -1)
    rms = (projected.pow(2).mean(-1, keepdim=True) + eps).sqrt()
    unit = projected / rms
    along = torch.einsum("hne,hnf,hfd->hned", unit, unit, weight) / projected.shape[-1]
    d_unit = (weight[:, None] - along) / rms[..., None]
    return gain * unit, gain[:, None] * d_unit


def _rotated(features, rotations):
    """Rotate consecutive feature pairs of [h, N, e] or [h, N, e, d] by each token's [N, e/2, 2, 2] matrices."""
    paired = rearrange(features, "h n (p c) ... -> h n p c ...", c=2)
    return rearrange(torch.einsum("nprc,hnpc...->hnpr...", rotations, paired), "h n p r ... -> h n (p r) ...")
