"""DDIM Invert and the DDIM Inversion Sampler: round trips, call counts, prediction types, graphs."""

import numpy as np
import pytest
import torch
from directions_testing import (
    assert_cancel_stops,
    assert_float32_close,
    progress_updates,
    psnr,
    saved_image,
    write_test_photo,
)

from harness.inversion import fixed_point_sampler, invert_with, sample_back, schedule
from semantic_directions.directions.inversion import anderson_solve, invert


def linear_fixed_point(size=6, radius=0.9):
    """F(y) = b + M y with M symmetric of spectral radius ``radius`` (plain iteration shrinks the error only
    by that factor a call), in float64, and its exact fixed point (I - M)^-1 b."""
    generator = torch.Generator().manual_seed(0)
    basis, _ = torch.linalg.qr(torch.randn(size, size, generator=generator, dtype=torch.float64))
    matrix = basis @ torch.diag(torch.linspace(-radius, radius, size, dtype=torch.float64)) @ basis.T
    offset = torch.randn(2, size, generator=generator, dtype=torch.float64)
    return (lambda y: offset + y @ matrix), torch.linalg.solve(torch.eye(size, dtype=torch.float64) - matrix,
                                                              offset.T).T


def test_anderson_acceleration_solves_a_linear_fixed_point_in_dimension_plus_two_calls():
    """With memory at least the dimension, Anderson acceleration on a linear map is GMRES: exact after at
    most size + 1 residuals; plain iteration is still far off after the same calls (0.9 per call)."""
    fixed_map, exact = linear_fixed_point()
    start = torch.zeros_like(exact)
    solved, residuals = anderson_solve(fixed_map, start, evaluations=8, memory=6)
    plain = start
    for _ in range(8):
        plain = fixed_map(plain)
    assert residuals.shape == (8, 2)
    assert (solved - exact).norm() < 1e-9 * exact.norm() < 1e-9 * 1e3 * (plain - exact).norm()
    assert residuals[-1].max() < 1e-6 < residuals[-2].min()


def test_anderson_stops_at_the_tolerance_and_reports_each_calls_residual():
    fixed_map, exact = linear_fixed_point()
    calls = []
    solved, residuals = anderson_solve(lambda y: calls.append(1) or fixed_map(y), torch.zeros_like(exact),
                                       evaluations=50, tolerance=1e-3, memory=6)
    assert len(calls) == len(residuals) <= 8 and residuals[-1].max() <= 1e-3 < residuals[-2].max()
    assert torch.allclose(residuals[0], torch.ones(2, dtype=torch.float64))  # |F(0) - 0| / max(|0|, |F(0)|)
    assert (solved - exact).norm() < 1e-2 * exact.norm()


@pytest.mark.parametrize("refine", [0, 2])
def test_a_model_predicting_nan_is_named_not_inverted_to_nan(refine):
    def broken(x, sigma):
        return x * float("nan") if sigma > 5 else x / (1 + sigma ** 2)
    with pytest.raises(ValueError, match="model: its prediction holds NaN or infinite values at sigma"):
        invert(broken, torch.randn(1, 4, 4, 4), torch.linspace(0, 14, 6), refine)


def test_a_schedule_repeating_a_sigma_inverts():
    """More steps than timesteps make some schedules repeat a sigma: that step is empty, not a division by 0."""
    x = torch.randn(1, 4, 4, 4, generator=torch.Generator().manual_seed(2))
    sigmas = torch.tensor([0.0, 0.5, 1.0, 1.0, 2.0, 4.0])
    inverted = invert(lambda y, sigma: y / (1 + sigma ** 2), x, sigmas, 2)
    assert torch.isfinite(inverted).all() and inverted.abs().max() > 0


class Kit:
    """The tiny UNet made a denoiser of Gaussian data (see GaussianPriorDenoiser), and a latent of
    the scale SD's VAE produces (unit variance once the host scales it in)."""

    def __init__(self, host):
        import comfy.samplers

        from harness.test_nodes.unets import build_unet, with_gaussian_prior
        self.host, self.samplers = host, comfy.samplers
        self.build = lambda **options: with_gaussian_prior(build_unet("sd15", **options))  # noqa: E731
        self.invert_node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
        self.model = self.build(seed=0)
        self.latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) / 0.18215}

    def invert(self, model=None, latent=None, steps=10, scheduler="normal", cfg=1.0, refine=2):
        """The LATENT output of DDIM Invert (at cfg other than 1, guided away from a negative prompt)."""
        negative = None if cfg == 1 else [[torch.full((1, 77, 32), 0.5), {}]]
        return self.invert_node.invert(model or self.model, latent or self.latent, steps, scheduler, cfg, refine,
                                       self.conditioning(), negative)[0]

    def sample_back(self, inverted, model=None, steps=10, scheduler="normal", cfg=1.0, positive=None):
        """KSamplerAdvanced with add_noise disabled, the same steps and scheduler, sampler ddim."""
        return sample_back(model or self.model, inverted["samples"], positive or self.conditioning(), steps,
                           scheduler, cfg=cfg)

    def sigmas(self, steps):
        return schedule(self.model, "normal", steps)

    @staticmethod
    def conditioning():
        return [[torch.zeros(1, 77, 32), {}]]


@pytest.fixture(scope="module")
def kit(host):
    return Kit(host)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_round_trip_error_falls_by_a_large_factor_with_refinement(kit):
    """Plain DDIM inversion drifts (11% on 25 steps); spending the extra calls on the fixed points removes
    nearly all of it (measured: 430x at refine 1, 680x at refine 2, where every step has reached the
    stopping tolerance, so refine 3 spends nothing more)."""
    errors = {refine: relative_error(kit.sample_back(kit.invert(refine=refine, steps=25), steps=25),
                                     kit.latent["samples"]) for refine in (0, 1, 2, 3)}
    print("round-trip relative error by refine:", errors)
    assert errors[0] > 0.05
    assert errors[1] < errors[0] / 200 and errors[2] < errors[0] / 300 and errors[3] <= 1.01 * errors[2]


def counted_rows(model, function):
    """(UNet rows evaluated while ``function`` runs: one per image and model call, its result)."""
    rows = []
    hook = model.model.diffusion_model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        result = function()
    finally:
        hook.remove()
    return sum(rows), result


def test_unet_evaluations_are_at_most_steps_times_one_plus_refine(kit):
    """Plain inversion calls the model once a step; refine r allows 1 + r a step on average and spends less
    once every step's fixed point has converged; cfg evaluates two rows a call."""
    assert counted_rows(kit.model, lambda: kit.invert(steps=6, refine=0))[0] == 6
    assert counted_rows(kit.model, lambda: kit.invert(steps=6, refine=0, cfg=3.0))[0] == 12
    for refine in (1, 2, 5):
        at_cfg_one = counted_rows(kit.model, lambda: kit.invert(steps=6, refine=refine))[0]
        at_cfg_three = counted_rows(kit.model, lambda: kit.invert(steps=6, refine=refine, cfg=3.0))[0]
        assert 6 < at_cfg_one <= 6 * (1 + refine) and at_cfg_three % 2 == 0 and 12 < at_cfg_three <= 12 * (1 + refine)


def test_accelerated_inversion_beats_plain_fixed_point_refinement_at_fewer_model_calls(kit):
    """The default (extrapolated starts, Anderson acceleration, calls spent where the residual is) against
    the previous default, 1 + refine unaccelerated fixed-point calls every step (harness/inversion.py), on
    10 steps, where plain inversion's error is 26% (measured: at refine 1, 2.7e-4 in 20 calls against 5.0e-2
    in 20; at refine 2, 1.1e-4 in 29 against 1.2e-2 in 30)."""
    sigmas = schedule(kit.model, "normal", 10).flip(0)
    for refine in (1, 2):
        calls, accelerated = counted_rows(kit.model, lambda: kit.invert(steps=10, refine=refine))
        fixed_calls, fixed_point = counted_rows(kit.model, lambda: invert_with(
            kit.model, fixed_point_sampler(refine), kit.latent["samples"], sigmas, kit.conditioning()))
        errors = [relative_error(kit.sample_back(latent), kit.latent["samples"])
                  for latent in (accelerated, {"samples": fixed_point})]
        print(f"refine {refine}: accelerated {errors[0]:.2e} in {calls} calls, "
              f"fixed point {errors[1]:.2e} in {fixed_calls}")
        assert calls <= fixed_calls == 10 * (1 + refine) and errors[0] < errors[1] / 20


def test_each_steps_residual_is_logged_and_an_unconverged_inversion_warns(kit, caplog):
    import logging
    with caplog.at_level(logging.INFO):
        kit.invert(steps=10, refine=2)
    line = next(r.getMessage() for r in caplog.records if "fixed-point residual per step" in r.getMessage())
    residuals = [float(v) for v in line.split(": ")[-1].split()]
    assert len(residuals) == 10 and max(residuals) < 1e-2 and "has not converged" not in caplog.text
    caplog.clear()
    kit.invert(steps=2, refine=1, cfg=3.0)  # two big steps at high guidance: the fixed points are far off
    assert "has not converged" in caplog.text


def test_a_batch_inverts_in_one_call_like_each_image_alone(kit):
    second = {"samples": torch.flip(kit.latent["samples"], dims=[-1])}
    batch = kit.invert(latent={"samples": torch.cat([kit.latent["samples"], second["samples"]])})["samples"]
    # A batch runs other kernels than one image, so the two round apart at the inverted latents' scale (about
    # 270; measured: 2 ulps of it), which entries near 0 cannot match by rtol.
    assert_float32_close(batch[0:1], kit.invert()["samples"])
    assert_float32_close(batch[1:2], kit.invert(latent=second)["samples"])


def test_v_prediction_round_trip(kit):
    model = kit.build(seed=1, model_type="v_prediction")
    plain = relative_error(kit.sample_back(kit.invert(model=model, refine=0, steps=25), model=model, steps=25),
                           kit.latent["samples"])
    refined = relative_error(kit.sample_back(kit.invert(model=model, refine=3, steps=25), model=model, steps=25),
                             kit.latent["samples"])
    assert refined < 1e-3 < plain / 50


def test_inversion_sampler_path_agrees_with_the_node(kit):
    import comfy.sample
    sampler = kit.host.nodes.NODE_CLASS_MAPPINGS["DDIMInversionSampler"]().get_sampler(2)[0]
    sigmas = schedule(kit.model, "normal", 10).flip(0)
    samples = kit.latent["samples"]
    via_sampler = comfy.sample.sample_custom(kit.model, torch.zeros_like(samples), 1.0, sampler, sigmas,
                                             kit.conditioning(), kit.conditioning(), samples, seed=0)
    assert_float32_close(via_sampler, kit.invert()["samples"])  # the same steps (measured: bit-identical)
    with pytest.raises(ValueError, match="FlipSigmas"):
        comfy.sample.sample_custom(kit.model, torch.zeros_like(samples), 1.0, sampler, sigmas.flip(0),
                                   kit.conditioning(), kit.conditioning(), samples, seed=0)


def test_flow_matching_inverts_its_euler_ode(kit):
    """A tiny UNet on the host's flow schedule, which starts at sigma 1: the NOISE output carries x_T."""
    import comfy.sample
    model = kit.build(seed=2, model_type="flow")
    sigmas = schedule(model, "normal", 25)
    assert float(sigmas[0]) == 1.0
    samples = kit.latent["samples"]
    inverted, noise = kit.invert_node.invert(model, kit.latent, 25, "normal", 1.0, 3, positive=kit.conditioning())
    zeros = torch.zeros_like(samples)
    back = comfy.sample.sample_custom(model, noise.generate_noise({"samples": zeros}), 1.0,
                                      kit.samplers.sampler_object("euler"), sigmas, kit.conditioning(),
                                      kit.conditioning(), zeros, seed=0)
    assert relative_error(back, samples) < 1e-3
    via_sampler = kit.host.nodes.NODE_CLASS_MAPPINGS["DDIMInversionSampler"]().get_sampler(3)[0]
    with pytest.raises(ValueError, match="sigmas: this flow-matching schedule ends at sigma 1"):
        comfy.sample.sample_custom(model, zeros, 1.0, via_sampler, sigmas.flip(0), kit.conditioning(),
                                   kit.conditioning(), samples, seed=0)
    lower = sigmas[1:]  # a KSAMPLER divides flow results by 1 - sigma: the sampler path stops below 1
    stepped = comfy.sample.sample_custom(model, zeros, 1.0, via_sampler, lower.flip(0), kit.conditioning(),
                                         kit.conditioning(), samples, seed=0)
    back = comfy.sample.sample_custom(model, zeros, 1.0, kit.samplers.sampler_object("euler"), lower,
                                      kit.conditioning(), kit.conditioning(), stepped, seed=0)
    assert relative_error(back, samples) < 1e-3


def test_noise_output_starts_sampling_at_the_inverted_latent(kit):
    import comfy.sample
    inverted, noise = kit.invert_node.invert(kit.model, kit.latent, 10, "normal", 1.0, 2, positive=kit.conditioning())
    sigmas = kit.sigmas(10)
    ddim = kit.samplers.sampler_object("ddim")
    for given in (torch.zeros_like(inverted["samples"]), kit.latent["samples"]):
        via_noise = comfy.sample.sample_custom(kit.model, noise.generate_noise({"samples": given}), 1.0, ddim, sigmas,
                                               kit.conditioning(), kit.conditioning(), given, seed=0)
        # the noise is solved from the inverted latent (about 270): its rounding is ulps at that scale
        assert_float32_close(via_noise, kit.sample_back(inverted), scale=float(inverted["samples"].abs().max()))
    with pytest.raises(ValueError, match="noise: the sampler's latent has shape"):
        noise.generate_noise({"samples": torch.zeros(1, 4, 16, 16)})


def test_bad_inputs(kit):
    with pytest.raises(ValueError, match=r"latent: this SD15 model takes 4-D latents "
                                         r"\[batch, channels, height, width\], got shape \[4, 8, 8\]"):
        kit.invert(latent={"samples": torch.zeros(4, 8, 8)})
    with pytest.raises(ValueError, match="latent: the batch is empty"):
        kit.invert(latent={"samples": torch.zeros(0, 4, 8, 8)})
    with pytest.raises(ValueError, match="refine: expected 0 to 20 extra model calls per step, got 50"):
        kit.invert(refine=50)
    with pytest.raises(ValueError, match="steps: expected at least 1, got 0"):
        kit.invert(steps=0)
    with pytest.raises(ValueError, match=r"cfg: expected 0 to 30.0 \(1 inverts best\), got -1"):
        kit.invert(cfg=-1.0)


def test_high_cfg_warns(kit, caplog):
    kit.invert(steps=2, cfg=4.0)
    assert "inversion drifts at high guidance" in caplog.text


def test_progress_and_cancel(kit):
    with progress_updates() as updates:
        kit.invert(steps=5, refine=1)
        assert updates[-1] == (5, 5)
        assert_cancel_stops(lambda: kit.invert(steps=5, refine=1))


def test_graph_invert_edit_and_reconstruct(host, kit):
    """image -> VAEEncode -> DDIM Invert -> Apply Direction -> KSamplerAdvanced -> VAEDecode -> SaveImage."""
    write_test_photo(host, "photo.png", frequency=12)

    def graph(alpha):
        return {
            "m": {"class_type": "TinyUNetLoader", "inputs": {"family": "sd15", "model_channels": 32, "seed": 0,
                                                              "denoiser": "gaussian prior"}},
            "v": {"class_type": "TinyVAELoader", "inputs": {"seed": 0}},
            "img": {"class_type": "LoadImage", "inputs": {"image": "photo.png"}},
            "enc": {"class_type": "VAEEncode", "inputs": {"pixels": ["img", 0], "vae": ["v", 0]}},
            "pos": {"class_type": "TinyConditioning", "inputs": {"seed": 1, "context_dim": 32, "tokens": 77}},
            "inv": {"class_type": "DDIMInvert", "inputs": {
                "model": ["m", 0], "latent": ["enc", 0], "steps": 25, "scheduler": "normal", "cfg": 1.0,
                "refine": 2, "positive": ["pos", 0]}},
            "d": {"class_type": "DiscoverAttentionEigendirections", "inputs": {
                "model": ["m", 0], "layers": "middle", "count": 2, "method": "whitened", "token_variance": 1.0}},
            "a": {"class_type": "ApplyDirection", "inputs": {
                "model": ["m", 0], "directions": ["d", 0], "index": 0, "layer": "all", "alpha": alpha,
                "start_percent": 0.0, "end_percent": 0.5, "apply_to": "both"}},
            "k": {"class_type": "KSamplerAdvanced", "inputs": {
                "model": ["a", 0], "add_noise": "disable", "noise_seed": 0, "steps": 25, "cfg": 1.0,
                "sampler_name": "ddim", "scheduler": "normal", "positive": ["pos", 0], "negative": ["pos", 0],
                "latent_image": ["inv", 0], "start_at_step": 0, "end_at_step": 10000,
                "return_with_leftover_noise": "disable"}},
            "dec": {"class_type": "VAEDecode", "inputs": {"samples": ["k", 0], "vae": ["v", 0]}},
            "vae_only": {"class_type": "VAEDecode", "inputs": {"samples": ["enc", 0], "vae": ["v", 0]}},
            "save": {"class_type": "SaveImage", "inputs": {"images": ["dec", 0], "filename_prefix": f"edit{alpha}"}},
            "save_ref": {"class_type": "SaveImage", "inputs": {"images": ["vae_only", 0], "filename_prefix": "ref"}},
        }

    outputs = host.run(graph(0.0), cached=False)
    reconstruction, reference = saved_image(host, outputs, "save"), saved_image(host, outputs, "save_ref")
    print("reconstruction PSNR against the VAE's own round trip:", psnr(reconstruction, reference))
    # against the VAE's own round trip, the best any inversion can do (measured 39.1 dB)
    assert psnr(reconstruction, reference) > 35
    edited = saved_image(host, host.run(graph(1.0), cached=False), "save")
    assert np.abs(edited - reference).max() > 10


def test_img_to_img_flow_models_of_newer_hosts_are_refused_by_name(kit):
    """Newer hosts add IMG_TO_IMG_FLOW, a flow type whose noise_scaling returns the image itself. Built here
    the way those hosts build it (a mixin over the flow schedule), it is refused by name, and the noise
    solve refuses any model whose sampling start ignores the noise instead of dividing by zero."""
    import comfy.model_sampling

    class IMG_TO_IMG_FLOW(comfy.model_sampling.CONST):  # noqa: N801  (the host's class name is the point)
        def noise_scaling(self, sigma, noise, latent_image, max_denoise=False):
            return latent_image

    class Sampling(comfy.model_sampling.ModelSamplingDiscreteFlow, IMG_TO_IMG_FLOW):
        pass

    model = kit.model.clone()
    model.add_object_patch("model_sampling", Sampling(model.model.model_config))
    with pytest.raises(ValueError, match="model: its sampling type IMG_TO_IMG_FLOW starts from an image"):
        kit.invert(model)
    _, noise = kit.invert_node.invert(kit.model, kit.latent, 2, "normal", 1.0, 0, kit.conditioning())
    original = noise.model.model_sampling
    noise.model.model_sampling = Sampling(noise.model.model_config)
    try:
        with pytest.raises(ValueError, match="noise: this model's sampling does not start from noise"):
            noise.generate_noise(kit.latent)
    finally:
        noise.model.model_sampling = original
