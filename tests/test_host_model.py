"""Host layer: the test-only tiny UNet is a real host model that stock samplers run."""
import torch
from graphs import tiny_sampling
from safetensors.torch import load_file


def test_tiny_unet_samples_through_ksampler(host):
    outputs = host.run(tiny_sampling(steps=2), cached=False)
    saved = outputs["save"]["latents"][0]
    latent = load_file(str(host.base / "output" / saved["subfolder"] / saved["filename"]))["latent_tensor"]
    assert latent.shape == (1, 4, 8, 8) and torch.isfinite(latent).all()


def test_tiny_unet_has_the_sd15_attention_layout(host):
    from harness.test_nodes.unets import build_unet
    model = build_unet("sd15").model
    attn1 = [name for name, _ in model.diffusion_model.named_modules() if name.endswith("attn1")]
    blocks = sorted({name.split(".transformer_blocks")[0] for name in attn1})
    assert len(attn1) == 16
    assert blocks == sorted([f"input_blocks.{i}.1" for i in (1, 2, 4, 5, 7, 8)] + ["middle_block.1"]
                            + [f"output_blocks.{i}.1" for i in range(3, 12)])
    assert type(model).__name__ == "BaseModel" and type(model.model_config).__name__ == "SD15"
