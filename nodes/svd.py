"""SVD Latent Attribute, Explore and Analysis: editing and reading latents through their channel-wise SVD."""
import torch

import comfy.model_management
import comfy.utils

from ..directions.svd import (
    AttributeWeights,
    channel_svd,
    check_latent,
    check_vector_count,
    scale_singular_value,
    subspace_distance,
    transfer_attribute,
)
from .common import CATEGORY, finite, parse_numbers
from .plots import svd_analysis_image

PROGRESS_EVERY = 10


def weight_input(default, what):
    return ("FLOAT", {"default": default, "min": 0.0, "max": 1000.0, "step": 0.01, "tooltip": what})


class SVDLatentAttribute:
    DESCRIPTION = (
        "Transfers an attribute from a target prompt into a source latent through their channel-wise SVD "
        "(a reimplementation of arXiv 2502.02225 from its description). Render the source and target prompts "
        "with the same seed through KSamplerAdvanced to the same end_at_step with return_with_leftover_noise; "
        "connect both here; continue the result with the SOURCE prompt in KSamplerAdvanced from that step "
        "(start_at_step, add_noise: disable). A small MLP, fitted to this pair, predicts the singular values.")
    CATEGORY = CATEGORY
    FUNCTION = "transfer"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The edited latent, to continue sampling with the source prompt from the same step.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "source": ("LATENT", {"tooltip": "The original prompt's latent at the step (leftover noise kept)."}),
            "target": ("LATENT", {"tooltip": "The target prompt's latent, same seed, size and step."}),
            "k": ("INT", {"default": 16, "min": 0, "max": 4096, "tooltip":
                  "Leading singular vectors per channel taken from the source, their values refitted."}),
            "m": ("INT", {"default": 8, "min": 0, "max": 4096, "tooltip":
                  "Leading singular vectors per channel taken from the target: the attribute. More carries "
                  "finer target detail, and more of the target's layout."}),
            "target_weight": weight_input(1.0, "Pull towards the target latent; without it no attribute appears."),
            "source_weight": weight_input(1.0, "Pull towards the source latent; without it identity is lost."),
            "target_values_weight": weight_input(
                0.1, "Keeps the target vectors' values near the target's; without it colours saturate."),
            "source_values_weight": weight_input(
                0.1, "Keeps the source vectors' values near the source's; without it quality drops."),
            "iterations": ("INT", {"default": 300, "min": 1, "max": 100000, "tooltip":
                           "Optimisation steps of the MLP fit (300 converges on SD latents)."}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 0xffffffffffffffff, "control_after_generate": False,
                             "tooltip": "The MLP's initialisation; the same seed gives the same result."}),
            "keep_rest": ("BOOLEAN", {"default": True, "tooltip":
                          "Keep the source's singular components beyond k as they are (on), so the leftover "
                          "noise stays intact; off drops them, the literal reading of the paper."}),
        }}

    def transfer(self, source, target, k, m, target_weight, source_weight, target_values_weight,
                 source_values_weight, iterations, seed, keep_rest):
        device = comfy.model_management.get_torch_device()
        progress = comfy.utils.ProgressBar(iterations)

        def report(i):
            if (i + 1) % PROGRESS_EVERY == 0 or i + 1 == iterations:
                comfy.model_management.throw_exception_if_processing_interrupted()
                progress.update_absolute(i + 1, iterations)
        weights = AttributeWeights(finite("target_weight", target_weight), finite("source_weight", source_weight),
                                   finite("target_values_weight", target_values_weight),
                                   finite("source_values_weight", source_values_weight))
        edited = transfer_attribute(source["samples"].to(device), target["samples"].to(device), k, m, weights,
                                    iterations, seed, keep_rest, report)
        return ({**source, "samples": edited.to(comfy.model_management.intermediate_device())},)


class SVDLatentExplore:
    DESCRIPTION = ("Multiplies one singular value of a latent's channel (or of every channel) by a factor: "
                   "leading vectors carry coarse attributes, later ones finer detail. Give factors as a list to "
                   "render a sweep as a batch. Factor 1 returns the latent unchanged.")
    CATEGORY = CATEGORY
    FUNCTION = "explore"
    RETURN_TYPES = ("LATENT",)
    OUTPUT_TOOLTIPS = ("The latent with the value scaled; a batch of one per factor when factor_list is given.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latent": ("LATENT", {"tooltip": "A latent, e.g. a partial sampling's leftover-noise latent."}),
            "index": ("INT", {"default": 0, "min": 0, "max": 4095, "tooltip":
                      "Which singular vector, 0 = the strongest."}),
            "channel": ("INT", {"default": -1, "min": -1, "max": 127, "tooltip": "Which channel; -1 = all."}),
            "factor": ("FLOAT", {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.05, "tooltip":
                       "Multiplies the singular value; 0 removes the component, negative flips it."}),
        }, "optional": {
            "factor_list": ("STRING", {"default": "", "tooltip":
                            "A sweep such as 0,0.5,1,1.5,2: replaces factor, one copy of the batch per value."}),
        }}

    def explore(self, latent, index, channel, factor, factor_list=""):
        factors = parse_numbers(factor_list, "factor_list") if factor_list.strip() else [finite("factor", factor)]
        samples = latent["samples"]
        check_latent(samples, "latent")
        scaled = torch.cat([scale_singular_value(samples, index, value, None if channel < 0 else channel)
                            for value in factors])
        result = {key: value for key, value in latent.items() if key != "batch_index" or len(factors) == 1}
        return ({**result, "samples": scaled},)


class SVDLatentAnalysis:
    DESCRIPTION = ("Plots a list of latents captured at several steps (a batch, in sampling order): each "
                   "channel's singular spectrum per step, and how far the leading-k singular subspaces move "
                   "between consecutive steps (Grassmann distance). Flat, low distances late in sampling are the "
                   "paper's first property: the structure settles early.")
    CATEGORY = CATEGORY
    FUNCTION = "analyse"
    RETURN_TYPES = ("IMAGE",)
    OUTPUT_TOOLTIPS = ("The two plots side by side.",)

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "latents": ("LATENT", {"tooltip": "Latents in sampling order as one batch (e.g. LatentBatch of "
                                              "KSamplerAdvanced outputs at several end_at_step values)."}),
            "k": ("INT", {"default": 8, "min": 1, "max": 4096, "tooltip":
                  "Size of the leading subspaces compared between steps."}),
        }}

    def analyse(self, latents, k):
        samples = latents["samples"]
        check_latent(samples, "latents")
        if samples.shape[0] < 2:
            raise ValueError("latents: expected at least 2 latents in the batch (one per captured step)")
        check_vector_count(samples, "k", k)
        spectra = channel_svd(samples)[1]
        distances = subspace_distance(samples[:-1], samples[1:], k)
        return (svd_analysis_image(spectra.cpu(), distances.cpu(), k),)


NODE_CLASS_MAPPINGS = {"SVDLatentAttribute": SVDLatentAttribute, "SVDLatentExplore": SVDLatentExplore,
                       "SVDLatentAnalysis": SVDLatentAnalysis}
NODE_DISPLAY_NAME_MAPPINGS = {"SVDLatentAttribute": "SVD Latent Attribute", "SVDLatentExplore": "SVD Latent Explore",
                              "SVDLatentAnalysis": "SVD Latent Analysis"}
