"""The attention eigendirection math: formula against the host's real attention, optimality, numerics."""
import dataclasses

import pytest
import torch
from directions_testing import assert_float32_close, planted, random_layer

from semantic_directions.directions.attention import (
    EXACT_SVD_MAX_WIDTH,
    METHODS,
    RESIDUAL_TOLERANCE,
    AttentionWeights,
    attention_directions,
    fix_signs,
    key_tilts,
    shift_jacobian,
    shift_operator,
    top_right_singular,
    whitening_constant,
)


def host_attention(host, weights: AttentionWeights):
    """The host's own CrossAttention module (self-attention use) holding these weights."""
    import comfy.ops
    from comfy.ldm.modules.attention import CrossAttention
    width, inner = weights.width, weights.q.shape[0]
    module = CrossAttention(query_dim=width, heads=weights.heads, dim_head=inner // weights.heads,
                            dtype=weights.q.dtype, operations=comfy.ops.disable_weight_init)
    state = {"to_q.weight": weights.q, "to_k.weight": weights.k, "to_v.weight": weights.v,
             "to_out.0.weight": weights.out, "to_out.0.bias": torch.zeros(width, dtype=weights.q.dtype)}
    module.load_state_dict(state)
    return module


def test_first_order_formula_matches_finite_differences_of_the_host_attention(host):
    weights = random_layer(48, 4)
    tokens = torch.randn(64, 48, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    attention = host_attention(host, weights)
    direction = torch.nn.functional.normalize(
        torch.randn(48, generator=torch.Generator().manual_seed(2), dtype=torch.float64), dim=0)
    step = 1e-5  # float64: truncation (step^2) and rounding (eps / step) errors both far below 1e-6
    with torch.no_grad():
        plus = attention(tokens[None] + step * direction)[0]
        minus = attention(tokens[None] - step * direction)[0]
    finite = (plus - minus) / (2 * step)
    formula = shift_jacobian(tokens, weights) @ direction
    assert (formula - finite).norm() / finite.norm() < 1e-6


def test_whitened_top_direction_is_near_the_exact_optimum(host):
    """Tokens with covariance s^2 I: the weights-only direction against the full Jacobian's optimum."""
    width, heads, tokens_count, variance = 32, 4, 1024, 1.0
    weights = random_layer(width, heads, seed=2)
    tokens = torch.randn(tokens_count, width, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    attention = host_attention(host, weights)

    step, eye = 1e-6, torch.eye(width, dtype=torch.float64)
    with torch.no_grad():  # the full Jacobian of the real forward pass, column by column
        columns = [(attention(tokens[None] + step * e)[0] - attention(tokens[None] - step * e)[0]) / (2 * step)
                   for e in eye]
    full = torch.stack(columns, dim=-1)  # [tokens, out, width]
    gram = torch.einsum("iod,ioe->de", full, full)  # sum over tokens of J_i^T J_i
    sensitivity = lambda n: n @ gram @ n  # noqa: E731  |dO|^2 per unit shift along n
    optimum = torch.linalg.eigvalsh(gram)[-1]
    top = attention_directions(weights, 1, "whitened", variance)[0][0]
    randoms = torch.nn.functional.normalize(
        torch.randn(1000, width, generator=torch.Generator().manual_seed(4), dtype=torch.float64), dim=1)
    random_sensitivity = torch.einsum("nd,de,ne->n", randoms, gram, randoms)
    assert sensitivity(top) >= random_sensitivity.max()
    assert sensitivity(top) >= 0.97 * optimum
    value_top = attention_directions(weights, 1, "value")[0][0]
    assert sensitivity(top) >= sensitivity(value_top)


def test_whitened_operator_is_the_formula_with_identity_covariance():
    """J equals shift_jacobian's per-token matrix once Cov_i is replaced by s^2 I
    (docs/math.md, section 'The whitened-token assumption')."""
    weights = random_layer(24, 3, seed=5)
    apply, apply_t = shift_operator(weights, "whitened", token_variance=2.0)
    explicit = apply(torch.eye(24, dtype=torch.float64))
    c = whitening_constant(8, 2.0)
    manual = sum(weights.out[:, h * 8:(h + 1) * 8] @ weights.v[h * 8:(h + 1) * 8]
                 @ (torch.eye(24, dtype=torch.float64)
                    + c * weights.k[h * 8:(h + 1) * 8].T @ weights.q[h * 8:(h + 1) * 8]) for h in range(3))
    assert torch.allclose(explicit, manual, atol=1e-12)  # float64 sums of entries below 1: errors near 1e-16
    assert torch.allclose(apply_t(torch.eye(24, dtype=torch.float64)), explicit.T, atol=1e-12)


@pytest.mark.parametrize("silent", ["q", "k"])
def test_a_qk_normed_head_without_queries_or_keys_has_no_tilt(silent):
    """A head whose query (or key) weights are all zero, without bias, attends uniformly whatever the token:
    under QK-norm its expected RMS is 0, and its tilt is 0 (it was 0 / 0, NaN directions); the other heads'
    tilts are unchanged."""
    layer = random_layer(32, 2, seed=3)
    gains = torch.linspace(0.5, 1.5, 16, dtype=torch.float64)
    normed = dataclasses.replace(layer, q_norm=gains, k_norm=gains.flip(0))
    weight = getattr(normed, silent).clone()
    weight[:16] = 0
    pruned = dataclasses.replace(normed, **{silent: weight})
    tilts = key_tilts(pruned)
    assert torch.equal(tilts[0], torch.zeros_like(tilts[0]))
    assert torch.equal(tilts[1], key_tilts(normed)[1])
    vectors, gains = attention_directions(pruned, 4, "whitened")
    assert torch.isfinite(vectors).all() and torch.isfinite(gains).all()


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("width", [64, 640])
def test_directions_are_orthonormal_sorted_signed_and_accurate(method, width):
    weights = random_layer(width, 8, seed=6, dtype=torch.float32)
    vectors, gains = attention_directions(weights, 10, method)
    assert vectors.shape == (10, width) and gains.shape == (10,)
    # float32 SVD (or QR) vectors are orthonormal to a few width * eps: 1e-4 is 840 eps (measured: 7e-7)
    assert torch.allclose(vectors @ vectors.T, torch.eye(10), atol=1e-4)
    assert (gains[:-1] >= gains[1:]).all()
    largest = vectors.gather(1, vectors.abs().argmax(dim=1, keepdim=True))
    assert (largest > 0).all()
    apply, _ = shift_operator(weights, method)
    exact = torch.linalg.svdvals(apply(torch.eye(width)).double())[:10].float()
    captured = (apply(vectors.T).norm(dim=0) ** 2).sum() / (exact ** 2).sum()
    if width <= EXACT_SVD_MAX_WIDTH:  # float32 SVD: errors of a few float32 ulps of the largest singular value
        assert_float32_close(gains, exact, scale=float(exact[0]))
    else:  # random weights have a flat spectrum, the hardest case for the iterative path
        assert ((gains - exact).abs() / exact).max() < RESIDUAL_TOLERANCE / 2  # the stopping rule's promise
        assert captured > 0.995


def test_methods_are_the_documented_matrices():
    weights = random_layer(40, 5, seed=7)
    eye = torch.eye(40, dtype=torch.float64)
    value = shift_operator(weights, "value")[0](eye)
    assert torch.allclose(value, weights.out @ weights.v)
    assert torch.allclose(shift_operator(weights, "whitened", token_variance=0.0)[0](eye), value)
    stack_vectors, stack_gains = attention_directions(weights, 5, "qkv-stack")
    gram = weights.q.T @ weights.q + weights.k.T @ weights.k + weights.v.T @ weights.v
    eigenvalues, eigenvectors = torch.linalg.eigh(gram)
    # float64 throughout; the top eigenvalues lie 0.07 apart or more, so the vectors agree to about 1e-14
    assert torch.allclose(stack_gains ** 2, eigenvalues.flip(0)[:5], rtol=1e-9)
    assert torch.allclose(stack_vectors, fix_signs(eigenvectors.flip(1)[:, :5].T), atol=1e-8)


def test_results_are_reproducible_bit_for_bit():
    weights = random_layer(512, 8, seed=8, dtype=torch.float32)
    first = attention_directions(weights, 10, "whitened")
    torch.manual_seed(123)  # the global generator must not matter
    second = attention_directions(weights, 10, "whitened")  # same process, threads and shapes: the same kernels
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_unknown_method():
    with pytest.raises(ValueError, match="method 'eigen' is not one of whitened, value, qkv-stack"):
        shift_operator(random_layer(8, 2), "eigen")


def test_many_directions_of_a_wide_layer_are_exact():
    """Asking for more directions than the Krylov basis holds falls back to the exact SVD."""
    weights = random_layer(320, 8, seed=9, dtype=torch.float32)
    vectors, gains = attention_directions(weights, 300, "value")
    assert vectors.shape == (300, 320)
    exact = torch.linalg.svdvals((weights.out @ weights.v).double())[:300].float()
    # float32 SVD errors scale with the largest singular value, not with each one (the 300th is 1/130 of it)
    assert_float32_close(gains, exact, scale=float(exact[0]))


def planted_operator(singular_values, width=640, seed=0):
    """A = U diag(s) V^T in float64 with random orthonormal U, V: (apply, apply_t, V's top rows)."""
    a, top = planted(width, width, singular_values, seed)
    return (lambda x: a @ x), (lambda y: a.T @ y), top


@pytest.mark.parametrize("tie", [1.0006, 1.0 + 1e-9])
def test_a_near_tie_still_gives_the_top_gains_and_their_energy(tie):
    """sigma_10 / sigma_11 = ``tie``: no method can pin the 10th vector, but the gains found are the top
    gains (each vector's own gain |A v| equals it) and they capture the top-10 energy."""
    values = torch.cat([torch.linspace(3.0, 2.0, 9), torch.tensor([1.5 * tie, 1.5]),
                        torch.linspace(1.49, 0.5, 629)]).double()
    apply, apply_t, _ = planted_operator(values)
    vectors, gains = top_right_singular(apply, apply_t, 640, 10, like=torch.zeros(1, dtype=torch.float64))
    assert ((gains - values[:10]).abs() / values[:10]).max() < RESIDUAL_TOLERANCE / 2
    assert torch.allclose(apply(vectors.T).norm(dim=0), gains, rtol=1e-6)
    assert (gains ** 2).sum() / (values[:10] ** 2).sum() > 0.998


def test_a_clear_gap_pins_the_subspace():
    values = torch.cat([torch.linspace(3.0, 2.0, 10), torch.linspace(1.8, 0.5, 630)]).double()
    apply, apply_t, top = planted_operator(values, seed=1)
    vectors, gains = top_right_singular(apply, apply_t, 640, 10, like=torch.zeros(1, dtype=torch.float64))
    assert ((gains - values[:10]).abs() / values[:10]).max() < RESIDUAL_TOLERANCE / 2
    assert torch.linalg.svdvals(top[:10] @ vectors.T).min() > 0.999


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_an_operator_of_rank_below_count_stops_in_krylov_with_null_directions(dtype):
    """A rank-3 operator asked for 8 directions (a Jacobian under a small mask), with the Jacobian's floor: the top
    3 gains exact, the rest null directions (gains under 0.2% of the top), found in two blocks of products, not
    by forming the operator."""
    values = torch.cat([torch.tensor([3.0, 2.0, 1.0]), torch.zeros(637)]).double()
    apply, apply_t, top = planted_operator(values, seed=2)
    products = []

    def counted(x):
        products.append(x.shape[1])
        return apply(x.double()).to(dtype)
    vectors, gains = top_right_singular(counted, lambda y: apply_t(y.double()).to(dtype), 640, 8,
                                        like=torch.zeros(1, dtype=dtype), floor=1e-3)
    assert sum(products) == 2 * (8 + 6)  # the start block and one more: no exact decomposition (640 products)
    assert torch.allclose(gains[:3].double(), values[:3], rtol=1e-5) and (gains[3:] < 2e-3 * gains[0]).all()
    assert torch.linalg.svdvals(top[:3] @ vectors[:3].T.double()).min() > 0.9999


@pytest.mark.parametrize("method", METHODS)
def test_a_bfloat16_draft_only_chooses_the_subspace(method):
    """Grown with bfloat16 products, checked with the float32 operator: the same rule holds on the
    operator itself, and every gain is its vector's own float32 gain."""
    weights = random_layer(640, 8, seed=10, dtype=torch.float32)
    apply, apply_t = shift_operator(weights, method)
    draft = shift_operator(weights, method, product_dtype=torch.bfloat16)
    eye = torch.eye(640)
    # bfloat16 keeps 8 bits: entries of the products within a few 2^-9 of the operator's scale
    assert (draft[0](eye) - apply(eye)).abs().max() < 1e-2 * apply(eye).abs().max()
    vectors, gains = top_right_singular(apply, apply_t, 640, 10, like=weights.q, draft=draft)
    products = apply_t(apply(vectors.T))
    residuals = (products - vectors.T * gains ** 2).norm(dim=0)
    assert (residuals <= 5e-3 * gains ** 2).all()
    assert torch.allclose(apply(vectors.T).norm(dim=0), gains, rtol=1e-5)  # float32 norms of the same products
    exact = torch.linalg.svdvals(apply(eye).double())[:10]
    assert ((gains.double() - exact).abs() / exact).max() < 2.5e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_transposed_products_are_the_operators_transpose(method, dtype):
    """apply_t is A^T, in each precision's fast form (a row product in float32, a contiguous transposed copy in
    bfloat16): against the float64 operator's transpose, to float32 rounding, or bfloat16's 8 bits."""
    weights = random_layer(640, 8, seed=11, dtype=torch.float32)
    exact = shift_operator(dataclasses.replace(weights, **{name: getattr(weights, name).double()
                                                           for name in ("q", "k", "v", "out")}), method)[0]
    _, apply_t = shift_operator(weights, method, product_dtype=dtype)
    matrix = exact(torch.eye(640, dtype=torch.float64))
    probe = torch.randn(matrix.shape[0], 3, generator=torch.Generator().manual_seed(12))
    expected = matrix.T @ probe.double()
    if dtype == torch.float32:
        assert_float32_close(apply_t(probe), expected)
    else:  # each product's inputs rounded to 8 bits: entries within a few 2^-9 of the result's scale
        assert (apply_t(probe).double() - expected).abs().max() < 1e-2 * expected.abs().max()
