"""Directions from samples and pairs on the tiny UNet, through the host's own sampling."""
import logging

import pytest
import torch
import torch.nn.functional as F
from directions_testing import (
    assert_cancel_stops,
    assert_float32_close,
    assert_pair_is_mean_difference,
    assert_reverse_products_transpose_forward_ones,
    conditioning,
    denoised_once,
    fresh_python,
    fused_copy,
    orthonormal,
    progress_updates,
)

from semantic_directions.directions.directionset import DirectionSet, SiteDirections, describe
from semantic_directions.nodes.host import made_for

SITE_7 = "input_blocks.7.1.transformer_blocks.0.attn1"


def latent(batch):
    return {"samples": torch.zeros(batch, 4, 8, 8)}


SAMPLING = {"seed": 3, "add_noise": "enable", "steps": 4, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal"}


@pytest.fixture(scope="module")
def kit(host):
    from harness.test_nodes.unets import build_unet
    registry = host.nodes.NODE_CLASS_MAPPINGS
    return (build_unet("sd15", seed=0), registry["DirectionsFromSamples"](), registry["DirectionFromPromptPair"](),
            registry["DirectionFromExamplePair"](), registry["ApplyDirection"]())


def pca(node, model, batch=8, site="h_space", count=3, start=0.0, end=1.0, **sampling):
    return node.directions(model, conditioning(1), conditioning(2), latent(batch), **{**SAMPLING, **sampling},
                           site=site, start_percent=start, end_percent=end, count=count)


@pytest.mark.parametrize("site", ["h_space", SITE_7])
def test_pca_recovers_a_direction_planted_in_the_activations(kit, site):
    """Apply Direction adds a different multiple of one vector to each image's tokens at the site: that
    vector is then the activations' main direction of variation."""
    model, pca_node, _, _, apply_node = kit
    planted = orthonormal(1, 128, 5)  # both sites are 128 wide in the tiny SD1.5 UNet
    dset = DirectionSet(sites={site: SiteDirections(planted)}, method="test", model=made_for(model))
    alphas = "-9, -6, -3, 0, 3, 6, 9, 12"
    patched = apply_node.apply(model, dset, 0, "all", 0.0, 0.0, 1.0, "both", alpha_list=alphas)[0]
    found, samples = pca(pca_node, patched, site=site)
    assert samples["samples"].shape == (8, 4, 8, 8)
    vectors = found.sites[site].vectors
    assert abs(float(vectors[0] @ planted[0])) > 0.99  # spread along it: 6.9 RMS token norms
    unplanted = pca(pca_node, model, site=site)[0].sites[site].vectors
    assert abs(float(unplanted[0] @ planted[0])) < 0.5


def test_pca_is_deterministic_for_a_seed_and_records_every_chosen_site(kit):
    model, pca_node, *_ = kit
    first, second = (pca(pca_node, model, site="h_space, input_blocks.7") for _ in range(2))
    assert list(first[0].sites) == [SITE_7, "h_space"]
    for site in first[0].sites:
        assert torch.equal(first[0].sites[site].vectors, second[0].sites[site].vectors)
    other = pca(pca_node, model, site="h_space", seed=4)[0]
    assert not torch.equal(other.sites["h_space"].vectors, first[0].sites["h_space"].vectors)


def test_pca_returns_only_the_directions_its_samples_span_and_says_so(kit, caplog):
    """Two images on 4 steps, centred per step: 4 directions, not the 8 asked; the rest would be arbitrary."""
    model, pca_node, *_ = kit
    with caplog.at_level(logging.WARNING):
        found = pca(pca_node, model, batch=2, count=8)[0].sites["h_space"]
    assert found.count == 4 and bool((found.gains > 0).all())
    assert "2 images on 4 steps span only 4 directions at h_space" in caplog.text


def recorded_independently(model, prompt, site, samples=None):
    """Each sampling call's site tokens, averaged over positions, by a forward hook on the host's own module
    (cfg 1: the conditional rows only), with the RMS token norm; sampled as the node samples: from the seed's
    noise on an empty batch of 4, or (``samples``) from those latents with no noise added."""
    import comfy.sample
    unet = model.model.diffusion_model
    features, norms = [], []

    def keep(tokens):
        features.append(tokens.double().mean(1))
        norms.append(tokens.double().pow(2).sum(-1).mean(-1).sqrt())
    if site == "h_space":
        handle = unet.middle_block[-1].register_forward_hook(lambda m, a, out: keep(out.flatten(2).transpose(1, 2)))
    else:
        handle = unet.get_submodule(site).register_forward_pre_hook(lambda m, args: keep(args[0]))
    try:
        noise = (comfy.sample.prepare_noise(latent(4)["samples"], SAMPLING["seed"]) if samples is None
                 else torch.zeros_like(samples))
        samples = latent(4)["samples"] if samples is None else samples
        comfy.sample.sample(model, noise, 4, 1.0, "euler", "normal", prompt, conditioning(2), samples, seed=3)
    finally:
        handle.remove()
    return torch.stack(features), torch.stack(norms)


@pytest.mark.parametrize("site", ["h_space", SITE_7])
def test_the_prompt_pair_direction_is_the_mean_difference_recorded_independently(kit, site):
    model, _, pair_node, _, _ = kit
    dset, source_samples, target_samples = pair_node.direction(
        model, conditioning(1), conditioning(7), conditioning(2), latent(4), **SAMPLING, site=site,
        start_percent=0.0, end_percent=1.0, source_name="neutral", target_name="smiling")
    assert_pair_is_mean_difference(dset.sites[site], *(recorded_independently(model, conditioning(c), site)
                                                       for c in (1, 7)))
    assert not torch.equal(source_samples["samples"], target_samples["samples"])
    assert dset.params["alpha_unit"] == "pair" and "'neutral' -> 'smiling'" in describe(dset)


def test_alpha_one_applies_the_pairs_whole_difference(kit):
    """A pair's set at alpha a samples exactly as its unit direction at alpha a * strength."""
    model, _, pair_node, _, apply_node = kit
    import comfy.sample
    dset = pair_node.direction(model, conditioning(1), conditioning(7), conditioning(2), latent(1), **SAMPLING,
                               site=SITE_7, start_percent=0.0, end_percent=1.0, source_name="a", target_name="b")[0]
    unit = DirectionSet(sites={SITE_7: SiteDirections(dset.sites[SITE_7].vectors)}, method="test", model=dset.model)
    strength = float(dset.sites[SITE_7].gains[0])

    def sampled(directions, alpha):
        patched = apply_node.apply(model, directions, 0, "all", alpha, 0.0, 1.0, "both")[0]
        noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        return comfy.sample.sample(patched, noise, 4, 1.0, "euler", "normal", conditioning(1), conditioning(2),
                                   torch.zeros(1, 4, 8, 8), seed=0)
    pair_image, unit_image = sampled(dset, 0.7), sampled(unit, 0.7 * strength)
    # the same shift up to float32 rounding of the vector's scaling, carried through four steps
    assert torch.allclose(pair_image, unit_image, atol=1e-5 * float(unit_image.abs().max()))
    assert not torch.allclose(pair_image, sampled(unit, 0.7), atol=1e-3)


def test_project_out_makes_a_pair_direction_blind_to_another(host, kit):
    """Two prompt pairs' directions from the host's sampling: the first with the second projected out is orthogonal
    to it at each site, and its strength times it is the first pair's mean difference less its part along the
    second; Apply Direction takes the result."""
    import comfy.sample
    model, _, pair_node, _, apply_node = kit

    def pair(target, name):
        return pair_node.direction(model, conditioning(1), conditioning(target), conditioning(2), latent(2),
                                   **SAMPLING, site="h_space, input_blocks.7", start_percent=0.0, end_percent=1.0,
                                   source_name="neutral", target_name=name)[0]
    smiling, bright = pair(7, "smiling"), pair(8, "bright")
    projected, summary = host.nodes.NODE_CLASS_MAPPINGS["ProjectOutDirections"]().project(smiling, bright)
    for site in (SITE_7, "h_space"):
        removed = bright.sites[site].vectors[0].double()
        change = float(smiling.sites[site].gains[0]) * smiling.sites[site].vectors[0].double()
        kept = float(projected.sites[site].gains[0]) * projected.sites[site].vectors[0].double()
        assert abs(float(projected.sites[site].vectors[0].double() @ removed)) < 1e-6
        # float64 projection of float32 vectors, returned in float32: agreement to float32 rounding of the change
        assert torch.allclose(kept, change - (change @ removed) * removed, atol=1e-6 * float(change.norm()))
    assert summary.splitlines()[0] == "bright projected out of smiling at 2 of 2 sites"
    assert summary.splitlines()[1].startswith(f"{SITE_7}: #0 keeps ")
    patched = apply_node.apply(model, projected, 0, "all", 1.0, 0.0, 1.0, "both")[0]
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    edited, plain = (comfy.sample.sample(m, noise, 4, 1.0, "euler", "normal", conditioning(1), conditioning(2),
                                         torch.zeros(1, 4, 8, 8), seed=0) for m in (patched, model))
    assert not torch.allclose(edited, plain, atol=1e-3)


def test_the_example_pair_records_two_batches_of_different_sizes(kit):
    model, _, _, example_node, _ = kit
    without = {"samples": torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(1))}
    with_attribute = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2)) + 1.0}
    dset = example_node.direction(model, conditioning(1), conditioning(2), without, with_attribute,
                                  **{**SAMPLING, "add_noise": "disable"}, site="h_space", start_percent=0.0,
                                  end_percent=1.0, without_name="plain", with_name="bright")[0]
    assert dset.method == "pair-examples" and dset.params["images"] == [3, 2]
    (source, source_norms), (target, target_norms) = (recorded_independently(model, conditioning(1), "h_space",
                                                                             batch["samples"])
                                                      for batch in (without, with_attribute))
    difference = target.mean((0, 1)) - source.mean((0, 1))
    found = dset.sites["h_space"]
    # float32 activations averaged in float64 on both sides: agreement to float32 rounding
    assert torch.allclose(found.vectors[0].double(), F.normalize(difference, dim=0), atol=1e-5)
    scale = (source_norms.mean() + target_norms.mean()) / 2  # each batch's mean norm counts alike
    assert float(found.gains[0]) == pytest.approx(float(difference.norm() / scale), rel=1e-5)


def test_progress_and_cancel(host, kit):
    model, pca_node, *_ = kit
    jacobian = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    with progress_updates() as updates:
        pca(pca_node, model)
        assert updates[-1] == (4, 4)
        updates.clear()
        jacobian.directions(model, conditioning(1), conditioning(2), latent(1), 0, 0.3, 1.0, "h_space", 2)
        rows = [value for value, _ in updates[:-1]]  # model rows as the chunks finish, then the bar completes
        assert len(rows) > 2 and rows == sorted(rows) and updates[-1][0] == updates[-1][1] >= rows[-1]
        assert_cancel_stops(lambda: pca(pca_node, model))
        assert_cancel_stops(lambda: jacobian.directions(model, conditioning(1), conditioning(2), latent(1), 0, 0.3,
                                                        1.0, "h_space", 2))


def test_bad_inputs_get_one_line_errors(kit):
    model, pca_node, pair_node, example_node, _ = kit

    def refused(match, call):
        with pytest.raises(ValueError, match=match) as caught:
            call()
        assert "\n" not in str(caught.value)
    refused(r"target: its conditioning has shape \[\[1, 154, 32\]\] but the source's \[\[1, 77, 32\]\]",
            lambda: pair_node.direction(model, conditioning(1), conditioning(7, 154), conditioning(2), latent(2),
                                        **SAMPLING, site="h_space", start_percent=0.0, end_percent=1.0,
                                        source_name="a", target_name="b"))
    refused("latent: principal directions need a batch of at least 2 images", lambda: pca(pca_node, model, batch=1))
    refused("without: the latent batch is empty",
            lambda: example_node.direction(model, conditioning(1), conditioning(2), latent(0), latent(2),
                                           **SAMPLING, site="h_space", start_percent=0.0, end_percent=1.0,
                                           without_name="a", with_name="b"))
    refused("start_percent, end_percent: no sampling step fell inside this range",
            lambda: pca(pca_node, model, start=0.5, end=0.5))
    refused(r"start_percent \(0.8\) is after end_percent \(0.2\)", lambda: pca(pca_node, model, start=0.8, end=0.2))
    refused("site: 'output_blocks.99' names none of the layers here",
            lambda: pca(pca_node, model, site="output_blocks.99"))
    refused("latent: the latent's values hold NaN", lambda: pca_node.directions(
        model, conditioning(1), conditioning(2), {"samples": torch.full((2, 4, 8, 8), float("nan"))}, **SAMPLING,
        site="h_space", start_percent=0.0, end_percent=1.0, count=2))


def jacobian_latents(count: int = 1) -> torch.Tensor:
    """The Jacobian tests' latents [count, 4, 8, 8]: each the same whatever the count."""
    return torch.randn(count, 4, 8, 8, generator=torch.Generator().manual_seed(9))


def denoised_with_shifts(model, site, shifts, sigma, seed=3, image=0, positive=None, cfg=1.0):
    """The host's denoised prediction of jacobian_latents' ``image``, noised as the node noises that image of a batch,
    one batch row per shift [rows, C] added at the site in Apply Direction's units (the row's RMS token norm), by a
    hook on the host's module: an independent path to the same function the Jacobian node differentiates. The
    prompt: ``positive`` (by default conditioning(1)) against conditioning(2) at ``cfg``."""
    import comfy.sample
    import comfy.samplers
    unet = model.model.diffusion_model

    def shifted(tokens):
        # at cfg above 1 the batch holds the rows twice, for the prompt and the negative one, each row's scale the
        # mean of its two norms (Apply Direction's image_scales)
        passes = len(tokens) // len(shifts)
        norms = tokens.pow(2).sum(-1).mean(-1).sqrt().reshape(passes, -1).mean(0).repeat(passes)
        return tokens + (norms[:, None] * shifts.to(tokens).repeat(passes, 1))[:, None, :]
    if site == "h_space":
        handle = unet.middle_block[-1].register_forward_hook(  # the host calls the middle block's layers one by one
            lambda m, a, out: shifted(out.flatten(2).transpose(1, 2)).transpose(1, 2).reshape(out.shape))
    else:
        handle = unet.get_submodule(site).register_forward_pre_hook(lambda m, args: (shifted(args[0]), *args[1:]))

    batch = jacobian_latents(image + 1)
    latent = batch[image:].expand(len(shifts), -1, -1, -1)
    noise = comfy.sample.prepare_noise(batch, seed)[image:].expand(len(shifts), -1, -1, -1)
    try:
        return denoised_once(model, noise.contiguous(), latent.contiguous(), sigma, positive or conditioning(1),
                             conditioning(2), seed, cfg)
    finally:
        handle.remove()


def finite_difference_jacobian(model, site, width, sigma, step=1e-3, **prediction):
    """Central differences, float64 at the end: [outputs, width]; ``prediction``: denoised_with_shifts' image,
    positive and cfg."""
    eye = torch.eye(width)
    with torch.no_grad():
        plus = denoised_with_shifts(model, site, step * eye, sigma, **prediction).flatten(1).double()
        minus = denoised_with_shifts(model, site, -step * eye, sigma, **prediction).flatten(1).double()
    return ((plus - minus) / (2 * step)).T


@pytest.mark.parametrize("site, percent", [("h_space", 0.3), (SITE_7, 0.3), ("h_space", 0.0)])
def test_jacobian_directions_match_finite_differences_of_the_host_model(host, kit, site, percent):
    """Percent 0 is the schedule's noisiest sigma (the host's percent_to_sigma says 1e9 there)."""
    model = kit[0]
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    found = node.directions(model, conditioning(1), conditioning(2), image, 3, percent, 1.0, site, 4)[0].sites[site]
    sampling = model.get_model_object("model_sampling")
    sigma = float(sampling.percent_to_sigma(percent)) if percent else float(sampling.sigma_max)
    reference = finite_difference_jacobian(model, site, 128, sigma)
    _, values, vh = torch.linalg.svd(reference, full_matrices=False)
    # central differences at step 1e-3 in float32: errors ~1e-4 relative, far inside the 1% asked
    assert float(found.gains[0]) == pytest.approx(float(values[0]), rel=1e-2)
    gaps = values[:4] / values[1:5]
    for k in range(1, 5):
        if gaps[k - 1] > 1.05:  # a 5% gap pins the top-k subspace to ~1e-3 at these errors
            cosines = torch.linalg.svdvals(vh[:k] @ found.vectors[:k].double().T)
            assert float(cosines.min()) >= 0.99, (k, cosines)


def test_a_batchs_jacobian_directions_change_all_its_images_most(host, kit):
    """Two images, each with its own prompt (a two-row CONDITIONING, which the host tiles over the batch), at cfg 4
    (cond and uncond rows in one call): the directions are the top right singular vectors of the two images'
    finite-difference Jacobians stacked, each image with its prompt, gains their singular values over sqrt(2) (the
    change per image, in root mean square); a mask per image weighs each image's change (a mask off on the second
    gives the first image's directions, each image noised as the batch's seed noises it); a mask count that fits
    neither one nor the batch is refused by name."""
    model, site, cfg = kit[0], "h_space", 4.0
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    prompts = [conditioning(1), conditioning(5)]
    both_prompts = [[torch.cat([prompt[0][0] for prompt in prompts]), {}]]

    def found(images, positive, **mask):
        return node.directions(model, positive, conditioning(2), {"samples": images}, 3, 0.3, cfg, site, 3,
                               **mask)[0].sites[site]
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.3))
    first, second = (finite_difference_jacobian(model, site, 128, sigma, image=i, positive=prompts[i], cfg=cfg)
                     for i in (0, 1))
    _, values, vh = torch.linalg.svd(torch.cat([first, second]), full_matrices=False)
    assert float(values[0] / values[1]) > 1.05  # a gap that pins the top vector to ~1e-3 at these errors
    assert float(values[0]) > 1.05 * float(torch.linalg.svdvals(first)[0])  # the reference tells both from the first
    both = found(jacobian_latents(2), both_prompts)
    # the Krylov rule: each gain within 1% of a singular value; central differences: ~1e-4 relative
    assert float(both.gains[0]) == pytest.approx(float(values[0]) / 2 ** 0.5, rel=1e-2)
    assert float(torch.linalg.svdvals(vh[:1] @ both.vectors[:1].double().T)[0]) >= 0.99
    # the same products up to rounding (the second image's weighted 0) from the same start: the same iterates
    one = found(jacobian_latents(1), prompts[0])
    masked = found(jacobian_latents(2), both_prompts, mask=torch.stack([torch.ones(64, 64), torch.zeros(64, 64)]))
    assert torch.allclose(masked.gains * 2 ** 0.5, one.gains, rtol=1e-3)
    assert float(torch.linalg.svdvals(masked.vectors[:1] @ one.vectors[:1].T)[0]) >= 0.999
    with pytest.raises(ValueError, match=r"^mask: 3 masks for a latent batch of 2 images; give one mask, or one per"):
        found(jacobian_latents(2), both_prompts, mask=torch.ones(3, 64, 64))


def test_the_jacobians_mask_weights_follow_the_latents_entries():
    """latent_weights: one mask per image of a [B, C, T, h, w] latent (a video model's) lands on that image's entries
    in the order the prediction is flattened, area-resized to the latent grid; one mask serves every image."""
    from semantic_directions.nodes.jacobian import latent_weights
    masks = torch.zeros(2, 8, 8)
    masks[0, :4, :4], masks[1, 4:, :] = 1.0, 0.5
    shape = (2, 3, 1, 4, 4)
    weights = latent_weights(masks, shape).reshape(shape)
    expected = torch.nn.functional.avg_pool2d(masks[:, None], 2)[:, 0]
    assert all(torch.equal(weights[i, c, 0], expected[i]) for i in range(2) for c in range(3))
    assert torch.equal(latent_weights(masks[:1], shape).reshape(shape)[1, 2, 0], expected[0])


@pytest.mark.parametrize("site, cfg, images", [("h_space", 1.0, 1), (SITE_7, 1.0, 1), (SITE_7, 4.0, 1),
                                               (SITE_7, 4.0, 2)])
def test_the_jacobians_reverse_products_are_its_forward_ones_transposed(kit, site, cfg, images):
    assert_reverse_products_transpose_forward_ones(kit[0], conditioning(1), conditioning(2),
                                                   jacobian_latents(images), site, cfg)


def test_a_model_refusing_reverse_mode_gets_its_jacobian_formed(host, kit, caplog):
    """A patch holding a tensor made in inference mode (another pack's, say) on the gradient's path: autograd
    refuses to save it, so the node forms J in forward mode and says so, and the directions are still right."""
    with torch.inference_mode():
        scale = torch.full((1,), 1.5)
    model = kit[0].clone()
    model.set_model_output_block_patch(lambda h, hsp, options: (h * scale, hsp))
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    with caplog.at_level(logging.WARNING):
        found = node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2)[0]
    assert "reverse-mode derivatives failed through this model (Inference tensors cannot be saved" in caplog.text
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.3))
    values = torch.linalg.svdvals(finite_difference_jacobian(model, "h_space", 128, sigma))
    # formed J, float32 SVD, against central differences at step 1e-3 in float32: ~1e-4 relative
    assert torch.allclose(found.sites["h_space"].gains.double(), values[:2], rtol=1e-3)


def test_a_kernel_dropping_the_derivative_on_the_way_is_named(host, kit):
    """Every path from the site to the output passes a kernel without derivatives (fused_copy): reverse mode
    fails, forward mode brings no change to the output, and the node says so in one line instead of returning
    null directions."""
    model = kit[0].clone()
    model.set_model_output_block_patch(lambda h, hsp, options: (fused_copy(h), hsp))
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    with pytest.raises(ValueError, match=r"^site: h_space did not reach the model's output: is it used by this "
                                         r"model, or does an operation on the way \(a fused kernel"):
        node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2)


@pytest.mark.parametrize("mode, rows_that_fit", [("reverse", 2), ("reverse", 0), ("forward", 2), ("forward", 0)])
def test_passes_that_run_out_of_memory_take_fewer_rows(host, kit, caplog, mode, rows_that_fit):
    """A device that holds the activations of only ``rows_that_fit`` rows in a ``mode`` pass (a patch raising the
    out-of-memory error beyond): the chunk halves until it fits, and the directions are the same; at one row a
    reverse pass gives way to forming J in forward mode, and a forward one stops with a one-line error naming the
    latent."""
    import torch.autograd.forward_ad as forward_ad

    def limited(h, hsp, options):
        in_mode = torch.is_grad_enabled() if mode == "reverse" else forward_ad.unpack_dual(h).tangent is not None
        if in_mode and h.shape[0] > rows_that_fit:
            raise torch.OutOfMemoryError("simulated: the device is full")
        return h, hsp
    model = kit[0].clone()
    model.set_model_output_block_patch(limited)
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}

    def gains(of):
        return node.directions(of, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2)[0].sites[
            "h_space"].gains
    if mode == "forward" and not rows_that_fit:
        with pytest.raises(torch.OutOfMemoryError,
                           match=r"^latent: Directions From Image ran out of memory at 1 row a call in a forward "
                                 r"pass \(one image\); use a smaller latent, or free the device$"):
            gains(model)
        return
    with caplog.at_level(logging.INFO):
        found = gains(model)
    if rows_that_fit:
        assert f"out of memory in a {mode} pass; 2 rows a call from now" in caplog.text
    else:
        assert "derivatives failed through this model (out of memory at 1 row a call)" in caplog.text
    if rows_that_fit:  # the same products, in smaller calls: the same gains up to float32 rounding
        assert_float32_close(found, gains(kit[0]), ulps=2 ** 8)
    else:  # J formed in forward mode: exact gains, against the iteration's within 1% (its stopping rule)
        assert torch.allclose(found, gains(kit[0]), rtol=1e-2)


def test_an_operation_without_a_forward_mode_rule_is_named_in_one_line(host, kit):
    """A model operation with no forward-mode derivative (a custom autograd function without one, as quantized
    layers have): a one-line error naming the model, not torch's."""
    class WithoutForwardRule(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, gradient):
            return gradient
    model = kit[0].clone()
    model.set_model_output_block_patch(lambda h, hsp, options: (WithoutForwardRule.apply(h), hsp))
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    with pytest.raises(RuntimeError, match=r"^model: an operation in it has no forward-mode derivative") as raised:
        node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2)
    assert "\n" not in str(raised.value)


def test_a_mask_makes_the_directions_change_the_masked_region_most(host, kit):
    model = kit[0]
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    mask = torch.zeros(1, 64, 64)
    mask[:, :32, :32] = 1.0  # the top-left quarter of the latent's 8 x 8 grid
    masked = node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2, mask=mask)[0]
    whole = node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2)[0]
    sigma = float(model.get_model_object("model_sampling").percent_to_sigma(0.3))
    reference = finite_difference_jacobian(model, "h_space", 128, sigma).reshape(4, 8, 8, 128)
    inside = reference[:, :4, :4].reshape(-1, 128)
    top = torch.linalg.svdvals(inside)[0]
    moved = lambda v: float((inside @ v.double()).norm())  # noqa: E731
    assert moved(masked.sites["h_space"].vectors[0]) == pytest.approx(float(top), rel=1e-2)
    assert moved(whole.sites["h_space"].vectors[0]) < moved(masked.sites["h_space"].vectors[0])
    with pytest.raises(ValueError, match="mask: it is empty at the latent's resolution"):
        node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 2,
                        mask=torch.zeros(1, 64, 64))


def test_the_jacobian_runs_as_the_host_runs_nodes_in_inference_mode(host, kit):
    """The host loads weights and runs nodes under torch.inference_mode, whose tensors reverse-mode autograd
    refuses to save; the node's reverse products run through aliases of them, so the same directions come out
    and the model keeps its own tensors."""
    from harness.test_nodes.unets import build_unet
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    with torch.inference_mode():
        model = build_unet("sd15", seed=0)
        assert next(model.model.parameters()).is_inference()
        before = {name: tensor.clone() for name, tensor in model.model.state_dict().items()}
        inside = node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 3)[0]
        assert all(p.is_inference() for p in model.model.parameters())  # the reverse pass's aliases are gone
        assert all(torch.equal(before[name], tensor) for name, tensor in model.model.state_dict().items())
    outside = node.directions(kit[0], conditioning(1), conditioning(2), image, 3, 0.3, 1.0, "h_space", 3)[0]
    assert torch.equal(inside.sites["h_space"].vectors, outside.sites["h_space"].vectors)


def test_the_jacobian_warns_nothing_in_a_fresh_process():
    """torch scripts its forward-mode rules on the first dual tensor of a process, and torch 2.14 warns that
    torch.jit.script is deprecated there (a FutureWarning a user can do nothing about): the node loads them with
    that warning silenced. A fresh interpreter, as the rules load once per process."""
    code = ("import warnings, torch\n"
            "from harness.host import shared_host\n"
            "node = shared_host().nodes.NODE_CLASS_MAPPINGS['DirectionsFromImage']()\n"
            "from harness.test_nodes import TinyConditioning\n"
            "from harness.test_nodes.unets import build_unet\n"
            "prompt = TinyConditioning().encode(1, 32, 77)[0]\n"
            "image = {'samples': torch.zeros(1, 4, 8, 8)}\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    node.directions(build_unet('sd15'), prompt, prompt, image, 0, 0.3, 1.0, 'h_space', 2)\n"
            "print('WARNINGS', [str(w.message) for w in caught])")
    result = fresh_python("-c", code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "WARNINGS []"


def test_pytorch_attention_gets_forward_mode_derivatives_a_block_of_queries_at_a_time(host, monkeypatch):
    """PyTorch's fused attention kernels have no forward-mode rule (on this CPU as on NVIDIA GPUs); inside
    tangent_attention the same call runs the math backend in blocks of queries, values and tangents exact."""
    import torch.autograd.forward_ad as forward_ad

    from semantic_directions.nodes import host as host_layer
    generator = torch.Generator().manual_seed(4)
    q, k, v, dq, dk, dv = (torch.randn(2, 3, n, 8, generator=generator, dtype=torch.float64)
                           for n in (10, 12, 12, 10, 12, 12))
    mask = torch.randn(2, 1, 10, 12, generator=generator, dtype=torch.float64)
    with forward_ad.dual_level():
        duals = [forward_ad.make_dual(t.float(), d.float()) for t, d in ((q, dq), (k, dk), (v, dv))]
        with pytest.raises(NotImplementedError, match="forward AD"):
            F.scaled_dot_product_attention(*duals)
        monkeypatch.setattr(host_layer, "ATTENTION_BLOCK_BYTES", 3 * 2 * 3 * 12 * 4 * 2)  # 3 queries a block
        with host_layer.tangent_attention():
            found = forward_ad.unpack_dual(F.scaled_dot_product_attention(*duals, attn_mask=mask.float()))
        exact = forward_ad.unpack_dual(torch.softmax(
            forward_ad.make_dual(q, dq) @ forward_ad.make_dual(k, dk).transpose(-1, -2) / 8 ** 0.5 + mask, dim=-1)
            @ forward_ad.make_dual(v, dv))
    assert_float32_close(found.primal, exact.primal)
    assert_float32_close(found.tangent, exact.tangent)


@pytest.mark.parametrize("chosen", ["by the host", "by an override"])
def test_the_jacobian_passes_the_fused_attention_gpus_run(host, kit, monkeypatch, chosen):
    """On NVIDIA GPUs the host attends with PyTorch's fused kernels (or another pack overrides its attention with
    them): the forward products take the host's sub-quadratic attention instead, the other calls keep the chosen
    one, and the directions are those found with the sub-quadratic attention throughout."""
    import comfy.ldm.modules.attention as attention
    node = host.nodes.NODE_CLASS_MAPPINGS["DirectionsFromImage"]()
    image = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(9))}
    expected = node.directions(kit[0], conditioning(1), conditioning(2), image, 3, 0.3, 2.0, "input_blocks.7", 3)[0]
    model, calls = kit[0].clone(), []
    if chosen == "by the host":
        monkeypatch.setattr(attention, "optimized_attention", attention.attention_pytorch)
    else:
        def fused(func, *args, **kwargs):
            calls.append(args[0].requires_grad)
            return attention.attention_pytorch(*args, **kwargs)
        model.model_options["transformer_options"]["optimized_attention_override"] = fused
    found = node.directions(model, conditioning(1), conditioning(2), image, 3, 0.3, 2.0, "input_blocks.7", 3)[0]
    if chosen == "by an override":  # it kept the reverse passes (inputs requiring grad); a forward-mode call would fail
        assert any(calls)
    # the same products up to float32 rounding in the reverse passes' attention: the same gains to ~1e-6
    assert torch.allclose(found.sites[SITE_7].gains, expected.sites[SITE_7].gains, rtol=1e-4)


def test_the_grid_names_a_pairs_sweep(host, kit):
    from semantic_directions.nodes.grid import named
    model, _, pair_node, _, _ = kit
    dset = pair_node.direction(model, conditioning(1), conditioning(7), conditioning(2), latent(1), **SAMPLING,
                               site="h_space", start_percent=0.0, end_percent=1.0, source_name="neutral",
                               target_name="smiling")[0]
    assert [named(a, "neutral", "smiling") for a in ("-1", "-0.5", "0", "0.5", "1", "x")] == \
        ["neutral 1", "neutral 0.5", "unedited", "smiling 0.5", "smiling 1", "x"]
    grid_node = host.nodes.NODE_CLASS_MAPPINGS["LabelledImageGrid"]()
    images = torch.rand(3, 16, 16, 3)
    plain, = grid_node.grid(images, "-1, 0, 1", 0)
    titled, = grid_node.grid(images, "-1, 0, 1", 0, directions=dset)
    assert plain.shape == titled.shape and not torch.equal(plain, titled)  # the same grid, other words above
    # without labels the images are numbered, not alphas: the names leave the numbers alone
    assert torch.equal(grid_node.grid(images, "", 0, directions=dset)[0], grid_node.grid(images, "", 0)[0])
