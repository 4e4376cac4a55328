"""The nodes on models that compute in float16 and bfloat16, as the host runs checkpoints on a GPU (on a CPU it
computes them in float32, as every other test does): the same stored weights computed both ways give the same
directions and edits to the precision's rounding, and a trained model's inversion keeps its accuracy."""
import pytest
import torch
from directions_testing import conditioning

from harness.inversion import sample_back

HALF = [torch.float16, torch.bfloat16]
SITE_7 = "input_blocks.7.1.transformer_blocks.0.attn1"


def one_minus_cosines(a: torch.Tensor, b: torch.Tensor, signed: bool = False) -> list:
    """1 - |cos| of each row pair (1 - cos where the sign means something: a pair's direction)."""
    return [1 - (lambda c: c if signed else abs(c))(float(x.double() @ y.double())) for x, y in zip(a, b)]


def assert_edit_as_precise_as_the_model(half: dict, reference: dict):
    """Both edits move their sample (by more than a tenth of its size), and the half-precision edit's move differs
    from float32's by at most three times as much as the plain samples differ (measured 0.6 to 1.4 times): the
    shift adds no error of its own beyond the model's rounding."""
    moved = [run["edited"] - run["plain"] for run in (half, reference)]
    scale = reference["plain"].norm()
    assert bool(torch.isfinite(half["edited"]).all()) and all(m.norm() > 0.1 * scale for m in moved)
    assert (moved[0] - moved[1]).norm() <= 3 * (half["plain"] - reference["plain"]).norm()


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
    a prompt pair (its sign too) and one image (forward- and reverse-mode derivatives in ``dtype``) agree, 1 - cosine
    below the precision's epsilon (measured at most 1.1e-5 in float16, whose epsilon is 9.8e-4, and 2.4e-3 in
    bfloat16, 7.8e-3), and an attention edit is as precise as the model (see above)."""
    from harness.test_nodes.unets import build_unet
    reference = unet_chain(host, build_unet("sd15", seed=0, dtype=dtype))
    half = unet_chain(host, build_unet("sd15", seed=0, dtype=dtype, compute_dtype=dtype))
    for name in ("samples", "prompt pair", "image h_space", f"image {SITE_7}"):
        assert max(one_minus_cosines(half[name], reference[name], name == "prompt pair")) < torch.finfo(dtype).eps
    assert_edit_as_precise_as_the_model(half, reference)


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_flux_runs_every_node(host, dtype):
    """A tiny Flux computed in ``dtype``: Discover, Apply Direction at every site, DDIM Invert, Directions From
    Image and From Samples at a single block give finite results and the edit is as precise as the model (see
    above). The random tiny Flux amplifies rounding: its plain bfloat16 sample is 22% from float32's, its float16
    one 0.04%; where the plain samples agree to within the precision's epsilon, the directions do too (1 - cosine
    2e-7 in float16)."""
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
    eps = torch.finfo(dtype).eps
    if (half["plain"] - reference["plain"]).norm() < eps * reference["plain"].norm():
        assert max(one_minus_cosines(half["image"], reference["image"])
                   + one_minus_cosines(half["samples"], reference["samples"])) < eps


@pytest.mark.parametrize("dtype", HALF, ids=str)
def test_half_precision_inversion_of_the_trained_model_keeps_its_accuracy(host, dtype):
    """Four held-out faces inverted by DDIM Invert (20 karras steps, refine 2) on the faces world's model computed
    in ``dtype`` and sampled back: each round trip far below a visible error (above 50 dB; 8-bit rounding is
    59 dB; measured 63 to 77 dB in float16, 64 to 68 in bfloat16, 62 to 78 in float32, on an AVX-512 Xeon, whose
    half-precision kernels may round otherwise than other CPUs'), at least 15 dB above plain DDIM inversion's in
    the same precision (36 to 41 dB; the closest pair 23 dB apart)."""
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
    assert refined.min() > 50 and (refined - plain).min() > 15, (refined, plain)
