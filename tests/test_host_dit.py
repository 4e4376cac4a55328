"""Transformer (DiT) families on the real host: Flux's attention math against the host's own blocks, Discover
and Apply Direction on a tiny Flux built from the host's classes."""
import copy

import pytest
import torch

from semantic_directions.directions.attention import (AttentionWeights, attention_directions, shift_jacobian,
                                                      shift_operator)

TEXT, GRID = 5, (3, 4)  # text tokens, image token grid


@pytest.fixture(scope="module")
def flux(host):
    from harness.test_nodes.dits import build_flux
    return build_flux


def block_inputs(model, generator):
    """Float64 inputs of a Flux block: image and text tokens, the conditioning vector, rotary matrices of the
    text positions (all zero) and of the image grid, as the host's model builds them."""
    width = model.hidden_size
    img = torch.randn(1, GRID[0] * GRID[1], width, generator=generator, dtype=torch.float64)
    txt = torch.randn(1, TEXT, width, generator=generator, dtype=torch.float64)
    vec = torch.randn(1, width, generator=generator, dtype=torch.float64)
    rows, columns = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(1, -1, 3).float()
    ids = torch.cat([torch.zeros(1, TEXT, 3), img_ids], dim=1)
    return img, txt, vec, model.pe_embedder(ids).double()


def joint_context(weights: AttentionWeights, tokens, rotations):
    """(keys, values) [heads, M, e] of unshifted tokens as the scores see them: projected, normed, rotated."""
    heads = weights.heads

    def per_head(w, b):
        out = tokens @ w.T + (0 if b is None else b)
        return out.reshape(tokens.shape[0], heads, -1).transpose(0, 1)
    keys = per_head(weights.k, weights.k_bias)
    keys = weights.k_norm * keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + weights.norm_eps)
    paired = keys.reshape(*keys.shape[:-1], -1, 2)
    keys = torch.einsum("nprc,hnpc->hnpr", rotations, paired).reshape(keys.shape)
    return keys, per_head(weights.v, weights.v_bias)


def module_weights(linear, out, norm, heads, rows, columns) -> AttentionWeights:
    q, k, v = linear.weight[:rows].detach().chunk(3)
    q_bias, k_bias, v_bias = linear.bias[:rows].detach().chunk(3)
    return AttentionWeights(q, k, v, out.weight[:, :columns].detach(), heads, q_norm=norm.query_norm.scale.detach(),
                            k_norm=norm.key_norm.scale.detach(), q_bias=q_bias, k_bias=k_bias, v_bias=v_bias)


def record(seen, name, what="input", first=True):
    """A forward hook that keeps a module's input or output under ``name`` (the first call's, or the latest)."""
    def hook(module, args, output):
        if not (first and name in seen):
            seen[name] = (args[0] if what == "input" else output).detach()
    return hook


def finite_difference(run, step=1e-4):
    """Central difference of ``run(t)`` (the attention output with the input shifted by t n) at t = 0, after a
    run at t = 0 (whose inputs the hooks keep)."""
    run(0.0)
    return (run(step) - run(-step)) / (2 * step)


def test_exact_response_matches_the_hosts_double_block(flux):
    """shift_jacobian with QK-norm, rotary positions and the text tokens as unshifted context equals central
    differences of the host's DoubleStreamBlock (float64) at its image attention (docs/math.md, 'Transformer
    (DiT) attention')."""
    model = flux(seed=1).model.diffusion_model
    block = copy.deepcopy(model.double_blocks[0]).double()
    generator = torch.Generator().manual_seed(2)
    img, txt, vec, pe = block_inputs(model, generator)
    direction = torch.nn.functional.normalize(torch.randn(model.hidden_size, generator=generator, dtype=torch.float64), dim=0)
    seen = {}

    def run(t):
        hooks = [block.img_attn.qkv.register_forward_pre_hook(lambda m, a: (a[0] + t * direction,)),
                 block.img_attn.qkv.register_forward_hook(record(seen, "tokens")),
                 block.txt_attn.qkv.register_forward_hook(record(seen, "text")),
                 block.img_attn.proj.register_forward_hook(record(seen, "out", "output", first=False))]
        try:
            block(img=img.clone(), txt=txt.clone(), vec=vec, pe=pe)
        finally:
            for hook in hooks:
                hook.remove()
        return seen["out"][0]
    measured = finite_difference(run)
    weights = module_weights(block.img_attn.qkv, block.img_attn.proj, block.img_attn.norm, block.num_heads,
                             3 * model.hidden_size, model.hidden_size)
    text_weights = module_weights(block.txt_attn.qkv, block.txt_attn.proj, block.txt_attn.norm, block.num_heads,
                                  3 * model.hidden_size, model.hidden_size)
    rotations = pe[0, 0]
    context = joint_context(text_weights, seen["text"][0], rotations[:TEXT])
    predicted = shift_jacobian(seen["tokens"][0], weights, rotations[TEXT:], context) @ direction
    error = (predicted - measured).norm() / measured.norm()
    assert error <= 1e-4, error  # central differences at step 1e-4: truncation error near step^2 (measured 2e-10)


def test_exact_response_matches_the_hosts_single_block(flux):
    """The same for a SingleStreamBlock: q, k and v from the first rows of linear1, whose input holds the text
    tokens then the image tokens; only the image tokens are shifted, and only attention is compared."""
    model = flux(seed=1).model.diffusion_model
    block = copy.deepcopy(model.single_blocks[1]).double()
    generator = torch.Generator().manual_seed(3)
    img, txt, vec, pe = block_inputs(model, generator)
    hidden = model.hidden_size
    direction = torch.nn.functional.normalize(torch.randn(hidden, generator=generator, dtype=torch.float64), dim=0)
    seen = {}

    def shifted(t):
        def hook(module, args):
            moved = args[0].clone()
            moved[:, TEXT:] += t * direction
            return (moved,)
        return hook

    def run(t):
        hooks = [block.linear1.register_forward_pre_hook(shifted(t)),
                 block.linear1.register_forward_hook(record(seen, "tokens")),
                 block.linear2.register_forward_hook(record(seen, "attention", first=False))]
        try:
            block(torch.cat([txt, img], dim=1), vec=vec, pe=pe)
        finally:
            for hook in hooks:
                hook.remove()
        return seen["attention"][0, TEXT:, :hidden] @ block.linear2.weight[:, :hidden].T
    measured = finite_difference(run)
    weights = module_weights(block.linear1, block.linear2, block.norm, block.num_heads, 3 * hidden, hidden)
    rotations, tokens = pe[0, 0], seen["tokens"][0]
    context = joint_context(weights, tokens[:TEXT], rotations[:TEXT])
    predicted = shift_jacobian(tokens[TEXT:], weights, rotations[TEXT:], context) @ direction
    error = (predicted - measured).norm() / measured.norm()
    assert error <= 1e-4, error  # measured 1.3e-10


def test_whitened_qk_norm_operator_finds_the_strongest_shifts():
    """With QK-norm, on tokens whose covariance is the identity (no rotary positions, no text), the whitened
    operator's top direction moves the exact per-token responses nearly as much as the best direction can,
    and more than the value path's or any of 1000 random ones (docs/math.md, 'Transformer (DiT) attention')."""
    generator = torch.Generator().manual_seed(7)
    width, heads, tokens = 32, 2, 256

    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64) / shape[-1] ** 0.5
    weights = AttentionWeights(make(width, width), make(width, width), make(width, width), make(width, width), heads,
                               q_norm=1 + 0.5 * torch.rand(16, generator=generator, dtype=torch.float64),
                               k_norm=1 + 0.5 * torch.rand(16, generator=generator, dtype=torch.float64))
    sample = torch.randn(tokens, width, generator=generator, dtype=torch.float64)
    jacobians = shift_jacobian(sample, weights)
    gram = torch.einsum("iod,ioe->de", jacobians, jacobians)
    optimum = torch.linalg.eigvalsh(gram)[-1]

    def sensitivity(v):
        return v @ gram @ v
    top = attention_directions(weights, 1, "whitened")[0][0]
    value = attention_directions(weights, 1, "value")[0][0]
    randoms = torch.nn.functional.normalize(torch.randn(1000, width, generator=generator, dtype=torch.float64), dim=1)
    assert sensitivity(top) >= 0.9 * optimum
    assert sensitivity(top) > sensitivity(value)
    assert sensitivity(top) > torch.einsum("nd,de,ne->n", randoms, gram, randoms).max()
    apply, _ = shift_operator(weights, "whitened")
    assert apply(torch.eye(width, dtype=torch.float64)).shape == (width, width)


def test_discover_reads_every_flux_attention_site(host, flux):
    """Discover on a tiny Flux: double blocks' image attention and single blocks' attention, the directions of
    the weights as the blocks hold them, for every method."""
    patcher = flux(seed=4)
    model = patcher.model.diffusion_model
    node = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    hidden = model.hidden_size
    expected_weights = {
        "double_blocks.1.img_attn": module_weights(model.double_blocks[1].img_attn.qkv, model.double_blocks[1].img_attn.proj,
                                                   model.double_blocks[1].img_attn.norm, 2, 3 * hidden, hidden),
        "single_blocks.0.attn": module_weights(model.single_blocks[0].linear1, model.single_blocks[0].linear2,
                                               model.single_blocks[0].norm, 2, 3 * hidden, hidden)}
    for method in ("whitened", "value", "qkv-stack"):
        dset, _ = node.discover(patcher, "all", 3, method, 1.0)
        assert list(dset.sites) == ["double_blocks.0.img_attn", "double_blocks.1.img_attn", "single_blocks.0.attn",
                                    "single_blocks.1.attn"]
        assert dset.model["family"] == "Flux"
        for path, weights in expected_weights.items():
            vectors, gains = attention_directions(weights, 3, method)
            # the same function on the same float32 weights: identical up to rounding
            assert torch.allclose(dset.sites[path].vectors, vectors, atol=1e-5)
            assert torch.allclose(dset.sites[path].gains, gains, rtol=1e-5)
    dset, _ = node.discover(patcher, "single", 2, "value", 1.0)
    assert list(dset.sites) == ["single_blocks.0.attn", "single_blocks.1.attn"]
