"""Small API-format prompt builders shared by the host and server tests, and posting one to a server."""
import json
import time
import uuid

import requests

PROMPT_TIMEOUT_S = 120


def submitted(url: str, prompt: dict):
    """POST the prompt to the server at ``url``; return (its 400 reply's JSON, None), or (None, its history entry)
    once it has run. Numbers go as JSON as API clients send them (NaN and Infinity included)."""
    prompt_id = str(uuid.uuid4())
    body = json.dumps({"prompt": prompt, "prompt_id": prompt_id})
    reply = requests.post(f"{url}/prompt", data=body, headers={"Content-Type": "application/json"}, timeout=30)
    if reply.status_code == 400:
        return reply.json(), None
    assert reply.ok, reply.text
    deadline = time.monotonic() + PROMPT_TIMEOUT_S
    while not (history := requests.get(f"{url}/history/{prompt_id}", timeout=10).json()):
        assert time.monotonic() < deadline, f"prompt not done in {PROMPT_TIMEOUT_S}s"
        time.sleep(0.1)
    return None, history[prompt_id]


def save_loaded_directions(source: str, target: str, overwrite: bool = False) -> dict:
    """Load Directions(source) -> Save Directions(target)."""
    return {
        "1": {"class_type": "LoadDirections", "inputs": {"file": source}},
        "2": {"class_type": "SaveDirections",
              "inputs": {"directions": ["1", 0], "filename": target, "overwrite": overwrite}},
    }


def tiny_inputs(batch: int = 1) -> dict:
    """The nodes most test graphs start from: the tiny SD1.5-shaped UNet ("m"), a positive and a negative prompt's
    seeded tokens ("pos", "neg") and an empty 64 x 64 latent batch ("lat")."""
    return {
        "m": {"class_type": "TinyUNetLoader", "inputs": {"family": "sd15", "model_channels": 32, "seed": 0}},
        "pos": {"class_type": "TinyConditioning", "inputs": {"seed": 1, "context_dim": 32, "tokens": 77}},
        "neg": {"class_type": "TinyConditioning", "inputs": {"seed": 2, "context_dim": 32, "tokens": 77}},
        "lat": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": batch}},
    }


def tiny_sampling(steps: int = 2, seed: int = 0, model: list | None = None) -> dict:
    """Tiny SD1.5-shaped UNet -> KSampler on a 64 x 64 (8 x 8 latent) image -> SaveLatent."""
    return {
        **tiny_inputs(),
        "k": {"class_type": "KSampler", "inputs": {
            "model": model or ["m", 0], "seed": seed, "steps": steps, "cfg": 4.0,
            "sampler_name": "euler", "scheduler": "normal", "positive": ["pos", 0],
            "negative": ["neg", 0], "latent_image": ["lat", 0], "denoise": 1.0}},
        "save": {"class_type": "SaveLatent", "inputs": {"samples": ["k", 0], "filename_prefix": "tiny"}},
    }


def discover_and_save(filename: str, layers: str = "all", count: int = 4, method: str = "whitened",
                      model_seed: int = 0) -> dict:
    """Tiny UNet -> Discover Attention Eigendirections -> Save Directions, spectrum previewed."""
    return {
        "m": {"class_type": "TinyUNetLoader", "inputs": {"family": "sd15", "model_channels": 32, "seed": model_seed}},
        "d": {"class_type": "DiscoverAttentionEigendirections", "inputs": {
            "model": ["m", 0], "layers": layers, "count": count, "method": method, "token_variance": 1.0}},
        "s": {"class_type": "SaveDirections", "inputs": {"directions": ["d", 0], "filename": filename,
                                                          "overwrite": True}},
        "p": {"class_type": "PreviewImage", "inputs": {"images": ["d", 1]}},
    }
