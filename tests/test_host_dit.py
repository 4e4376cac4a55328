"""Transformer (DiT) families on the real host: Flux's attention math against the host's own blocks, Discover
and Apply Direction on a tiny Flux built from the host's classes."""
import contextlib
import copy
import re

import pytest
import torch
from directions_testing import (
    assert_float32_close,
    assert_pair_is_mean_difference,
    assert_reverse_products_transpose_forward_ones,
    denoised_once,
    fused_copy,
    jacobian_solved,
)

from harness.inversion import schedule
from semantic_directions.directions.attention import (
    AttentionWeights,
    attention_directions,
    shift_jacobian,
    shift_operator,
)

TEXT, GRID = 5, (3, 4)  # text tokens, image token grid
FD_ERROR = 1e-7  # float64 central differences at step 1e-4: truncation near step^2 = 1e-8, rounding near 1e-12


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


def joint_context(weights: AttentionWeights, tokens, rotations=None):
    """(keys, values) [heads, M, e] of unshifted tokens as the scores see them: projected, normed, rotated."""
    heads = weights.heads

    def per_head(w, b):
        out = tokens @ w.T + (0 if b is None else b)
        return out.reshape(tokens.shape[0], heads, -1).transpose(0, 1)
    keys = per_head(weights.k, weights.k_bias)
    keys = weights.k_norm * keys * torch.rsqrt(keys.pow(2).mean(-1, keepdim=True) + weights.norm_eps)
    if rotations is not None:
        paired = keys.reshape(*keys.shape[:-1], -1, 2)
        keys = torch.einsum("nprc,hnpc->hnpr", rotations, paired).reshape(keys.shape)
    return keys, per_head(weights.v, weights.v_bias)


def module_weights(linear, out, norms, heads, rows, columns) -> AttentionWeights:
    """A site's weights straight from the block's modules; ``norms``: the q and k RMS norms' gain tensors."""
    q, k, v = linear.weight[:rows].detach().chunk(3)
    q_bias, k_bias, v_bias = linear.bias[:rows].detach().chunk(3)
    return AttentionWeights(q, k, v, out.weight[:, :columns].detach(), heads, q_norm=norms[0].detach(),
                            k_norm=norms[1].detach(), q_bias=q_bias, k_bias=k_bias, v_bias=v_bias)


def flux_norms(qk_norm):
    return qk_norm.query_norm.scale, qk_norm.key_norm.scale


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
    direction = torch.nn.functional.normalize(
        torch.randn(model.hidden_size, generator=generator, dtype=torch.float64), dim=0)
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
    weights = module_weights(block.img_attn.qkv, block.img_attn.proj, flux_norms(block.img_attn.norm), block.num_heads,
                             3 * model.hidden_size, model.hidden_size)
    text_weights = module_weights(block.txt_attn.qkv, block.txt_attn.proj, flux_norms(block.txt_attn.norm),
                                  block.num_heads,
                                  3 * model.hidden_size, model.hidden_size)
    rotations = pe[0, 0]
    context = joint_context(text_weights, seen["text"][0], rotations[:TEXT])
    predicted = shift_jacobian(seen["tokens"][0], weights, rotations[TEXT:], context) @ direction
    error = (predicted - measured).norm() / measured.norm()
    assert error <= FD_ERROR, error  # measured 2.2e-10


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
    weights = module_weights(block.linear1, block.linear2, flux_norms(block.norm), block.num_heads, 3 * hidden, hidden)
    rotations, tokens = pe[0, 0], seen["tokens"][0]
    context = joint_context(weights, tokens[:TEXT], rotations[:TEXT])
    predicted = shift_jacobian(tokens[TEXT:], weights, rotations[TEXT:], context) @ direction
    error = (predicted - measured).norm() / measured.norm()
    assert error <= FD_ERROR, error  # measured 1.3e-10


def test_exact_response_matches_the_hosts_sd3_joint_block(host):
    """The same for SD3.5's joint block (the host's _block_mixing): the image stream's attention with RMS-normed q
    and k, no rotary positions, the context block's tokens (their own weights) as unshifted context."""
    from comfy.ldm.modules.diffusionmodules import mmdit

    from harness.test_nodes.dits import build_dit
    model = build_dit("sd3", seed=1).model.diffusion_model
    block = copy.deepcopy(model.joint_blocks[0]).double()
    attention, text_attention = block.x_block.attn, block.context_block.attn
    width = attention.qkv.weight.shape[1]
    generator = torch.Generator().manual_seed(5)
    x, context, c = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                     for shape in ((1, GRID[0] * GRID[1], width), (1, TEXT, width), (1, width)))
    direction = torch.nn.functional.normalize(torch.randn(width, generator=generator, dtype=torch.float64), dim=0)
    seen = {}

    def run(t):
        hooks = [attention.qkv.register_forward_pre_hook(lambda m, a: (a[0] + t * direction,)),
                 attention.qkv.register_forward_hook(record(seen, "tokens")),
                 text_attention.qkv.register_forward_hook(record(seen, "text")),
                 attention.proj.register_forward_hook(record(seen, "attention", first=False))]
        try:
            mmdit._block_mixing(context.clone(), x.clone(), block.context_block, block.x_block, c)
        finally:
            for hook in hooks:
                hook.remove()
        return seen["attention"][0] @ attention.proj.weight.T
    measured = finite_difference(run)

    def weights_of(module):
        return module_weights(module.qkv, module.proj, (module.ln_q.weight, module.ln_k.weight), module.num_heads,
                              3 * width, width)
    predicted = shift_jacobian(seen["tokens"][0], weights_of(attention), None,
                               joint_context(weights_of(text_attention), seen["text"][0])) @ direction
    error = (predicted - measured).norm() / measured.norm()
    assert error <= FD_ERROR, error  # measured 6e-11 (SD3.5), 7e-11 (Qwen-Image)


def test_exact_response_matches_the_hosts_qwen_image_block(host):
    """The same for Qwen-Image's block: q, k and v from separate linears (to_q, to_k, to_v) with biases, RMS-normed
    q and k, rotary positions on the text and image tokens (text first, at positions of their own), the text
    stream's projections as unshifted context. The pack reads the same weights from the patcher."""
    from harness.test_nodes.dits import build_dit
    from semantic_directions.nodes import host as host_layer
    patcher = build_dit("qwen", seed=1)
    model = patcher.model.diffusion_model
    block = copy.deepcopy(model.transformer_blocks[1]).double()
    attention = block.attn
    width = attention.to_q.weight.shape[1]
    generator = torch.Generator().manual_seed(7)
    img, txt, temb = (torch.randn(*shape, generator=generator, dtype=torch.float64)
                      for shape in ((1, GRID[0] * GRID[1], width), (1, TEXT, width), (1, width)))
    rows, columns = torch.meshgrid(torch.arange(GRID[0]), torch.arange(GRID[1]), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(1, -1, 3)
    txt_ids = torch.arange(2, 2 + TEXT).reshape(1, -1, 1).repeat(1, 1, 3)  # as the host numbers them: past the grid
    pe = model.pe_embedder(torch.cat([txt_ids, img_ids], dim=1).float()).double()
    direction = torch.nn.functional.normalize(torch.randn(width, generator=generator, dtype=torch.float64), dim=0)
    seen = {}

    def shifted(t):
        def hook(module, args, kwargs):
            return args, {**kwargs, "hidden_states": kwargs["hidden_states"] + t * direction}
        return hook

    def run(t):
        hooks = [attention.register_forward_pre_hook(shifted(t), with_kwargs=True),
                 attention.to_q.register_forward_hook(record(seen, "tokens")),
                 attention.add_k_proj.register_forward_hook(record(seen, "text")),
                 attention.to_out[0].register_forward_hook(record(seen, "out", "output", first=False))]
        try:
            block(hidden_states=img.clone(), encoder_hidden_states=txt.clone(), encoder_hidden_states_mask=None,
                  temb=temb, image_rotary_emb=pe)
        finally:
            for hook in hooks:
                hook.remove()
        return seen["out"][0]
    measured = finite_difference(run)

    def weights_of(q, k, v, out, norms):
        return AttentionWeights(q.weight.detach(), k.weight.detach(), v.weight.detach(), out.weight.detach(),
                                attention.heads, q_norm=norms[0].weight.detach(), k_norm=norms[1].weight.detach(),
                                q_bias=q.bias.detach(), k_bias=k.bias.detach(), v_bias=v.bias.detach(),
                                norm_eps=norms[0].eps)
    image = weights_of(attention.to_q, attention.to_k, attention.to_v, attention.to_out[0],
                       (attention.norm_q, attention.norm_k))
    text = weights_of(attention.add_q_proj, attention.add_k_proj, attention.add_v_proj, attention.to_add_out,
                      (attention.norm_added_q, attention.norm_added_k))
    rotations = pe[0, 0]
    context = joint_context(text, seen["text"][0], rotations[:TEXT])
    predicted = shift_jacobian(seen["tokens"][0], image, rotations[TEXT:], context) @ direction
    error = (predicted - measured).norm() / measured.norm()
    print(f"qwen-image block: exact response vs central differences {float(error):.1e}")
    assert error <= FD_ERROR, error  # measured 6e-11 (SD3.5), 7e-11 (Qwen-Image)
    read = host_layer.attention_sites(patcher)["transformer_blocks.1.attn"].read(
        patcher.get_key_patches("diffusion_model."), torch.device("cpu"))
    for name in ("q", "k", "v", "out", "q_norm", "k_norm", "q_bias", "k_bias", "v_bias"):
        assert torch.equal(getattr(read, name).double(), getattr(image, name)), name
    assert (read.heads, read.norm_eps) == (image.heads, image.norm_eps)


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
        "double_blocks.1.img_attn": module_weights(
            model.double_blocks[1].img_attn.qkv, model.double_blocks[1].img_attn.proj,
            flux_norms(model.double_blocks[1].img_attn.norm), 2, 3 * hidden, hidden),
        "single_blocks.0.attn": module_weights(model.single_blocks[0].linear1, model.single_blocks[0].linear2,
                                               flux_norms(model.single_blocks[0].norm), 2, 3 * hidden, hidden)}
    for method in ("whitened", "value", "qkv-stack"):
        dset, _ = node.discover(patcher, "all", 3, method, 1.0)
        assert list(dset.sites) == ["double_blocks.0.img_attn", "double_blocks.1.img_attn", "single_blocks.0.attn",
                                    "single_blocks.1.attn"]
        assert dset.model["family"] == "Flux"
        for path, weights in expected_weights.items():
            vectors, gains = attention_directions(weights, 3, method)
            # the same function on the same float32 weights: identical
            assert torch.equal(dset.sites[path].vectors, vectors)
            assert torch.allclose(dset.sites[path].gains, gains, rtol=1e-5)
    dset, _ = node.discover(patcher, "single", 2, "value", 1.0)
    assert list(dset.sites) == ["single_blocks.0.attn", "single_blocks.1.attn"]
    _, spectrum = node.discover(patcher, "all", 2, "value", 1.0)
    colours = set(map(tuple, (spectrum[0] * 255).round().int().reshape(-1, 3).tolist()))
    # the spectrum's lines and legend in the double and single blocks' colours, not the UNet groups'
    assert {(170, 60, 200), (30, 170, 170)} <= colours and not {(52, 110, 235), (40, 170, 80)} & colours


class FluxKit:
    """A tiny model of one Flux-like family, directions discovered on it, and sampling through the host's KSampler
    path; its latent is GRID tokens (times the patch size) of the family's channels."""

    def __init__(self, host, family):
        from harness.test_nodes.dits import build_dit
        self.host, self.family = host, family
        self.build = lambda **options: build_dit(family, **options)
        registry = host.nodes.NODE_CLASS_MAPPINGS
        self.apply_node = registry["ApplyDirection"]()
        self.model = self.build(seed=5)
        self.sites = SITES[family]
        linears = {path: rows for site in host_layer().dit.sites(self.model).values() for path, rows in site.linears}
        self.rows = {linear: linears[linear] for _, linear, _ in self.sites}  # the rows each tested linear moves
        patch, latent_format = self.model.model.diffusion_model.patch_size, self.model.get_model_object("latent_format")
        frames = (1,) if getattr(latent_format, "latent_dimensions", 2) == 3 else ()  # Qwen-Image's video latents
        self.latent_shape = (latent_format.latent_channels, *frames, patch * GRID[0], patch * GRID[1])
        discover = registry["DiscoverAttentionEigendirections"]()
        self.directions = discover.discover(self.model, "all", 2, "whitened", 1.0)[0]

    def apply(self, model=None, layer="all", alpha=0.5, start=0.0, end=1.0, mask=None, alpha_list="", apply_to="both"):
        return self.apply_node.apply(model or self.model, self.directions, 0, layer, alpha, start, end, apply_to,
                                     mask=mask, alpha_list=alpha_list)[0]

    def sample(self, model, steps=4, batch=1, cfg=1.0):
        latent = {"samples": torch.zeros(batch, *self.latent_shape)}
        return self.host.nodes.common_ksampler(model, 0, steps, cfg, "euler", "simple", text(1), text(2),
                                               latent)[0]["samples"]

    def sigmas(self, steps):
        return schedule(self.model, "simple", steps)


def text(seed):
    """Seeded stand-ins for Flux's T5 tokens and CLIP pooled vector, at the tiny Flux's widths."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(1, TEXT, 32, generator=generator), {"pooled_output": torch.randn(1, 16, generator=generator)}]]


FLUX_SITES = [("double_blocks.1.img_attn", "double_blocks.1.img_attn.qkv", False),
              ("single_blocks.0.attn", "single_blocks.0.linear1", True)]
# (site, its linear, whether the linear's input is joint: text tokens first) for each family's tests
SITES = {"flux": FLUX_SITES, "flux2": FLUX_SITES, "chroma": FLUX_SITES,
         "sd3": [("joint_blocks.1.x_block.attn", "joint_blocks.1.x_block.attn.qkv", False),
                 ("joint_blocks.0.x_block.attn2", "joint_blocks.0.x_block.attn2.qkv", False)],
         "qwen": [("transformer_blocks.1.attn", "transformer_blocks.1.attn.to_k", False),
                  ("transformer_blocks.0.attn", "transformer_blocks.0.attn.to_v", False)]}


@pytest.fixture(scope="module", params=["flux", "flux2", "chroma", "sd3", "qwen"])
def flux_kit(host, request):
    return FluxKit(host, request.param)


def linear_of(module, x):
    """The host's linear on ``x`` in float64, from its weight and bias (if it has one)."""
    out = x.double() @ module.weight.detach().double().T
    return out if module.bias is None else out + module.bias.detach().double()


class Recording:
    """A model-call wrapper put on a clone after the edits, at the same level as theirs, so that inside each model
    call it hooks the module at ``path`` after the edits' hooks: every call's (input, output) as the model used
    them. The edits' own calls that map a single vector (2-D inputs) are left out."""

    def __init__(self, path, level):
        self.path, self.level, self.calls = path, level, []

    def __deepcopy__(self, memo):
        return self

    def __call__(self, executor, *args, **kwargs):
        def hook(module, inputs, out):
            if inputs[0].ndim == 3:
                self.calls.append((inputs[0].detach().clone(), out.detach().clone()))
        model = executor.class_obj.diffusion_model if self.level == "apply_model" else executor.class_obj
        handle = model.get_submodule(self.path).register_forward_hook(hook)
        try:
            return executor(*args, **kwargs)
        finally:
            handle.remove()


def recorded(patcher, path):
    """(a clone of ``patcher`` that records the module at ``path``, its list of calls, the host's module)."""
    import comfy.patcher_extension
    site = next(s for s in host_layer().dit.sites(patcher).values() if path in dict(s.linears))
    recording, clone = Recording(path, site.call_wrapper), patcher.clone()
    level = {"apply_model": comfy.patcher_extension.WrappersMP.APPLY_MODEL,
             "diffusion_model": comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL}[site.call_wrapper]
    clone.add_wrapper_with_key(level, "test recording", recording)
    return clone, recording.calls, patcher.model.diffusion_model.get_submodule(path)


def host_layer():
    from semantic_directions.nodes import host
    return host


def image_tokens(x, joint):
    """The latent's image tokens in a linear's input: all of them, or after the text tokens in a joint sequence
    (whose length the family sets: Flux.2 pads its text to 512 tokens)."""
    return slice(x.shape[1] - GRID[0] * GRID[1], None) if joint else slice(0, GRID[0] * GRID[1])


@pytest.mark.parametrize("which", [0, 1])
def test_apply_moves_the_attention_input_on_edited_steps_only(flux_kit, which):
    """At a Flux site the q, k and v rows of the linear's output move by exactly the linear image of alpha x rms x n
    (rms over the image's tokens) on steps inside the range, on image tokens only; the MLP rows and text tokens
    never move."""
    steps, alpha = 6, 0.5
    site, linear, joint = flux_kit.sites[which]
    patched, calls, module = recorded(flux_kit.apply(layer=site, alpha=alpha, start=0.3, end=0.7), linear)
    flux_kit.sample(patched, steps=steps)
    assert len(calls) == steps
    sampling = flux_kit.model.get_model_object("model_sampling")
    low, high = sampling.percent_to_sigma(0.7), sampling.percent_to_sigma(0.3)
    direction = flux_kit.directions.sites[site].vectors[0].double()
    weight, qkv_rows = module.weight.detach().double(), flux_kit.rows[linear]
    edited = 0
    for (x, out), sigma in zip(calls, flux_kit.sigmas(steps)[:-1]):
        x, change = x.double(), out.double() - linear_of(module, x)
        image = image_tokens(x, joint)
        expected = torch.zeros_like(change)
        if low <= sigma <= high:
            edited += 1
            rms = x[:, image].pow(2).sum(-1).mean(-1).sqrt()
            expected[:, image, :qkv_rows] = (alpha * rms[:, None, None] * (weight[:qkv_rows] @ direction))
        # float32 products of entries near 1 over a width of 32: errors near 32 float32 eps of the output's size
        assert_float32_close(change, expected, scale=float(out.abs().max()))
    assert 0 < edited < steps


def test_alpha_zero_is_bit_identical_and_weights_never_change(flux_kit):
    """alpha 0 samples exactly as the unpatched model; the edit changes the sample; neither the host's weights
    nor the model it was applied to change (a clone is patched), and chained edits compose."""
    model = flux_kit.model
    before = {name: p.detach().clone() for name, p in model.model.state_dict().items()}
    reference = flux_kit.sample(model)
    assert torch.equal(flux_kit.sample(flux_kit.apply(alpha=0.0)), reference)
    edited = flux_kit.sample(flux_kit.apply(alpha=1.0))
    assert not torch.equal(edited, reference) and torch.isfinite(edited).all()
    first, second = (site for site, _, _ in flux_kit.sites)
    chained = flux_kit.sample(flux_kit.apply(flux_kit.apply(layer=first, alpha=1.0), layer=second, alpha=-0.5))
    assert not torch.equal(chained, edited)
    assert torch.equal(flux_kit.sample(model), reference)
    assert all(torch.equal(p, before[name]) for name, p in model.model.state_dict().items())


def test_mask_and_alpha_list_on_the_patch_grid(flux_kit):
    """A mask restricts the shift to the image tokens it covers (resized to the patch grid); alpha_list gives each
    image of the batch its own strength."""
    site, linear, _ = flux_kit.sites[0]
    mask = torch.zeros(flux_kit.latent_shape[-2] * 8, flux_kit.latent_shape[-1] * 8)
    mask[:, : mask.shape[1] // 2] = 1  # the left half of the image: the left two of four token columns
    patched, calls, module = recorded(flux_kit.apply(layer=site, alpha=0.0, alpha_list="0.5, -1", mask=mask), linear)
    flux_kit.sample(patched, steps=2, batch=2)
    x, out = calls[0]
    change = out.double() - linear_of(module, x)
    change = change.reshape(2, GRID[0], GRID[1], -1)
    assert_float32_close(change[:, :, 2:], torch.zeros(()), scale=float(out.abs().max()))  # outside the mask
    left = change[:, :, :2].flatten(1, 2)
    ratio = left[1].norm(dim=-1) / left[0].norm(dim=-1)  # same direction, strengths -1 and 0.5 over each image's rms
    rms = x.double().pow(2).sum(-1).mean(-1).sqrt()
    assert torch.allclose(ratio, 2 * rms[1] / rms[0] * torch.ones_like(ratio), rtol=1e-4)


def test_lora_and_half_precision_flux(flux_kit):
    """A LoRA on the site's linear: Discover reads the patched weights, and the edit's shift is the image under the
    patched weights (the object patch shares the host's parameters, so the host still patches them by name).
    A float16 Flux samples an edit to finite values."""
    site, linear, joint = flux_kit.sites[-1]
    key = f"diffusion_model.{linear}.weight"
    delta = 0.2 * torch.randn(flux_kit.model.model.state_dict()[key].shape, generator=torch.Generator().manual_seed(9))
    lora = flux_kit.model.clone()
    lora.add_patches({key: (delta,)})
    discover = flux_kit.host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    lora_set = discover.discover(lora, site, 2, "whitened", 1.0)[0]
    assert not torch.allclose(lora_set.sites[site].vectors, flux_kit.directions.sites[site].vectors, atol=1e-3)
    patched, calls, module = recorded(flux_kit.apply(lora, layer=site, alpha=1.0), linear)
    weight = module.weight.detach().double() + delta.double()  # read before the host merges the LoRA while sampling
    flux_kit.sample(patched, steps=2)
    direction = flux_kit.directions.sites[site].vectors[0].double()
    x, out = (t.double() for t in calls[0])
    image, rows = image_tokens(x, joint), flux_kit.rows[linear]
    rms = x[:, image].pow(2).sum(-1).mean(-1).sqrt()
    expected = x @ weight.T + (0 if module.bias is None else module.bias.detach().double())
    expected[:, image, :rows] += rms[:, None, None] * (weight[:rows] @ direction)
    assert_float32_close(out, expected)
    half = flux_kit.build(seed=5, dtype=torch.float16)
    edited = flux_kit.sample(flux_kit.apply(half, alpha=0.5), steps=2)
    assert torch.isfinite(edited).all() and not torch.equal(edited, flux_kit.sample(half, steps=2))


def test_a_kept_vector_image_follows_the_linears_on_the_fly_patches():
    """A shift keeps a vector's image under a linear while the weight the linear computes with is the same: a new
    on-the-fly patch function (the host's lowvram LoRAs, and newer hosts' dynamic loading, which keeps a LoRA as
    weight_lowvram_function) makes it map the vector again."""
    from semantic_directions.nodes.host.dit import ModelCall, OutputShift
    linear, vector, x = torch.nn.Linear(4, 4), torch.ones(4), torch.ones(1, 3, 4)
    shift = OutputShift(ModelCall({"sample_sigmas": torch.ones(2)}, (1, 3), 0), None, 4, {})
    states = [shift.weight_state(linear, vector, x)]
    linear.weight_function = [lambda weight: 2 * weight]
    states.append(shift.weight_state(linear, vector, x))
    linear.weight_lowvram_function = lambda weight: 2 * weight
    states.append(shift.weight_state(linear, vector, x))
    linear.bias_lowvram_function = lambda bias: 2 * bias
    states.append(shift.weight_state(linear, vector, x))
    assert len(set(states)) == 4 and shift.weight_state(linear, vector, x) == states[-1]


def test_bad_weights_and_foreign_sets_are_refused_by_name(flux_kit, host):
    """NaN in a site's weights or an infinite QK-norm gain (here through a LoRA) is a one-line error naming the
    site; a UNet's set on Flux names both families."""
    site, linear, _ = flux_kit.sites[0]
    norm = host_layer().dit.sites(flux_kit.model)[site].q_norm
    state = flux_kit.model.model.state_dict()
    discover = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    for key, value in ((f"{linear}.weight", float("nan")),) + (((norm, float("inf")),) if norm else ()):
        broken = flux_kit.model.clone()
        key = f"diffusion_model.{key}"
        broken.add_patches({key: (torch.full(state[key].shape, value),)})
        with pytest.raises(ValueError, match=f"^model: the attention weights of {re.escape(site)} hold NaN"):
            discover.discover(broken, "all", 2, "whitened", 1.0)
    from harness.test_nodes.unets import build_unet
    unet_set = discover.discover(build_unet("sd15"), "middle", 2, "value", 1.0)[0]
    name = type(flux_kit.model.model).__name__
    with pytest.raises(ValueError, match=f"^directions: made for SD15 but this model is {name}"):
        flux_kit.apply_node.apply(flux_kit.model, unet_set, 0, "all", 0.5, 0.0, 1.0, "both")


def test_ddim_invert_round_trip_on_flux(flux_kit, host):
    """DDIM Invert on a tiny Flux made a denoiser of Gaussian data (its flow schedule starts at sigma 1), with
    guidance-distilled conditioning as FluxGuidance sets it: its NOISE output sampled back with the host's euler
    (SamplerCustom's path) reconstructs the latent; an edit applied while sampling back changes it."""
    import comfy.sample
    import comfy.samplers

    from harness.test_nodes.unets import with_gaussian_prior
    model = with_gaussian_prior(flux_kit.build(seed=6))
    positive = [[text(1)[0][0], {**text(1)[0][1], "guidance": 4.0}]]
    samples = torch.randn(1, *flux_kit.latent_shape, generator=torch.Generator().manual_seed(8))
    invert = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
    _, noise = invert.invert(model, {"samples": samples}, 25, "simple", 1.0, 3, positive)
    sigmas = schedule(model, "simple", 25)
    zeros = torch.zeros_like(samples)

    def sample_back(patcher):
        return comfy.sample.sample_custom(patcher, noise.generate_noise({"samples": zeros}), 1.0,
                                          comfy.samplers.sampler_object("euler"), sigmas, positive, positive, zeros,
                                          seed=0)
    back = sample_back(model)
    error = float((back - samples).norm() / samples.norm())
    assert error < 1e-3  # measured 1.8e-5 at refine 3
    directions = flux_kit.directions
    edited = sample_back(flux_kit.apply_node.apply(model, directions, 0, "all", 1.0, 0.0, 1.0, "both")[0])
    assert float((edited - back).norm() / back.norm()) > 1e-3


def test_recording_nodes_sample_inverted_latents_back(flux_kit, host):
    """Directions From Samples (and so the pair nodes) with add_noise disabled start at the latent itself, as on
    UNets: from DDIM Invert's latent they sample the images back, though a flow schedule starts at sigma 1, where
    the host's own start, (1 - sigma) x latent, is zeros."""
    from harness.test_nodes.unets import with_gaussian_prior
    model = with_gaussian_prior(flux_kit.build(seed=6))
    positive = [[text(1)[0][0], {**text(1)[0][1], "guidance": 4.0}]]
    images = torch.randn(2, *flux_kit.latent_shape, generator=torch.Generator().manual_seed(8))
    inverted = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]().invert(model, {"samples": images}, 25, "simple", 1.0,
                                                                      3, positive)[0]
    pca = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromSamples"]()
    _, back = pca.directions(model, positive, positive, inverted, 0, "disable", 25, 1.0, "euler", "simple",
                             flux_kit.sites[0][0], 0.0, 1.0, 1)
    back = back["samples"].reshape(images.shape)
    assert float((back - images).norm() / images.norm()) < 1e-3  # as DDIM Invert's own round trip (1.8e-5)


SAMPLING = {"seed": 3, "add_noise": "enable", "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "simple"}


def recorded_image_tokens(kit, prompt, site, linear, joint):
    """Each sampling call's image tokens at the site's linear input (cfg 1: the conditional rows), averaged over
    positions, and their RMS token norm, by the test's own hook; sampled as the nodes sample."""
    import comfy.sample
    patched, calls, _ = recorded(kit.model, linear)
    samples = torch.zeros(4, *kit.latent_shape)
    noise = comfy.sample.prepare_noise(samples, SAMPLING["seed"])
    comfy.sample.sample(patched, noise, 4, 1.0, "euler", "simple", prompt, text(2), samples, seed=3)
    tokens = [x[:, image_tokens(x, joint)].double() for x, _ in calls]
    return (torch.stack([t.mean(1) for t in tokens]), torch.stack([t.pow(2).sum(-1).mean(-1).sqrt() for t in tokens]))


def test_pair_direction_at_a_transformer_site_is_the_mean_difference(flux_kit, host):
    """Direction From Prompt Pair at a transformer site: the normalised mean difference of the latent's image tokens
    at the site's input, recorded independently, and its size in the tokens' RMS units; Apply takes it."""
    site, linear, joint = flux_kit.sites[-1]
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionFromPromptPair"]()
    latent = {"samples": torch.zeros(4, *flux_kit.latent_shape)}
    dset = node.direction(flux_kit.model, text(1), text(7), text(2), latent, **SAMPLING, site=site, start_percent=0.0,
                          end_percent=1.0, source_name="a", target_name="b")[0]
    assert_pair_is_mean_difference(dset.sites[site], *(
        recorded_image_tokens(flux_kit, text(c), site, linear, joint) for c in (1, 7)))
    edited = flux_kit.sample(flux_kit.apply_node.apply(flux_kit.model, dset, 0, "all", 1.0, 0.0, 1.0, "both")[0])
    assert not torch.equal(edited, flux_kit.sample(flux_kit.model))


def test_pca_and_the_jacobian_at_a_transformer_site(flux_kit, host):
    """Directions From Samples returns orthonormal directions at a transformer site; Directions From Image's top
    singular value matches central differences of the denoised prediction under Apply Direction's shift of each
    basis vector (within 1%)."""
    import comfy.sample
    import comfy.samplers

    from semantic_directions.directions.directionset import DirectionSet, SiteDirections
    site = flux_kit.sites[0][0]
    registry = host.nodes.NODE_CLASS_MAPPINGS
    latent = {"samples": torch.zeros(4, *flux_kit.latent_shape)}
    pca = registry["DirectionsFromSamples"]().directions(flux_kit.model, text(1), text(2), latent, **SAMPLING,
                                                          site=site, start_percent=0.0, end_percent=1.0, count=3)[0]
    vectors = pca.sites[site].vectors
    assert torch.allclose(vectors @ vectors.T, torch.eye(3), atol=1e-5)
    image = {"samples": torch.randn(1, *flux_kit.latent_shape, generator=torch.Generator().manual_seed(9))}
    found = registry["DirectionsFromImage"]().directions(flux_kit.model, text(1), text(2), image, 3, 0.3, 1.0, site,
                                                         2)[0].sites[site]
    sigma = float(flux_kit.model.get_model_object("model_sampling").percent_to_sigma(0.3))
    width, step = vectors.shape[1], 1e-3
    basis = DirectionSet(sites={site: SiteDirections(torch.eye(width))}, method="test",
                         model=flux_kit.directions.model)

    start = image["samples"].expand(2, *flux_kit.latent_shape).contiguous()
    noise = comfy.sample.prepare_noise(image["samples"], 3).expand(2, *flux_kit.latent_shape).contiguous()
    columns = []
    for k in range(width):
        shifted = flux_kit.apply_node.apply(flux_kit.model, basis, k, site, 0.0, 0.0, 1.0, "both",
                                            alpha_list=f"{step}, {-step}")[0]
        both = denoised_once(shifted, noise, start, sigma, text(1), text(2), 3)
        columns.append((both[0] - both[1]).flatten().double() / (2 * step))
    values = torch.linalg.svdvals(torch.stack(columns, dim=1).detach())  # this model's weights require grad
    # central differences at step 1e-3 in float32: errors ~1e-4 relative, inside the 1% asked
    assert float(found.gains[0]) == pytest.approx(float(values[0]), rel=1e-2)


@pytest.mark.parametrize("which", [0, 1])
def test_the_jacobians_reverse_products_are_its_forward_ones_transposed_at_transformer_sites(flux_kit, which):
    samples = torch.randn(1, *flux_kit.latent_shape, generator=torch.Generator().manual_seed(9))
    assert_reverse_products_transpose_forward_ones(flux_kit.model, text(1), text(2), samples,
                                                   flux_kit.sites[which][0], cfg=2.0)


def test_the_jacobian_passes_pytorch_attention_called_without_transformer_options(host, monkeypatch):
    """SD3's blocks call the host's attention without the transformer options that carry attention overrides; on
    NVIDIA GPUs that is PyTorch's fused attention, which has no forward-mode rule: the forward products still
    pass it, and equal the reverse ones transposed."""
    import comfy.ldm.modules.attention as attention
    from comfy.ldm.modules.diffusionmodules import mmdit
    kit = FluxKit(host, "sd3")
    monkeypatch.setattr(mmdit, "optimized_attention", attention.attention_pytorch)
    samples = torch.randn(1, *kit.latent_shape, generator=torch.Generator().manual_seed(9))
    assert_reverse_products_transpose_forward_ones(kit.model, text(1), text(2), samples, kit.sites[0][0], cfg=2.0)


def test_the_jacobian_passes_a_hosts_fused_rotary_kernel(host, monkeypatch):
    """ComfyUI 0.38 rotates Flux's queries and keys with a kernel without derivatives (here fused_copy after the
    rotation) unless its training flag (comfy.model_management.in_training) is set. Through it, reverse mode fails
    and forward mode silently drops the tangent (the rotated q and k would look constant): Directions From Image
    sets the flag while it differentiates, so its products are exact (forward equal to reverse transposed), and
    puts it back after."""
    import comfy.model_management
    from comfy.ldm.flux import math as flux_math
    plain = flux_math.apply_rope
    monkeypatch.setattr(comfy.model_management, "in_training", False, raising=False)
    monkeypatch.setattr(flux_math, "apply_rope", lambda q, k, pe: plain(q, k, pe) if comfy.model_management.in_training
                        else tuple(map(fused_copy, plain(q, k, pe))))
    kit = FluxKit(host, "flux")
    site = kit.sites[0][0]
    samples = torch.randn(1, *kit.latent_shape, generator=torch.Generator().manual_seed(9))
    assert_reverse_products_transpose_forward_ones(kit.model, text(1), text(2), samples, site, cfg=2.0)
    assert comfy.model_management.in_training is False

    def forward_products():
        return jacobian_solved(kit.model, text(1), text(2), samples, site, 2.0,
                               lambda apply, apply_t, width: apply(torch.eye(width)[:, :4]), 4)
    exact = forward_products()
    monkeypatch.setattr("semantic_directions.nodes.host.training_kernels", contextlib.nullcontext)
    dropped = forward_products()
    error = float((dropped - exact).norm() / exact.norm())
    print(f"forward products without the training flag: {error:.3f} of their size off")
    assert error > 0.1  # what the flag prevents (measured 0.45)


def test_asyrp_sampler_takes_flux_attention_edits(flux_kit, host):
    """The Asyrp Sampler sees Apply Direction's edits at Flux sites: outside their range it samples as the host's
    ddim; inside it, its asymmetric step differs from a plain step with the same edit."""
    import comfy.sample
    import comfy.samplers
    asyrp = host.nodes.NODE_CLASS_MAPPINGS["AsyrpSampler"]().get_sampler(0.0, 1.0)[0]
    sigmas = schedule(flux_kit.model, "simple", 4)
    noise = torch.randn(1, *flux_kit.latent_shape, generator=torch.Generator().manual_seed(3))
    zeros = torch.zeros_like(noise)

    def run(model, sampler):
        return comfy.sample.sample_custom(model, noise, 1.0, sampler, sigmas, text(1), text(2), zeros, seed=0)
    ddim = comfy.samplers.sampler_object("ddim")
    outside = flux_kit.apply(alpha=1.0, start=1.0, end=1.0)
    assert torch.equal(run(outside, asyrp), run(flux_kit.model, ddim))
    edited = flux_kit.apply(alpha=1.0)
    assert not torch.allclose(run(edited, asyrp), run(edited, ddim), atol=1e-3)


def test_token_variance_on_qk_normed_attention(flux_kit, host):
    """With QK-norm the tokens' scale cancels from the tilt: without biases (Flux.2) any token_variance above 0 gives
    the same directions; 0 is the value path, as on UNets."""
    discover = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    model = flux_kit.model
    site = flux_kit.sites[0][0]
    zero, value = (discover.discover(model, site, 3, method, 1.0 if method == "value" else 0.0)[0]
                   for method in ("whitened", "value"))
    assert torch.allclose(zero.sites[site].vectors, value.sites[site].vectors, atol=1e-5)
    if flux_kit.family == "flux2":
        one, four = (discover.discover(model, site, 3, "whitened", s)[0] for s in (1.0, 4.0))
        assert torch.allclose(one.sites[site].vectors, four.sites[site].vectors, atol=1e-5)


def test_reference_image_tokens_stay_untouched(host):
    """With a reference latent in the conditioning (Flux Kontext's ReferenceLatent), the double block's image input
    holds the latent's tokens and then the reference's: only the latent's move."""
    kit = FluxKit(host, "flux")
    site, linear = "double_blocks.0.img_attn", "double_blocks.0.img_attn.qkv"
    reference = torch.randn(1, *kit.latent_shape, generator=torch.Generator().manual_seed(4))
    conditioning = [[text(1)[0][0], {**text(1)[0][1], "reference_latents": [reference]}]]
    patched, calls, module = recorded(kit.apply(layer=site, alpha=1.0), linear)
    latent = {"samples": torch.zeros(1, *kit.latent_shape)}
    host.nodes.common_ksampler(patched, 0, 2, 1.0, "euler", "simple", conditioning, conditioning, latent)
    x, out = calls[0]
    tokens = GRID[0] * GRID[1]
    assert x.shape[1] == 2 * tokens  # the latent's tokens, then the reference's
    change = out.double() - linear_of(module, x)
    assert change[:, :tokens].abs().max() > 1e-2
    assert_float32_close(change[:, tokens:], torch.zeros(()), scale=float(out.abs().max()))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float8_e4m3fn])
def test_low_precision_transformers_are_dequantized_for_the_math_and_edit(host, dtype):
    """A Flux stored in bfloat16 or fp8 (computed in float32, as the host runs such checkpoints on a CPU): Discover
    finds the directions of the stored weights dequantized, the whole linear1 as well as the cut rows; an edit
    samples to finite values that differ from the unedited ones."""
    kit = FluxKit(host, "flux")
    patcher = kit.build(seed=5, dtype=dtype)
    model = patcher.model.diffusion_model
    assert model.single_blocks[0].linear1.weight.dtype == dtype
    node = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]()
    dset = node.discover(patcher, "single_blocks.0", 3, "whitened", 1.0)[0]
    block, hidden = model.single_blocks[0], model.hidden_size

    def dequantized(linear):
        return torch.nn.Linear(linear.in_features, linear.out_features, dtype=torch.float32).requires_grad_(False)
    linear1, linear2 = dequantized(block.linear1), dequantized(block.linear2)
    for float_linear, stored in ((linear1, block.linear1), (linear2, block.linear2)):
        float_linear.weight.copy_(stored.weight.float())
        float_linear.bias.copy_(stored.bias.float())
    norms = (block.norm.query_norm.scale.float(), block.norm.key_norm.scale.float())
    expected = attention_directions(module_weights(linear1, linear2, norms, 2, 3 * hidden, hidden), 3)
    # the same function on the same float32 values: identical
    assert torch.equal(dset.sites["single_blocks.0.attn"].vectors, expected[0])
    edited = kit.sample(kit.apply_node.apply(patcher, dset, 0, "all", 1.0, 0.0, 1.0, "both")[0], steps=2)
    assert torch.isfinite(edited).all() and not torch.equal(edited, kit.sample(patcher, steps=2))


def test_the_shifts_image_follows_the_weights_it_is_computed_with(host):
    """The edit keeps a direction's image under a linear between calls; when the weight the host computes with
    changes (here in place, as a hook schedule patches it), the shift follows."""
    kit = FluxKit(host, "flux")
    site, linear, joint = kit.sites[0]
    model = kit.build(seed=11)
    patched, calls, module = recorded(kit.apply_node.apply(model, kit.directions, 0, site, 1.0, 0.0, 1.0, "both")[0],
                                      linear)
    direction = kit.directions.sites[site].vectors[0].double()
    for scale in (1.0, 2.0):
        if scale != 1.0:
            with torch.no_grad():
                module.weight.mul_(scale)
        calls.clear()
        kit.sample(patched, steps=2)
        x, out = calls[0]
        image = image_tokens(x, joint)
        rms = x.double()[:, image].pow(2).sum(-1).mean(-1).sqrt()
        expected = linear_of(module, x)
        rows = kit.rows[linear]
        expected[:, image, :rows] += rms[:, None, None] * (module.weight.double()[:rows] @ direction)
        assert_float32_close(out, expected)


def test_edits_sample_in_inference_mode(host):
    """The host executes nodes in inference mode: an edit applied and sampled there (its vectors then inference
    tensors), on a model built outside it and on one built inside it (inference-tensor weights), samples as the
    same edit does outside."""
    kit = FluxKit(host, "flux")
    site = kit.sites[0][0]
    with torch.inference_mode():
        inside_model = kit.build(seed=5)
    outside = kit.sample(kit.apply(alpha=1.0, layer=site))
    for model in (kit.model, inside_model):
        with torch.inference_mode():
            edited = kit.sample(kit.apply_node.apply(model, kit.directions, 0, site, 1.0, 0.0, 1.0, "both")[0])
        assert torch.equal(edited, outside)
