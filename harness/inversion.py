"""Round trips through the host, and the inversions the pack's DDIM Invert is compared with (tests, bench_invert):

- ``fixed_point_sampler``: the pack's previous default, each step started where plain DDIM inversion lands and
  then ``refine`` unaccelerated fixed-point iterations (1 + refine model calls a step, spent evenly);
- ``unsample``: ComfyUI_Noise's Unsampler as its documentation sets it up, the host's ``dpmpp_2m`` run over the
  schedule flipped and shifted by 1e-4, from zero noise (one model call a step; the inversion most users use);
- ``sample_back``: KSamplerAdvanced's path with add_noise disabled, as the pack's README samples an inversion back.

Needs the host importable (``harness.host.start``).
"""
import torch

UNSAMPLER_SHIFT = 1e-4  # ComfyUI_Noise's Unsampler adds this to every sigma of the flipped schedule


def fixed_point_sampler(refine: int):
    """A SAMPLER for ascending sigmas: plain start, then ``refine`` fixed-point iterations per step."""
    import comfy.samplers

    @torch.no_grad()
    def invert(model, x, sigmas, extra_args=None, callback=None, disable=None):
        def denoise(y, sigma):
            return model(y, sigma * y.new_ones([y.shape[0]]), **(extra_args or {}))
        for low, high in zip(sigmas.tolist(), sigmas[1:].tolist()):
            start = low if low > 0 else high
            y = x + (x - denoise(x, start)) / start * (high - low)
            for _ in range(refine):
                y = x + (y - denoise(y, high)) / high * (high - low)
            x = y
        return x
    return comfy.samplers.KSAMPLER(invert)


def schedule(patcher, scheduler: str, steps: int) -> torch.Tensor:
    import comfy.samplers
    return comfy.samplers.calculate_sigmas(patcher.get_model_object("model_sampling"), scheduler, steps)


def invert_with(patcher, sampler, samples, sigmas, conditioning) -> torch.Tensor:
    """``samples`` inverted along ascending ``sigmas`` by a SAMPLER through the host's guider at cfg 1."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(patcher)
    guider.set_conds(conditioning, conditioning)
    guider.set_cfg(1.0)
    return guider.sample(torch.zeros_like(samples), samples, sampler, sigmas, seed=0, disable_pbar=True)


def unsample(patcher, samples, conditioning, steps: int, scheduler: str) -> torch.Tensor:
    import comfy.samplers
    sigmas = schedule(patcher, scheduler, steps).flip(0) + UNSAMPLER_SHIFT
    return invert_with(patcher, comfy.samplers.sampler_object("dpmpp_2m"), samples, sigmas, conditioning)


def sample_back(patcher, samples, conditioning, steps: int, scheduler: str, sampler: str = "ddim",
                cfg: float = 1.0) -> torch.Tensor:
    """KSamplerAdvanced with add_noise disabled from ``samples``: the round trip's way back."""
    import nodes
    return nodes.common_ksampler(patcher, 0, steps, cfg, sampler, scheduler, conditioning, conditioning,
                                 {"samples": samples}, disable_noise=True, start_step=0, last_step=steps,
                                 force_full_denoise=True)[0]["samples"]
