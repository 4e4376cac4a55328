"""DDIM Invert and the DDIM Inversion Sampler: round trips, call counts, prediction types, graphs."""

import pytest
import torch

from directions_testing import assert_float32_close
from semantic_directions.directions.inversion import inversion_step


def test_refinement_solves_the_implicit_step_on_a_toy_denoiser():
    """With D linear the exact inverse is known; each refinement multiplies the error by the contraction."""
    matrix = 0.3 * torch.randn(6, 6, generator=torch.Generator().manual_seed(0))

    def denoise(x, sigma):
        return x @ matrix / (1 + sigma)
    x, low, high = torch.randn(1, 6, generator=torch.Generator().manual_seed(1)), torch.tensor(1.0), torch.tensor(1.5)

    def back(y):  # the sampling (Euler) step from high to low
        return y + (y - denoise(y, high)) / high * (low - high)
    errors = [float((back(inversion_step(denoise, x, low, high, refine)) - x).norm()) for refine in range(6)]
    # the fixed-point map's contraction: (sigma_hi - sigma_lo) / sigma_hi * |I - A / (1 + sigma_hi)|
    contraction = float(0.5 / 1.5 * torch.linalg.matrix_norm(torch.eye(6) - matrix / 2.5, ord=2))
    assert contraction < 0.5
    # the last error (1e-4 when measured) stays 800x above float32 rounding of x (|x| = 1: about 1e-7)
    assert all(later < 1.2 * contraction * earlier for earlier, later in zip(errors, errors[1:]))


def gradient_image():
    pixels = torch.linspace(0, 1, 64)
    return torch.stack([pixels[None, :].expand(64, 64), pixels[:, None].expand(64, 64),
                        0.5 + 0.4 * torch.sin(pixels[None, :] * 12).expand(64, 64)], dim=-1)[None]


class Kit:
    """The tiny UNet made a denoiser of Gaussian data (see GaussianPriorDenoiser), and a latent of
    the scale SD's VAE produces (unit variance once the host scales it in)."""

    def __init__(self, host):
        from harness.test_nodes.unets import build_unet, with_gaussian_prior
        import comfy.samplers
        self.host, self.samplers = host, comfy.samplers
        self.build = lambda **options: with_gaussian_prior(build_unet("sd15", **options))  # noqa: E731
        self.invert_node = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
        self.model = self.build(seed=0)
        self.latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(5)) / 0.18215}

    def invert(self, model=None, latent=None, steps=10, scheduler="normal", cfg=1.0, refine=2):
        """The LATENT output of DDIM Invert."""
        return self.invert_node.invert(model or self.model, latent or self.latent, steps, scheduler, cfg, refine,
                                       self.conditioning())[0]

    def sample_back(self, inverted, model=None, steps=10, scheduler="normal", cfg=1.0, positive=None):
        """KSamplerAdvanced with add_noise disabled, the same steps and scheduler, sampler ddim."""
        positive = positive or self.conditioning()
        return self.host.nodes.common_ksampler(model or self.model, 0, steps, cfg, "ddim", scheduler, positive,
                                               positive, inverted, disable_noise=True, start_step=0,
                                               last_step=steps, force_full_denoise=True)[0]["samples"]

    def sigmas(self, steps):
        return self.samplers.calculate_sigmas(self.model.get_model_object("model_sampling"), "normal", steps)

    @staticmethod
    def conditioning():
        return [[torch.zeros(1, 77, 32), {}]]


@pytest.fixture(scope="module")
def kit(host):
    return Kit(host)


def relative_error(a, b):
    return float((a - b).norm() / b.norm())


def test_round_trip_error_falls_by_a_large_factor_with_refinement(kit):
    """Each refinement multiplies a step's error by the fixed-point map's contraction: the step's
    (sigma_hi - sigma_lo) / sigma_hi times the Lipschitz constant of y - D(y), which for this
    denoiser is sigma_hi^2 / (1 + sigma_hi^2) (plus the small UNet share). On a 25-step normal
    schedule that is at most about 0.4, so two refinements must cut the round-trip error by well
    over 5x (measured: about 150x)."""
    upper, lower = kit.sigmas(25)[:-2], kit.sigmas(25)[1:-1]
    contraction = float(((upper - lower) / upper * upper ** 2 / (1 + upper ** 2)).max())
    assert contraction < 0.45
    errors = {refine: relative_error(kit.sample_back(kit.invert(refine=refine, steps=25), steps=25),
                                     kit.latent["samples"]) for refine in (0, 1, 2, 3)}
    print("round-trip relative error by refine:", errors)
    assert errors[0] > 0.05  # plain DDIM inversion drifts
    assert errors[1] < errors[0] * contraction and errors[2] < errors[1] * contraction
    assert errors[2] < errors[0] / 20 and errors[3] < 1e-3


def test_unet_evaluations_are_steps_times_one_plus_refine(kit):
    rows = []
    hook = kit.model.model.diffusion_model.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        kit.invert(steps=6, refine=2)
        at_cfg_one = sum(rows)
        rows.clear()
        kit.invert(steps=6, refine=2, cfg=3.0)
        at_cfg_three = sum(rows)
    finally:
        hook.remove()
    assert at_cfg_one == 6 * 3 and at_cfg_three == 2 * 6 * 3


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
    sigmas = kit.samplers.calculate_sigmas(kit.model.get_model_object("model_sampling"), "normal", 10).flip(0)
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
    sigmas = kit.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 25)
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
    with pytest.raises(ValueError, match=r"latent: this SD15 model takes 4-D latents \[batch, channels, height, width\], got shape \[4, 8, 8\]"):
        kit.invert(latent={"samples": torch.zeros(4, 8, 8)})
    with pytest.raises(ValueError, match="latent: the batch is empty"):
        kit.invert(latent={"samples": torch.zeros(0, 4, 8, 8)})
    with pytest.raises(ValueError, match="refine: expected 0 to 20 fixed-point iterations per step, got 50"):
        kit.invert(refine=50)
    with pytest.raises(ValueError, match="steps: expected at least 1, got 0"):
        kit.invert(steps=0)
    with pytest.raises(ValueError, match=r"cfg: expected 0 to 30.0 \(1 inverts best\), got -1"):
        kit.invert(cfg=-1.0)


def test_high_cfg_warns(kit, caplog):
    kit.invert(steps=2, cfg=4.0)
    assert "inversion drifts at high guidance" in caplog.text


def test_progress_and_cancel(kit):
    import comfy.model_management
    import comfy.utils
    updates = []
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, **kw: updates.append((value, total)))
    try:
        kit.invert(steps=5, refine=1)
        assert updates[-1] == (5, 5)
        comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            kit.invert(steps=5, refine=1)
    finally:
        comfy.model_management.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(None)


def test_graph_invert_edit_and_reconstruct(host, kit):
    """image -> VAEEncode -> DDIM Invert -> Apply Direction -> KSamplerAdvanced -> VAEDecode -> SaveImage."""
    import numpy as np
    from PIL import Image
    Image.fromarray((gradient_image()[0].numpy() * 255).round().astype(np.uint8)).save(host.base / "input" / "photo.png")

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
                "refine": 3, "positive": ["pos", 0]}},
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

    def saved(outputs, node):
        entry = outputs[node]["images"][0]
        return np.asarray(Image.open(host.base / "output" / entry["subfolder"] / entry["filename"]), dtype=np.float32)
    outputs = host.run(graph(0.0), cached=False)
    reconstruction, reference = saved(outputs, "save"), saved(outputs, "save_ref")
    psnr = 10 * np.log10(255 ** 2 / np.mean((reconstruction - reference) ** 2))
    print("reconstruction PSNR against the VAE's own round trip:", psnr)
    assert psnr > 35  # against the VAE's own round trip, the best any inversion can do (measured 38.7 dB)
    edited = saved(host.run(graph(1.0), cached=False), "save")
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
