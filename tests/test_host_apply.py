"""Host layer: Apply Direction and the Asyrp sampler on the tiny UNet through the host's samplers."""
import math

import numpy as np
import pytest
import torch
from directions_testing import (
    FLOAT32_EPS,
    assert_float32_close,
    conditioning,
    orthonormal,
    saved_image,
    saved_images,
)
from graphs import tiny_inputs

from harness.host import NodeFailed
from harness.inversion import schedule
from semantic_directions.directions.directionset import DirectionSet, SiteDirections
from semantic_directions.nodes.host import block_key, made_for

SITE_7 = "input_blocks.7.1.transformer_blocks.0.attn1"
SITE_MID = "middle_block.1.transformer_blocks.0.attn1"


class Kit:
    """The host's pieces a test needs: node instances, the tiny model and directions for it."""

    def __init__(self, host):
        import comfy.sample
        import comfy.samplers

        from harness.test_nodes.unets import build_unet
        self.host, self.build_unet, self.comfy_sample, self.samplers = host, build_unet, comfy.sample, comfy.samplers
        registry = host.nodes.NODE_CLASS_MAPPINGS
        self.apply_node, self.asyrp_node = registry["ApplyDirection"](), registry["AsyrpSampler"]()
        self.model = build_unet("sd15", seed=0)
        discover = registry["DiscoverAttentionEigendirections"]()
        self.directions = discover.discover(self.model, "all", 4, "whitened", 1.0)[0]
        self.hspace = DirectionSet(sites={"h_space": SiteDirections(orthonormal(3, 128, 1))}, method="test",
                                   model=made_for(self.model))

    def apply(self, model=None, directions=None, index=0, layer="all", alpha=0.5, start=0.0, end=1.0,
              apply_to="both", mask=None, alpha_list=""):
        return self.apply_node.apply(model or self.model, directions or self.directions, index, layer, alpha,
                                     start, end, apply_to, mask=mask, alpha_list=alpha_list)[0]

    def sample(self, model, steps=4, cfg=1.0, sampler="euler", batch=1, seed=0):
        latent = {"samples": torch.zeros(batch, 4, 8, 8)}
        return self.host.nodes.common_ksampler(model, seed, steps, cfg, sampler, "normal", conditioning(1),
                                               conditioning(2), latent)[0]["samples"]

    def sample_custom(self, model, sampler, sigmas, cfg=1.0, seed=0, batch=1):
        noise = torch.randn(batch, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
        return self.comfy_sample.sample_custom(model, noise, cfg, sampler, sigmas, conditioning(1), conditioning(2),
                                               torch.zeros(batch, 4, 8, 8), seed=seed)

    def sigmas(self, model, steps):
        return schedule(model, "normal", steps)


@pytest.fixture(scope="module")
def kit(host):
    return Kit(host)


class Recorder:
    """Host attn1/output-block patches placed before and after the edit, recording what it changed."""

    def __init__(self, kit):
        self.from_block = {block_key(path): path for path in kit.directions.sites}
        self.before, self.events = {}, []

    def __deepcopy__(self, memo):  # host clones copy model_options; the recorder must stay one object
        return self

    def wrap(self, model, edit):
        first = model.clone()
        first.set_model_attn1_patch(self.attn_before)
        first.set_model_output_block_patch(self.hspace_before)
        patched = edit(first)
        patched.set_model_attn1_patch(self.attn_after)
        patched.set_model_output_block_patch(self.hspace_after)
        return patched

    def attn_before(self, n, c, v, options):
        self.before[("attn", options["block"], options.get("block_index", 0))] = (n, c)
        return n, c, v

    def attn_after(self, n, c, v, options):
        original, original_context = self.before[("attn", options["block"], options.get("block_index", 0))]
        self._record(self.from_block[(*options["block"], options.get("block_index", 0))], original, n, options)
        assert torch.equal(c - original_context, n - original)  # the keys' and values' input moved alike
        return n, c, v

    def hspace_before(self, h, hsp, options):
        self.before["h"] = h
        return h, hsp

    def hspace_after(self, h, hsp, options):
        if options["block"] == ("output", 0):
            self._record("h_space", self.before["h"], h, options)
        return h, hsp

    def _record(self, site, before, after, options):
        changed = (after != before).flatten(1).any(dim=1)
        self.events.append({"site": site, "sigma": float(options["sigmas"][0]), "changed": changed.tolist(),
                            "cond_or_uncond": list(options["cond_or_uncond"]), "delta": (after - before)})


def between_steps(kit, steps):
    """(start, end) percents whose sigma range lies strictly between the schedule's first two steps."""
    sigmas = kit.sigmas(kit.model, steps)
    sampling = kit.model.get_model_object("model_sampling")
    inside = [p / 1000 for p in range(1001) if sigmas[1] < sampling.percent_to_sigma(p / 1000) < sigmas[0]]
    return inside[0], inside[-1]


def test_alpha_zero_or_a_range_with_no_step_is_bit_identical(kit):
    """Bit-identical is safe here: both sides run the same kernels on the same shapes in this process."""
    reference = kit.sample(kit.model, steps=4, cfg=3.0)
    assert torch.equal(kit.sample(kit.apply(alpha=0.0), steps=4, cfg=3.0), reference)
    start, end = between_steps(kit, 4)
    assert torch.equal(kit.sample(kit.apply(alpha=3.0, start=start, end=end), steps=4, cfg=3.0), reference)
    assert not torch.equal(kit.sample(kit.apply(alpha=0.5), steps=4, cfg=3.0), reference)


def test_edit_fires_only_on_named_layers_and_steps_inside_the_range(kit):
    recorder = Recorder(kit)
    start, end = 0.3, 0.6
    patched = recorder.wrap(kit.model,
                            lambda m: kit.apply(m, layer="input_blocks.7, middle_block", start=start, end=end))
    kit.sample(patched, steps=8, cfg=2.0)
    sampling = kit.model.get_model_object("model_sampling")
    high, low = sampling.percent_to_sigma(start), sampling.percent_to_sigma(end)
    schedule = [float(s) for s in kit.sigmas(kit.model, 8)[:-1]]
    in_range = [s for s in schedule if low <= s <= high]
    assert 0 < len(in_range) < len(schedule)
    fired = {(e["site"], round(e["sigma"], 4)) for e in recorder.events if any(e["changed"])}
    assert fired == {(site, round(s, 4)) for site in (SITE_7, SITE_MID) for s in in_range}
    assert all(all(e["changed"]) for e in recorder.events if any(e["changed"]))  # cond and uncond rows
    visits = [e["site"] for e in recorder.events]
    assert len(visits) == 17 * 8 and visits.count("h_space") == 8  # every site, every step, one batched call


def test_small_edits_are_linear_and_add(kit):
    """To first order: twice the alpha, twice the change; two edits together, the sum of both."""
    base = kit.sample(kit.model, steps=1)

    def change(model=None, **edit):
        return kit.sample(model or kit.apply(**edit), steps=1) - base

    def nonlinearity(alpha):
        small = change(alpha=alpha)
        return float((change(alpha=2 * alpha) - 2 * small).norm() / (2 * small).norm())
    assert nonlinearity(1e-3) < 0.02
    assert nonlinearity(1e-3) < nonlinearity(1e-2) / 5  # the error is the second-order term
    small = change(alpha=1e-3)
    # what is left of f(a) + f(-a) is the second-order term, twice the nonlinearity above (0.019 when measured)
    assert (change(alpha=-1e-3) + small).norm() / small.norm() < 0.04
    other = change(alpha=1e-3, index=1)
    chained = change(kit.apply(kit.apply(alpha=1e-3), alpha=1e-3, index=1))
    assert (chained - small - other).norm() / (small + other).norm() < 0.02


def test_mask_keeps_tokens_outside_exactly_and_passes_can_be_chosen(kit):
    recorder = Recorder(kit)
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :] = 1.0  # top half of the image
    patched = recorder.wrap(kit.model, lambda m: kit.apply(m, layer="input_blocks.1", mask=mask, apply_to="cond"))
    kit.sample(patched, steps=2, cfg=2.0)
    events = [e for e in recorder.events if e["site"] == "input_blocks.1.1.transformer_blocks.0.attn1"]
    assert events
    for event in events:
        rows = [code == 0 for code in event["cond_or_uncond"]]
        assert event["changed"] == rows
        grid = event["delta"][rows.index(True)].reshape(8, 8, -1)
        assert (grid[4:] == 0).all() and (grid[:4].abs().sum(-1) > 0).all()


def test_sweep_renders_one_alpha_per_image(kit):
    recorder = Recorder(kit)
    patched = recorder.wrap(kit.model, lambda m: kit.apply(m, layer="input_blocks.1", alpha_list="0, 0.5, -0.5"))
    kit.sample(patched, steps=1, batch=3)
    event = next(e for e in recorder.events if e["site"].startswith("input_blocks.1."))
    assert event["changed"] == [False, True, True]
    direction = kit.directions.sites[event["site"]].vectors[0]
    per_image = event["delta"].mean(dim=1)
    # each delta rounds at its tokens' scale, a few times its norm: errors near 1e-7 (measured: 9e-8)
    assert torch.allclose(per_image[1] / per_image[1].norm(), direction, atol=1e-5)
    assert torch.allclose(per_image[2] / per_image[2].norm(), -direction, atol=1e-5)
    with pytest.raises(ValueError, match="alpha_list: 3 values for a latent batch of 2 images"):
        kit.sample(kit.apply(alpha_list="0, 0.5, -0.5"), steps=1, batch=2)


def test_hspace_edit_changes_only_the_middle_output(kit):
    recorder = Recorder(kit)
    patched = recorder.wrap(kit.model, lambda m: kit.apply(m, directions=kit.hspace, alpha=0.3))
    kit.sample(patched, steps=2)
    fired = {e["site"] for e in recorder.events if any(e["changed"])}
    assert fired == {"h_space"}
    delta = next(e for e in recorder.events if e["site"] == "h_space")["delta"][0]  # [C, H, W]
    # the delta is 0.3 times h's norm and rounds at h's scale: errors near 4e-7 at most (measured: 2e-8)
    mean = delta.mean(dim=(1, 2))
    assert torch.allclose(mean / mean.norm(), kit.hspace.sites["h_space"].vectors[0], atol=1e-5)


def test_clone_isolation_fp16_and_lora_models(kit):
    before = kit.sample(kit.model, steps=3, cfg=2.0)
    assert not torch.equal(kit.sample(kit.apply(alpha=1.0), steps=3, cfg=2.0), before)
    assert torch.equal(kit.sample(kit.model, steps=3, cfg=2.0), before)
    assert not kit.model.model_options["transformer_options"].get("patches")
    half = kit.build_unet("sd15", seed=0, dtype=torch.float16)
    edited = kit.sample(kit.apply(half, alpha=0.5), steps=2)
    assert torch.isfinite(edited).all() and not torch.equal(edited, kit.sample(half, steps=2))
    key = f"diffusion_model.{SITE_7}.to_q.weight"
    lora = kit.model.clone()
    lora.add_patches({key: (0.1 * torch.ones_like(kit.model.model.state_dict()[key]),)})
    lora_plain = kit.sample(lora, steps=2)
    assert torch.equal(kit.sample(kit.apply(lora, alpha=0.0), steps=2), lora_plain)
    assert not torch.equal(kit.sample(kit.apply(lora, alpha=0.5), steps=2), lora_plain)


@pytest.mark.parametrize("change, message", [
    (dict(directions="sdxl"), r"directions: made for SDXL but this model is SD15; use directions discovered"),
    (dict(directions="wide"), r"directions: input_blocks\.4\.1\.transformer_blocks\.0\.attn1 has width 64 "
                              r"in this SD15 model but 640 in the set"),
    (dict(directions="missing"), r"directions: input_blocks\.4\.1\.transformer_blocks\.1\.attn1 does not exist "
                                 r"in this SD15 model"),
    (dict(directions="other widths"), r"directions: made for a SD15 model with other layer widths than this one"),
    (dict(index=4), r"index: 4 is out of range; this set has 4 directions per site \(0 to 3\)"),
    (dict(alpha=math.nan), "alpha: nan is not a finite number"),
    (dict(start=0.7, end=0.2), r"start_percent \(0.7\) is after end_percent \(0.2\)"),
    (dict(alpha_list="1, two"), "alpha_list: 'two' is not a number"),
    (dict(layer="output_blocks.1"), "layer: 'output_blocks.1' names none of the layers here"),
])
def test_bad_inputs_get_one_line_errors(kit, change, message):
    foreign = {"sdxl": ("input_blocks.4.1.transformer_blocks.0.attn1", 640, "SDXL"),
               "wide": ("input_blocks.4.1.transformer_blocks.0.attn1", 640, "SD15"),
               "missing": ("input_blocks.4.1.transformer_blocks.1.attn1", 64, "SD15"),
               "other widths": ("input_blocks.4.1.transformer_blocks.0.attn1", 64, "SD15")}
    if "directions" in change:
        site, width, family = foreign[change["directions"]]
        change["directions"] = DirectionSet(sites={site: SiteDirections(orthonormal(2, width, 0))}, method="test",
                                            model={"family": family, "fingerprint": "0123456789abcdef"})
    with pytest.raises(ValueError, match=message) as err:
        kit.apply(**change)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("shape", [(64, 64), (1, 64, 64), (1, 1, 64, 64), (1, 64, 64, 1)])
def test_mask_layouts_are_accepted(kit, shape):
    """Every MASK layout the host produces reads as the same top-half mask."""
    def top_half(layout):
        mask = torch.zeros(64, 64)
        mask[:32] = 1.0
        return mask.reshape(layout)
    edited = kit.sample(kit.apply(mask=top_half(shape), alpha=1.0), steps=1)
    assert torch.equal(edited, kit.sample(kit.apply(mask=top_half((1, 64, 64)), alpha=1.0), steps=1))
    assert not torch.equal(edited, kit.sample(kit.model, steps=1))


def test_mask_batch_must_fit(kit):
    with pytest.raises(ValueError, match=r"mask: expected a MASK of shape \[H, W\] or \[batch, H, W\]"):
        kit.apply(mask=torch.ones(2, 3, 64, 64))
    with pytest.raises(ValueError, match="mask: 2 masks but alpha_list has 3 values"):
        kit.apply(mask=torch.ones(2, 64, 64), alpha_list="0, 1, 2")
    with pytest.raises(ValueError, match="mask: 2 masks for a latent batch of 3 images"):
        kit.sample(kit.apply(mask=torch.ones(2, 64, 64)), steps=1, batch=3)


def test_asyrp_with_the_edit_off_is_the_hosts_ddim(kit):
    sampler = kit.asyrp_node.get_sampler(0.0, 1.0)[0]
    sigmas = kit.sigmas(kit.model, 5)
    ddim = kit.samplers.sampler_object("ddim")
    start, end = between_steps(kit, 5)
    for model in (kit.model, kit.apply(alpha=0.0), kit.apply(alpha=1.0, start=start, end=end)):
        assert torch.equal(kit.sample_custom(model, sampler, sigmas, cfg=2.0),
                           kit.sample_custom(kit.model, ddim, sigmas, cfg=2.0))


def test_asyrp_step_is_the_design_formula_in_one_batched_call(kit):
    edited_model = kit.apply(directions=kit.hspace, alpha=0.5)
    sigmas = kit.sigmas(kit.model, 4)[:2]
    calls = []
    hook = kit.model.model.diffusion_model.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    try:
        stepped = kit.sample_custom(edited_model, kit.asyrp_node.get_sampler(0.0, 1.0)[0], sigmas, cfg=2.0)
    finally:
        hook.remove()
    assert calls == [4]  # one UNet call: (edited, unedited) x (cond, uncond) for one image
    euler = kit.samplers.sampler_object("euler")
    to_zero = torch.tensor([float(sigmas[0]), 0.0])
    x0_edited = kit.sample_custom(edited_model, euler, to_zero, cfg=2.0)
    x0_original = kit.sample_custom(kit.model, euler, to_zero, cfg=2.0)
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    x = kit.model.model.process_latent_out(noise * (1 + sigmas[0] ** 2) ** 0.5)  # on the outputs' scale
    expected = x0_edited + sigmas[1] * (x - x0_original) / sigmas[0]
    assert_float32_close(stepped, expected)
    unedited = kit.sample_custom(kit.model, euler, sigmas, cfg=2.0)
    assert (stepped - unedited).abs().max() > 1e3 * FLOAT32_EPS * expected.abs().max()


def test_asyrp_boost_adds_seeded_noise_late(kit):
    sigmas = kit.sigmas(kit.model, 6)
    plain = kit.sample_custom(kit.model, kit.asyrp_node.get_sampler(0.0, 0.5)[0], sigmas)
    boosted = kit.sample_custom(kit.model, kit.asyrp_node.get_sampler(1.0, 0.5)[0], sigmas)
    again = kit.sample_custom(kit.model, kit.asyrp_node.get_sampler(1.0, 0.5)[0], sigmas)
    assert not torch.equal(plain, boosted) and torch.equal(boosted, again)


def test_graph_discover_apply_sample_decode_save(host):
    outputs = host.run({
        **tiny_inputs(batch=3),
        "v": {"class_type": "TinyVAELoader", "inputs": {"seed": 0}},
        "d": {"class_type": "DiscoverAttentionEigendirections", "inputs": {
            "model": ["m", 0], "layers": "input", "count": 3, "method": "whitened", "token_variance": 1.0}},
        "a": {"class_type": "ApplyDirection", "inputs": {
            "model": ["m", 0], "directions": ["d", 0], "index": 0, "layer": "all", "alpha": 0.5,
            "start_percent": 0.0, "end_percent": 0.6, "apply_to": "both", "alpha_list": "-0.5, 0, 0.5"}},
        "k": {"class_type": "KSampler", "inputs": {
            "model": ["a", 0], "seed": 0, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["v", 0]}},
        "g": {"class_type": "LabelledImageGrid",
              "inputs": {"images": ["dec", 0], "labels": "-0.5, 0, 0.5", "columns": 0}},
        "save": {"class_type": "SaveImage", "inputs": {"images": ["g", 0], "filename_prefix": "sweep"}},
        "edited": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": "sweep_edited"}},
        "k0": {"class_type": "KSampler", "inputs": {
            "model": ["m", 0], "seed": 0, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "normal",
            "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "dec0": {"class_type": "VAEDecode", "inputs": {"samples": ["k0", 0], "vae": ["v", 0]}},
        "plain": {"class_type": "SaveImage", "inputs": {"images": ["dec0", 0], "filename_prefix": "sweep_plain"}},
    }, cached=False)
    grid = saved_image(host, outputs, "save")
    assert grid.shape[1] == 3 * 64  # the three images in one row, labels above
    edited, plain = saved_images(host, outputs, "edited"), saved_images(host, outputs, "plain")
    # the same batch noise: image 1 (alpha 0) is the unedited image 1; the other two moved
    assert len(edited) == len(plain) == 3 and np.array_equal(edited[1], plain[1])
    assert np.abs(edited[0] - plain[0]).max() > 2 and np.abs(edited[2] - plain[2]).max() > 2


def test_graph_errors_reach_the_user_in_one_line(host):
    with pytest.raises(NodeFailed, match="start_percent") as err:
        host.run({
            "m": {"class_type": "TinyUNetLoader", "inputs": {"family": "sd15", "model_channels": 32, "seed": 0}},
            "d": {"class_type": "DiscoverAttentionEigendirections", "inputs": {
                "model": ["m", 0], "layers": "middle", "count": 2, "method": "value", "token_variance": 1.0}},
            "a": {"class_type": "ApplyDirection", "inputs": {
                "model": ["m", 0], "directions": ["d", 0], "index": 0, "layer": "all", "alpha": 0.5,
                "start_percent": 0.9, "end_percent": 0.1, "apply_to": "both"}},
            "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
            "pos": {"class_type": "TinyConditioning", "inputs": {"seed": 1, "context_dim": 32, "tokens": 77}},
            "k": {"class_type": "KSampler", "inputs": {
                "model": ["a", 0], "seed": 0, "steps": 1, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
                "positive": ["pos", 0], "negative": ["pos", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
            "save": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "x"}},
        }, cached=False)
    assert "\n" not in err.value.message.strip()


def test_directions_fit_a_fine_tune_of_the_same_base(kit):
    """Same family and widths, other weights (a fine-tune): the set applies; the fingerprint matches."""
    fine_tune = kit.build_unet("sd15", seed=7)
    assert made_for(fine_tune) == made_for(kit.model)
    edited = kit.sample(kit.apply(fine_tune, alpha=0.5), steps=2)
    assert not torch.equal(edited, kit.sample(fine_tune, steps=2))


def test_hspace_edit_without_asyrp_warns_once(kit, caplog):
    from semantic_directions.nodes import host
    host.WARNED.discard("h-space without Asyrp")
    edited = kit.apply(directions=kit.hspace, alpha=0.5)
    sigmas = kit.sigmas(kit.model, 2)
    with caplog.at_level("WARNING"):
        kit.sample_custom(edited, kit.asyrp_node.get_sampler(0.0, 1.0)[0], sigmas)
        assert "Asyrp Sampler" not in caplog.text
        kit.sample(edited, steps=2)
        kit.sample(edited, steps=2)
    assert caplog.text.count("an h-space edit is sampled without the Asyrp Sampler") == 1
