"""The faces world's diffusion model: a small UNet of the host's own classes with SD's block structure
(self-attention in the encoder, middle and decoder), v-prediction (the weights' metadata says which;
the first model predicted eps) on the host's default discrete schedule, in pixel space (3 channels; the host's
identity VAE, a state dict holding only ``pixel_space_vae``, maps images to [-1, 1] and back).

Needs the host's modules importable (``comfy``), as inside ComfyUI or after ``harness.comfyui.make_importable()``.
"""
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open

import comfy.latent_formats
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.supported_models

from .faces import SIZE as IMAGE_SIZE

WEIGHTS = Path(__file__).resolve().parent / "faces_unet.safetensors"
CONTEXT_DIM = 32  # the text context is empty (zeros): the model is unconditional
UNET = {
    "use_checkpoint": False, "image_size": IMAGE_SIZE, "in_channels": 3, "out_channels": 3,
    "model_channels": 32, "num_res_blocks": [1, 1, 1], "channel_mult": [1, 2, 2],
    # self-attention at the 8 x 8 level of the encoder and decoder and in the middle: 1.4 M parameters,
    # 0.7 s per training step of 32 images on 2 CPU cores (attention at 16 x 16 too would double it)
    "transformer_depth": [0, 0, 1], "transformer_depth_middle": 1, "transformer_depth_output": [0, 0, 0, 0, 1, 1],
    "use_spatial_transformer": True, "use_linear_in_transformer": True, "context_dim": CONTEXT_DIM,
    "num_heads": -1, "num_head_channels": 32, "legacy": False, "adm_in_channels": None,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}


class PixelSpace(comfy.latent_formats.LatentFormat):
    """RGB in [-1, 1] as the latent: no scaling, three channels."""
    latent_channels = 3
    scale_factor = 1.0

    def __init__(self):
        self.latent_rgb_factors = [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]
        self.latent_rgb_factors_bias = [0.0, 0.0, 0.0]


class FacesConfig(comfy.supported_models.SD15):
    latent_format = PixelSpace
    memory_usage_factor = 1.0


PREDICTIONS = {"eps": comfy.model_base.ModelType.EPS, "v": comfy.model_base.ModelType.V_PREDICTION}


def unet_config(width: int) -> dict:
    """``UNET`` with ``width`` channels at the first level; the heads widen with it, so their number stays."""
    return dict(UNET, model_channels=width, num_head_channels=width)


def build_model(dtype=torch.float32, prediction: str = "v", unet: dict = UNET) -> comfy.model_base.BaseModel:
    """v-prediction by default: an eps-predicting network has to reproduce its input to within 1/sigma of the
    image it implies at high noise, and its small errors there became the first model's tinted backgrounds."""
    config = FacesConfig(dict(unet, dtype=dtype))
    config.set_inference_dtype(dtype, None)
    return comfy.model_base.BaseModel(config, model_type=PREDICTIONS[prediction], device=torch.device("cpu"))


def read_weights(path: Path) -> tuple[dict, str, dict]:
    """(the UNet's float32 state dict, what it predicts, its UNet configuration) from exported weights or a
    training checkpoint (its EMA); files without a prediction field predict eps, as the first model did."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata() or {}
        settings = json.loads(metadata.get("settings", "{}"))
        prediction = metadata.get("prediction") or settings.get("prediction", "eps")
        prefix = "ema." if any(k.startswith("ema.") for k in f.keys()) else ""
        weights = {k[len(prefix):]: f.get_tensor(k).float() for k in f.keys() if k.startswith(prefix)}
    return weights, prediction, settings.get("unet", UNET)


def widen(narrow: dict, wide: dict, seed: int) -> dict:
    """``narrow``'s weights in ``wide``'s shapes (each dimension equal or twice as wide), computing the same
    function: Net2WiderNet (Chen, Goodfellow and Shlens, 2016). Channel i becomes channels 2i and 2i + 1, so
    GroupNorm's 32 groups and LayerNorm see the narrow statistics; a weight reading a doubled channel is split
    between the two copies in random shares that sum to one, so the copies get different gradients and can
    learn apart. The timestep sinusoids at twice the width hold the narrow frequencies at their even indices.
    A query is scaled by 1/sqrt(2): each head is twice as wide (softmax scale 1/sqrt(d)) and its logit sums
    each duplicated product twice."""
    generator = torch.Generator().manual_seed(seed)
    grown = {}
    for name, tensor in narrow.items():
        target = tuple(wide[name].shape)
        if len(target) != tensor.ndim or any(b not in (a, 2 * a) for a, b in zip(tensor.shape, target)):
            raise ValueError(f"{name}: cannot widen {tuple(tensor.shape)} to {target}")
        t = tensor.float()
        for dim, (a, b) in enumerate(zip(tensor.shape, target)):
            if a == b:
                continue
            # the sinusoids: [cos(f_i t), sin(f_i t)], f_i = 10000^(-i / half)
            if name == "time_embed.0.weight" and dim == 1:
                sinusoids = torch.zeros(t.shape[0], b)
                sinusoids[:, 0:a:2], sinusoids[:, a::2] = t[:, :a // 2], t[:, a // 2:]
                t = sinusoids
            elif dim == 0:
                t = t.repeat_interleave(2, dim=0)
            else:
                share = 0.4 + 0.2 * torch.rand(t.shape, generator=generator)
                t = torch.stack([t * share, t * (1 - share)], dim=dim + 1).flatten(dim, dim + 1)
        if name.endswith(".to_q.weight") and target[0] == 2 * tensor.shape[0]:
            t = t / math.sqrt(2)
        grown[name] = t
    return grown


def initialise(unet: torch.nn.Module, seed: int) -> None:
    """PyTorch's default initialisation, drawn from ``seed`` (the host's layers skip it), with the
    output convolution at zero so training starts from a predictor of zero noise."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(unet.state_dict(keep_vars=True).items()):
            if tensor.ndim >= 2:
                bound = 1 / math.sqrt(tensor[0].numel())
                tensor.copy_((torch.rand(tensor.shape, generator=generator) * 2 - 1) * bound)
            elif name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
        for tensor in unet.out[-1].parameters():
            tensor.zero_()


def empty_context(batch: int) -> torch.Tensor:
    return torch.zeros(batch, 1, CONTEXT_DIM)


def load_patcher(path: Path = WEIGHTS, dtype=torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The trained model as the host runs a checkpoint: a ModelPatcher on the host's devices, computing in
    ``dtype`` (float16 or bfloat16 as a GPU runs it)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; train and export it with python -m world.train --export")
    weights, prediction, unet = read_weights(path)
    model = build_model(dtype=dtype, prediction=prediction, unet=unet)
    model.diffusion_model.load_state_dict(weights)
    return comfy.model_patcher.ModelPatcher(model, load_device=comfy.model_management.get_torch_device(),
                                            offload_device=comfy.model_management.unet_offload_device())


def pixel_vae() -> comfy.sd.VAE:
    """The host's identity VAE: images in [0, 1] to the model's [-1, 1] pixels and back."""
    return comfy.sd.VAE(sd={"pixel_space_vae": torch.tensor(1.0)})
