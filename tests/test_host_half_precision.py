"""The nodes on models that compute in float16 and bfloat16, as the host runs checkpoints on a GPU (on a CPU it
computes them in float32, as every other test does): the same stored weights computed both ways give the same
directions and edits to the precision's rounding, and a trained model's inversion keeps its accuracy."""
import pytest
import torch
from directions_testing import conditioning

from harness.inversion import sample_back

HALF = [torch.float16, torch.bfloat16]
SITE_7 = "input_blocks.7.1.transformer_blocks.0.attn1"


def cosines(a: torch.Tensor, b: torch.Tensor) -> list:
    return [abs(float(x.double() @ y.double())) for x, y in zip(a, b)]


def assert_edit_as_precise_as_the_model(half: dict, reference: dict):
    """The edit changes the sample, and computing it in half precision moves the edited sample from float32's
    no further than it moves the plain one, give or take half (measured 0.8 to 1.2 times as far): the shift
    adds no rounding of its own beyond the model's."""
    def error(key):
        return float((half[key] - reference[key]).norm() / reference[key].norm())
    assert float((reference["edited"] - reference["plain"]).norm() / reference["plain"].norm()) > 0.1
    assert bool(torch.isfinite(half["edited"]).all()) and error("edited") < 1.5 * error("plain") + 1e-6


def unet_chain(host, model) -> dict:
    """Every direction node's vectors and an attention edit's samples on ``model``."""
    import comfy.sample
    registry = host.nodes.NODE_CLASS_MAPPINGS
    latent = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))}
    one = {"samples": latent["samples"][:1]}
    positive, negative = conditioning(1), conditioning(2)
    found = registry["DiscoverAttentionEigendirections"]().discover(model, "all", 2, "whitened", 1.0)[0]
    edited = registry["ApplyDirection"]().apply(model, found, 0, "all", 0.5, 0.0, 1.0, "both")[0]
    noise = comfy.sample.prepare_noise(latent["samples"], 0)

    def sample(patcher):
        return comfy.sample.sample(patcher, noise, 4, 2.0, "ddim", "normal", positive, negative, latent["samples"],
                                   seed=0, disable_pbar=True)
    sampling = (0, "enable", 4, 2.0, "ddim", "normal", "h_space", 0.0, 1.0)
    return {
        "plain": sample(model), "edited": sample(edited),
        "samples": registry["DirectionsFromSamples"]().directions(
            model, positive, negative, latent, *sampling, 1)[0].sites["h_space"].vectors,
        "prompt pair": registry["DirectionFromPromptPair"]().direction(
            model, positive, conditioning(3), negative, latent, *sampling, "a", "b")[0].sites["h_space"].vectors,
        **{f"image {site}": registry["DirectionsFromImage"]().directions(
            model, positive, negative, one, 0, 0.3, 1.0, site, 2)[0].sites[site].vectors
           for site in ("h_space", SITE_7)}}


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_unet_gives_float32s_directions_and_edits(host, dtype):
    """The tiny SD1.5 UNet stored in ``dtype``, computed in float32 and in ``dtype``: directions from samples,
    a prompt pair and one image (forward- and reverse-mode derivatives in ``dtype``) agree to within the
    precision's epsilon (cosine), and an attention edit is as precise as the model (see below)."""
    from harness.test_nodes.unets import build_unet
    reference = unet_chain(host, build_unet("sd15", seed=0, dtype=dtype))
    half = unet_chain(host, build_unet("sd15", seed=0, dtype=dtype, compute_dtype=dtype))
    for name in ("samples", "prompt pair", "image h_space", f"image {SITE_7}"):
        assert min(cosines(half[name], reference[name])) > 1 - torch.finfo(dtype).eps, name
    assert_edit_as_precise_as_the_model(half, reference)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_flux_runs_every_node(host, dtype):
    """A tiny Flux computed in ``dtype``: Discover, Apply Direction at every site, DDIM Invert, Directions From
    Image and From Samples at a single block give finite results, and the edit is as precise as the model (the
    random tiny Flux amplifies rounding: its plain bfloat16 sample is 22% from float32's, its float16 one
    0.04%)."""
    import comfy.sample
    import comfy.samplers

    from harness.test_nodes.dits import build_dit
    registry = host.nodes.NODE_CLASS_MAPPINGS
    latent = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(2))
    tokens = torch.randn(1, 5, 32, generator=torch.Generator().manual_seed(3))
    prompt = [[tokens, {"pooled_output": torch.zeros(1, 16)}]]

    def chain(model):
        found = registry["DiscoverAttentionEigendirections"]().discover(model, "all", 2, "whitened", 1.0)[0]
        site = list(found.sites)[-1]
        edited = registry["ApplyDirection"]().apply(model, found, 0, "all", 0.5, 0.0, 1.0, "both")[0]
        sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 3)

        def sample(patcher):
            return comfy.sample.sample_custom(patcher, latent, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                              prompt, prompt, torch.zeros_like(latent), seed=0)
        return {"plain": sample(model), "edited": sample(edited),
                "inverted": registry["DDIMInvert"]().invert(model, {"samples": latent}, 3, "simple", 1.0, 1,
                                                            prompt)[0]["samples"],
                "image": registry["DirectionsFromImage"]().directions(
                    model, prompt, prompt, {"samples": latent[:1]}, 0, 0.3, 1.0, site, 2)[0].sites[site].vectors,
                "samples": registry["DirectionsFromSamples"]().directions(
                    model, prompt, prompt, {"samples": latent}, 0, "enable", 3, 1.0, "euler", "simple", site, 0.0,
                    1.0, 1)[0].sites[site].vectors}
    reference = chain(build_dit("flux", seed=1, dtype=dtype))
    half = chain(build_dit("flux", seed=1, dtype=dtype, compute_dtype=dtype))
    assert all(bool(torch.isfinite(value).all()) for value in half.values())
    assert_edit_as_precise_as_the_model(half, reference)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_inversion_of_the_trained_model_keeps_its_accuracy(host, dtype):
    """Four held-out faces inverted by DDIM Invert (20 karras steps, refine 2) on the faces world's model computed
    in ``dtype`` and sampled back: each round trip within 8-bit rounding by far (above 55 dB; measured 63 to 77
    dB in float16, 64 to 68 in bfloat16, 62 to 78 in float32), at least 20 dB above plain DDIM inversion's in the
    same precision (36 to 41 dB; the closest pair 23 dB apart)."""
    from world.model import empty_context, load_patcher
    from world.quality import generator_faces
    invert = host.nodes.NODE_CLASS_MAPPINGS["DDIMInvert"]()
    model = load_patcher(dtype=dtype)
    faces = torch.from_numpy(generator_faces(4)).float().permute(0, 3, 1, 2)
    prompt = [[empty_context(1), {}]]

    def round_trip_psnr(refine):
        inverted = invert.invert(model, {"samples": faces}, 20, "karras", 1.0, refine, prompt)[0]["samples"]
        back = sample_back(model, inverted, prompt, 20, "karras")
        return -10 * ((back.clamp(-1, 1) - faces) / 2).pow(2).mean((1, 2, 3)).log10()
    refined, plain = round_trip_psnr(2), round_trip_psnr(0)
    assert refined.min() > 55 and (refined - plain).min() > 20, (refined, plain)
