"""Test-only nodes, loaded by the harness's host from its custom_nodes folder; never part of the pack.

They stand in for checkpoint and text-encoder loading, which needs weights this machine cannot
download: a UNet of a real block structure with seeded weights, and seeded conditioning; and the
faces world's trained model (world/), which the demo uses too.
"""
import torch

from world.model import empty_context, load_patcher, pixel_vae

from .dits import FAMILIES as DIT_FAMILIES
from .dits import build_dit, build_flux_clip
from .unets import FAMILIES, build_clip, build_unet, build_vae, with_gaussian_prior


class TinyUNetLoader:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = "A small UNet of the SD1.5 or SDXL block structure with seeded weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "family": (sorted(FAMILIES),),
            "model_channels": ("INT", {"default": 32, "min": 32, "max": 320, "step": 32}),
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
        }, "optional": {
            "denoiser": (["unet", "gaussian prior"], {"default": "unet"}),
        }}

    def load(self, family, model_channels, seed, denoiser="unet"):
        model = build_unet(family, model_channels=model_channels, seed=seed)
        return (with_gaussian_prior(model) if denoiser == "gaussian prior" else model,)


class TinyVAELoader:
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("VAE",)
    DESCRIPTION = "A TAESD-shaped VAE (4 latent channels, or Flux's 16) with seeded weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1})},
                "optional": {"latent_channels": ([4, 16], {"default": 4})}}

    def load(self, seed, latent_channels=4):
        return (build_vae(seed, latent_channels),)


class TinyDiTLoader:
    """What Flux workflows load instead of UNETLoader in tests: a tiny model of a Flux-like family, as a
    Gaussian-prior denoiser (so that inversion round trips)."""
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL",)
    DESCRIPTION = "A tiny Flux, Flux.2 or Chroma with seeded weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (sorted(DIT_FAMILIES),), "seed": ("INT", {"default": 0, "min": 0,
                                                                                  "max": 2 ** 31 - 1})}}

    def load(self, family, seed):
        return (with_gaussian_prior(build_dit(family, seed=seed)),)


class TinyFluxCLIPLoader:
    """What Flux workflows load instead of DualCLIPLoader in tests: CLIP-L and T5 at the tiny Flux's widths."""
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("CLIP",)
    DESCRIPTION = "Flux's text encoders (real tokenizers) at the tiny Flux's widths, seeded weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1})}}

    def load(self, seed):
        return (build_flux_clip(seed),)


class TinyConditioning:
    CATEGORY = "testing"
    FUNCTION = "encode"
    RETURN_TYPES = ("CONDITIONING",)
    DESCRIPTION = "Seeded text-encoder output of the tiny UNet's context width (a stand-in prompt)."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1}),
            "context_dim": ("INT", {"default": 32, "min": 1, "max": 4096}),
            "tokens": ("INT", {"default": 77, "min": 1, "max": 1024}),
        }}

    def encode(self, seed, context_dim, tokens):
        generator = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, tokens, context_dim, generator=generator), {}]],)


class TinyCheckpointLoader:
    """What example workflows load instead of CheckpointLoaderSimple in tests: the tiny SD1.5- or
    SDXL-shaped UNet as a Gaussian-prior denoiser, the family's text encoders at its context width,
    and the tiny VAE."""
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    DESCRIPTION = "A tiny SD1.5- or SDXL-shaped checkpoint: MODEL, CLIP and VAE with seeded weights."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0, "min": 0, "max": 2 ** 31 - 1})},
                "optional": {"family": (sorted(FAMILIES), {"default": "sd15"})}}

    def load(self, seed, family="sd15"):
        return (with_gaussian_prior(build_unet(family, seed=seed)), build_clip(family, seed), build_vae(seed))


class FacesWorldLoader:
    """The faces world's trained model (world/model.py), loaded as the host loads a checkpoint. Its
    conditioning is the empty context it was trained with, so it stands in for text encoding too."""
    CATEGORY = "testing"
    FUNCTION = "load"
    RETURN_TYPES = ("MODEL", "VAE", "CONDITIONING")
    DESCRIPTION = "The faces world's 32 x 32 pixel-space diffusion model, its identity VAE and its empty conditioning."

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {}}

    def load(self):
        return load_patcher(), pixel_vae(), [[empty_context(1), {}]]


NODE_CLASS_MAPPINGS = {"TinyUNetLoader": TinyUNetLoader, "TinyVAELoader": TinyVAELoader,
                       "TinyConditioning": TinyConditioning, "TinyCheckpointLoader": TinyCheckpointLoader,
                       "FacesWorldLoader": FacesWorldLoader, "TinyDiTLoader": TinyDiTLoader,
                       "TinyFluxCLIPLoader": TinyFluxCLIPLoader}
