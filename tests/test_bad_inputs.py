"""The bad-input battery, through the real server (``main.py --cpu`` with the pack): every case is refused
by name, either by the host's validation (400, ``node_errors`` naming the input) or by the pack's own
one-line message at execution (never torch's), the server keeps answering, and nothing is written
outside the folders a prompt may write to."""
import json
import math
import re
from pathlib import Path

import pytest
import requests
import torch
from graphs import submitted, tiny_inputs
from safetensors import safe_open
from safetensors.torch import save_file

from semantic_directions.directions.fileformat import METADATA_KEY

pytestmark = pytest.mark.server

WRITABLE = ("models/directions", "output", "temp", "user", "input")
LOG = "server.log"

BASE = {
    **tiny_inputs(),
    "d": {"class_type": "DiscoverAttentionEigendirections", "inputs": {
        "model": ["m", 0], "layers": "all", "count": 2, "method": "whitened", "token_variance": 1.0}},
}


def node(class_type, **inputs):
    return {"class_type": class_type, "inputs": inputs}


def save_latent(source):
    return {"out": node("SaveLatent", samples=source, filename_prefix="battery")}


def discover(**change):
    return {"d": node("DiscoverAttentionEigendirections", **{**BASE["d"]["inputs"], **change}),
            "p": node("PreviewImage", images=["d", 1])}


def applied(sampled_latent="lat", **change):
    """Apply Direction on the tiny model, sampled one step by KSampler."""
    inputs = {"model": ["m", 0], "directions": ["d", 0], "index": 0, "layer": "all", "alpha": 0.5,
              "start_percent": 0.0, "end_percent": 1.0, "apply_to": "both", **change}
    return {"a": node("ApplyDirection", **inputs),
            "k": node("KSampler", model=["a", 0], seed=0, steps=1, cfg=2.0, sampler_name="euler", scheduler="normal",
                      positive=["pos", 0], negative=["neg", 0], latent_image=[sampled_latent, 0], denoise=1.0),
            **save_latent(["k", 0])}


def projected(**change):
    """Project Out Directions on the discovered set, its summary previewed."""
    return {"po": node("ProjectOutDirections", **{"directions": ["d", 0], "remove": ["d", 0], **change}),
            "p": node("PreviewAny", source=["po", 1])}


def asyrp(model="m", **change):
    """The Asyrp Sampler through SamplerCustom, on ``model`` edited in h-space-free attention."""
    return {"s": node("AsyrpSampler", **{"boost_eta": 0.0, "boost_start_percent": 0.8, **change}),
            "sig": node("BasicScheduler", model=[model, 0], scheduler="normal", steps=2, denoise=1.0),
            "c": node("SamplerCustom", model=[model, 0], add_noise=True, noise_seed=0, cfg=1.0, positive=["pos", 0],
                      negative=["neg", 0], sampler=["s", 0], sigmas=["sig", 0], latent_image=["lat", 0]),
            **save_latent(["c", 0])}


def inverted(latent="lat", model="m", positive="pos", **change):
    inputs = {"model": [model, 0], "latent": [latent, 0], "steps": 2, "scheduler": "normal", "cfg": 1.0,
              "refine": 1, "positive": [positive, 0], **change}
    return {"inv": node("DDIMInvert", **inputs), **save_latent(["inv", 0])}


def attribute(source="lat", target="lat2", **change):
    inputs = {"source": [source, 0], "target": [target, 0], "k": 2, "m": 2, "target_weight": 1.0,
              "source_weight": 1.0, "target_values_weight": 0.1, "source_values_weight": 0.1, "iterations": 2,
              "seed": 0, "keep_rest": True, **change}
    return {"lat2": node("EmptyLatentImage", width=64, height=64, batch_size=1),
            "attr": node("SVDLatentAttribute", **inputs), **save_latent(["attr", 0])}


SAMPLING = {"seed": 0, "add_noise": "enable", "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal",
            "site": "h_space", "start_percent": 0.0, "end_percent": 1.0}


def from_samples(latent="two", **change):
    return {"two": node("RepeatLatentBatch", samples=["lat", 0], amount=2),
            "pca": node("DirectionsFromSamples", model=["m", 0], positive=["pos", 0], negative=["neg", 0],
                        latent=[latent, 0], **{**SAMPLING, "count": 2, **change}),
            **applied(directions=["pca", 0], layer="h_space")}


def prompt_pair(target="pos", **change):
    return {"long": node("TinyConditioning", seed=3, context_dim=32, tokens=154),
            "pair": node("DirectionFromPromptPair", model=["m", 0], source=["pos", 0], target=[target, 0],
                         negative=["neg", 0], latent=["lat", 0],
                         **{**SAMPLING, "source_name": "a", "target_name": "b", **change}),
            **applied(directions=["pair", 0], layer="h_space")}


def from_image(**change):
    return {"jac": node("DirectionsFromImage", model=["m", 0], positive=["pos", 0], negative=["neg", 0],
                        latent=["lat", 0], **{"seed": 0, "percent": 0.3, "cfg": 1.0, "site": "h_space", "count": 2,
                                              **change}),
            **applied(directions=["jac", 0], layer="h_space")}


def explore(latent="lat", **change):
    inputs = {"latent": [latent, 0], "index": 0, "channel": -1, "factor": 1.0, "factor_list": "", **change}
    return {"x": node("SVDLatentExplore", **inputs), **save_latent(["x", 0])}


def analysis(latents="two", **change):
    return {"two": node("RepeatLatentBatch", samples=["lat", 0], amount=2),
            "an": node("SVDLatentAnalysis", latents=[latents, 0], **{"k": 2, **change}),
            "p": node("PreviewImage", images=["an", 0])}


def grid(images="img", **change):
    return {"img": node("EmptyImage", width=16, height=16, batch_size=3, color=0),
            "g": node("LabelledImageGrid", images=[images, 0], **{"labels": "a,b,c", "columns": 0, **change}),
            "p": node("PreviewImage", images=["g", 0])}


def saved(filename, overwrite=False):
    return {"sv": node("SaveDirections", directions=["d", 0], filename=filename, overwrite=overwrite)}


NAN_LATENT = {"nan": node("LatentMultiply", samples=["lat", 0], multiplier=math.nan)}
VIDEO_LATENT = {"video": node("EmptyHunyuanLatentVideo", width=64, height=64, length=5, batch_size=1)}
WIDE_LATENT = {"sd3": node("EmptySD3LatentImage", width=64, height=64, batch_size=1)}
BIG_LATENT = {"big": node("EmptyLatentImage", width=128, height=128, batch_size=1)}
SDXL_SET = {"mx": node("TinyUNetLoader", family="sdxl", model_channels=32, seed=0),
            "dx": node("DiscoverAttentionEigendirections", model=["mx", 0], layers="all", count=2, method="whitened",
                       token_variance=1.0)}
TWO_MASKS = {"imgs": node("EmptyImage", width=64, height=64, batch_size=2, color=0xFFFFFF),
             "masks": node("ImageToMask", image=["imgs", 0], channel="red"),
             "three": node("EmptyLatentImage", width=64, height=64, batch_size=3)}


def rejected(node_id, input_name):
    return ("rejected", node_id, input_name)


def failed(pattern):
    return ("failed", pattern)


CASES = {
    # Discover Attention Eigendirections
    "discover token_variance nan": (discover(token_variance=math.nan), failed(r"token_variance: nan is not a finite")),
    "discover token_variance inf": (discover(token_variance=math.inf), rejected("d", "token_variance")),
    "discover token_variance negative": (discover(token_variance=-1.0), rejected("d", "token_variance")),
    "discover count 0": (discover(count=0), rejected("d", "count")),
    "discover count too many": (discover(count=5000), rejected("d", "count")),
    "discover count above width": (discover(count=100), failed(r"count: 100 is more than the width of")),
    "discover unknown layers": (discover(layers="nonsense"), failed(r"layers: 'nonsense' names none of the layers")),
    "discover unknown method": (discover(method="magic"), rejected("d", "method")),
    "discover no model": ({"d": node("DiscoverAttentionEigendirections", layers="all", count=2, method="value",
                                     token_variance=1.0), "p": node("PreviewImage", images=["d", 1])},
                          rejected("d", "model")),
    "discover model of another type": (discover(model=["pos", 0]), rejected("d", "model")),
    # Apply Direction
    "apply alpha nan": (applied(alpha=math.nan), failed(r"alpha: nan is not a finite number")),
    "apply alpha too large": (applied(alpha=1000.0), rejected("a", "alpha")),
    "apply start nan": (applied(start_percent=math.nan), failed(r"start_percent: nan is not a finite")),
    "apply end nan": (applied(end_percent=math.nan), failed(r"end_percent: nan is not a finite")),
    "apply reversed range": (applied(start_percent=0.7, end_percent=0.2), failed(r"start_percent \(0.7\) is after")),
    "apply start below 0": (applied(start_percent=-0.1), rejected("a", "start_percent")),
    "apply index out of range": (applied(index=4), failed(r"index: 4 is out of range; this set has 2")),
    "apply index negative": (applied(index=-1), rejected("a", "index")),
    "apply unknown layer": (applied(layer="bogus"), failed(r"layer: 'bogus' names none of the layers")),
    "apply h_space not in set": (applied(layer="h_space"), failed(r"layer: 'h_space' names none of the layers")),
    "apply unknown pass": (applied(apply_to="sideways"), rejected("a", "apply_to")),
    "apply alpha_list word": (applied(alpha_list="1, two"), failed(r"alpha_list: 'two' is not a number")),
    "apply alpha_list nan": (applied(alpha_list="1, nan"), failed(r"alpha_list: nan is not finite")),
    "apply alpha_list too long": (applied(alpha_list="1, 2, 3"),
                                  failed(r"alpha_list: 3 values for a latent batch of 1 images")),
    "apply mask nan": ({"mk": node("SolidMask", value=math.nan, width=64, height=64), **applied(mask=["mk", 0])},
                       failed(r"mask: the mask's values hold NaN")),
    "apply masks for another batch": ({**TWO_MASKS, **applied("three", mask=["masks", 0])},
                                      failed(r"mask: 2 masks for a latent batch of 3 images")),
    "apply sdxl set on sd15": ({**SDXL_SET, **applied(directions=["dx", 0])},
                               failed(r"directions: made for SDXL but this model is SD15")),
    "apply file of other widths": ({"ld": node("LoadDirections", file="seed.safetensors"),
                                    **applied(directions=["ld", 0], layer="input_blocks.7")},
                                   failed(r"directions: input_blocks\.7\.1\.transformer_blocks\.0\.attn1 has width")),
    "apply no directions": (applied() | {"a": node(
        "ApplyDirection", model=["m", 0], index=0, layer="all", alpha=0.5, start_percent=0.0, end_percent=1.0,
        apply_to="both")}, rejected("a", "directions")),
    # Project Out Directions
    "project out another model's set": ({**SDXL_SET, **projected(remove=["dx", 0])},
                                        failed(r"remove: made for SDXL \(\w+\) but directions are for SD15")),
    "project a set out of itself": (projected(), failed(r"directions: #0, #1 at \S+ lie within remove's directions")),
    # Asyrp Sampler
    "asyrp eta nan": (asyrp(boost_eta=math.nan), failed(r"boost_eta: nan is not a finite number")),
    "asyrp eta above 1": (asyrp(boost_eta=2.0), rejected("s", "boost_eta")),
    "asyrp start nan": (asyrp(boost_start_percent=math.nan), failed(r"boost_start_percent: nan is not a finite")),
    "asyrp eta on a flow model": ({"flow": node("ModelSamplingSD3", model=["m", 0], shift=3.0),
                                   **asyrp(model="flow", boost_eta=0.5)},
                                  failed(r"boost_eta: noise boosting needs a noise-prediction model")),
    "asyrp nan latent": ({**NAN_LATENT, **asyrp()} | {"c": node(
        "SamplerCustom", model=["m", 0], add_noise=False, noise_seed=0, cfg=1.0, positive=["pos", 0],
        negative=["neg", 0], sampler=["s", 0], sigmas=["sig", 0], latent_image=["nan", 0])},
        failed(r"latent_image: the latent's values hold NaN")),
    # DDIM Invert and the DDIM Inversion Sampler
    "invert nan latent": ({**NAN_LATENT, **inverted("nan")}, failed(r"latent: the latent's values hold NaN")),
    "invert video latent": ({**VIDEO_LATENT, **inverted("video")},
                            failed(r"latent: this SD15 model takes 4-D latents .* video latents need a video model")),
    "invert 16-channel latent": ({**WIDE_LATENT, **inverted("sd3")},
                                 failed(r"latent: 16 channels, but this SD15 model's latents have 4")),
    "invert conditioning of another encoder": (
        {"wide": node("TinyConditioning", seed=1, context_dim=64, tokens=77), **inverted(positive="wide")},
        failed(r"positive: the conditioning is 64 wide but this SD15 model takes 32")),
    "invert negative of another encoder": (
        {"wide": node("TinyConditioning", seed=1, context_dim=48, tokens=77),
         **inverted(cfg=2.0, negative=["wide", 0])}, failed(r"negative: the conditioning is 48 wide")),
    "invert nan conditioning": (
        {"avg": node("ConditioningAverage", conditioning_to=["pos", 0], conditioning_from=["neg", 0],
                     conditioning_to_strength=math.nan), **inverted(positive="avg")},
        failed(r"positive: the conditioning holds NaN")),
    "invert cfg nan": (inverted(cfg=math.nan), failed(r"cfg: nan is not a finite number")),
    "invert cfg without negative": (inverted(cfg=2.0), failed(r"negative: cfg 2 guides away from a negative prompt")),
    "invert cfg too high": (inverted(cfg=50.0), rejected("inv", "cfg")),
    "invert steps 0": (inverted(steps=0), rejected("inv", "steps")),
    "invert refine too high": (inverted(refine=21), rejected("inv", "refine")),
    "invert unknown scheduler": (inverted(scheduler="bogus"), rejected("inv", "scheduler")),
    "invert img-to-img model": ({"i2i": node("ModelSamplingDiscrete", model=["m", 0], sampling="img_to_img",
                                             zsnr=False), **inverted(model="i2i")},
                                failed(r"model: its sampling type IMG_TO_IMG starts from an image")),
    "invert no positive": ({"inv": node("DDIMInvert", model=["m", 0], latent=["lat", 0], steps=2, scheduler="normal",
                                        cfg=1.0, refine=1), **save_latent(["inv", 0])}, rejected("inv", "positive")),
    "inversion sampler refine negative": ({"is": node("DDIMInversionSampler", refine=-1),
                                           **asyrp()} | {"c": node(
                                               "SamplerCustom", model=["m", 0], add_noise=False, noise_seed=0, cfg=1.0,
                                               positive=["pos", 0], negative=["neg", 0], sampler=["is", 0],
                                               sigmas=["sig", 0], latent_image=["lat", 0])},
                                          rejected("is", "refine")),
    "inversion sampler descending sigmas": ({"is": node("DDIMInversionSampler", refine=1), **asyrp()} | {"c": node(
        "SamplerCustom", model=["m", 0], add_noise=False, noise_seed=0, cfg=1.0, positive=["pos", 0],
        negative=["neg", 0], sampler=["is", 0], sigmas=["sig", 0], latent_image=["lat", 0])},
        failed(r"sigmas: inversion walks the schedule upward; put FlipSigmas")),
    "inversion sampler nan latent": ({**NAN_LATENT, "is": node("DDIMInversionSampler", refine=1), **asyrp()} | {
        "flip": node("FlipSigmas", sigmas=["sig", 0]), "c": node(
            "SamplerCustom", model=["m", 0], add_noise=False, noise_seed=0, cfg=1.0, positive=["pos", 0],
            negative=["neg", 0], sampler=["is", 0], sigmas=["flip", 0], latent_image=["nan", 0])},
        failed(r"latent_image: the latent's values hold NaN")),
    "inversion sampler flow schedule ending at 1": (
        {"flow": node("ModelSamplingSD3", model=["m", 0], shift=3.0), "is": node("DDIMInversionSampler", refine=1),
         **asyrp(model="flow")} | {"flip": node("FlipSigmas", sigmas=["sig", 0]), "c": node(
             "SamplerCustom", model=["flow", 0], add_noise=False, noise_seed=0, cfg=1.0, positive=["pos", 0],
             negative=["neg", 0], sampler=["is", 0], sigmas=["flip", 0], latent_image=["lat", 0])},
        failed(r"sigmas: this flow-matching schedule ends at sigma 1")),
    # SVD Latent Attribute, Explore, Analysis
    "attribute sizes differ": ({**BIG_LATENT, **attribute(target="big")}, failed(r"target: shape \[1, 4, 16, 16\]")),
    "attribute k above rank": (attribute(k=100), failed(r"k: 100 is outside 0 to 8")),
    "attribute m above rank": (attribute(m=9), failed(r"m: 9 is outside 0 to 8")),
    "attribute k too large": (attribute(k=5000), rejected("attr", "k")),
    "attribute target_weight nan": (attribute(target_weight=math.nan), failed(r"target_weight: nan is not a finite")),
    "attribute source_values_weight nan": (attribute(source_values_weight=math.nan),
                                           failed(r"source_values_weight: nan is not a finite")),
    "attribute negative weight": (attribute(source_weight=-1.0), rejected("attr", "source_weight")),
    "attribute all weights zero": (attribute(target_weight=0.0, source_weight=0.0, target_values_weight=0.0,
                                             source_values_weight=0.0), failed(r"loss weights: expected finite")),
    "attribute k and m zero": (attribute(k=0, m=0), failed(r"k, m: both are 0")),
    "attribute iterations 0": (attribute(iterations=0), rejected("attr", "iterations")),
    "attribute nan source": ({**NAN_LATENT, **attribute(source="nan")}, failed(r"source: the latent holds NaN")),
    "attribute video source": ({**VIDEO_LATENT, **attribute(source="video")},
                               failed(r"source: expected a 4-D latent \[batch, channels, height, width\]")),
    "explore factor nan": (explore(factor=math.nan), failed(r"factor: nan is not a finite number")),
    "explore factor_list word": (explore(factor_list="0, half"), failed(r"factor_list: 'half' is not a number")),
    "explore index above rank": (explore(index=100), failed(r"index: 100 is outside 0 to 7")),
    "explore channel above channels": (explore(channel=10), failed(r"channel: 10 is outside 0 to 3")),
    "explore channel below -1": (explore(channel=-2), rejected("x", "channel")),
    "explore nan latent": ({**NAN_LATENT, **explore("nan")}, failed(r"latent: the latent holds NaN")),
    "analysis one latent": (analysis(latents="lat"), failed(r"latents: expected at least 2 latents")),
    "analysis k above rank": (analysis(k=100), failed(r"k: 100 is outside")),
    "analysis nan latents": ({**NAN_LATENT, **analysis(latents="nan")}, failed(r"latents: the latent holds NaN")),
    # Directions from samples, pairs and images
    "pca one image": (from_samples(latent="lat"), failed(r"latent: principal directions need a batch of at least 2")),
    "pca no step in range": (from_samples(start_percent=0.5, end_percent=0.5),
                             failed(r"start_percent, end_percent: no sampling step fell inside this range")),
    "pca unknown site": (from_samples(site="output_blocks.99"), failed(r"site: 'output_blocks.99' names none")),
    "pca nan latent": ({**NAN_LATENT, **from_samples(latent="nan")}, failed(r"latent: the latent's values hold NaN")),
    "pair prompts of other lengths": (prompt_pair(target="long"),
                                      failed(r"target: its conditioning has shape \[\[1, 154, 32\]\]")),
    "pair of equal prompts": (prompt_pair(), failed(r"target: its activations equal the source's at this site")),
    "jacobian percent nan": (from_image(percent=math.nan), failed(r"percent: nan is not a finite number")),
    "jacobian percent above 1": (from_image(percent=2.0), rejected("jac", "percent")),
    "jacobian percent at the schedule's end": (from_image(percent=1.0), rejected("jac", "percent")),
    # Labelled Image Grid
    "grid labels for another batch": (grid(labels="a,b"), failed(r"labels: 2 labels for 3 images")),
    "grid nan images": ({"blend": node("ImageBlend", image1=["img", 0], image2=["img", 0], blend_factor=math.nan,
                                       blend_mode="normal"), **grid(images="blend")},
                        failed(r"images: the images' pixels hold NaN")),
    "grid columns negative": (grid(columns=-1), rejected("g", "columns")),
    # Save Directions and Load Directions
    "save parent folder": (saved("../escape"), failed(r"filename: file name '../escape' is not allowed")),
    "save absolute path": (saved("/tmp/semdir-escape"), failed(r"filename: file name '/tmp/semdir-escape' is not")),
    "save backslashes": (saved("..\\..\\escape"), failed(r"filename: file name .* is not allowed")),
    "save name too long": (saved("a" * 5000), failed(r"filename: file name is 5000 characters long")),
    "save part too long": (saved("a" * 300), failed(r"filename: file name part 'a+'\.\.\. is 300 characters")),
    "save reserved name": (saved("CON"), failed(r"filename: file name 'CON' is reserved on Windows")),
    "save reserved name with extension": (saved("sub/LPT1.txt"), failed(r"filename: file name 'LPT1.txt' is reserv")),
    "save empty name": (saved("  "), failed(r"filename: file name is empty")),
    "save control character": (saved("a\x00b"), failed(r"filename: file name .* is not allowed")),
    "save over an existing file": (saved("seed"), failed(r"filename: seed.safetensors: a file of that name exists")),
    "load a file not in the list": ({"ld": node("LoadDirections", file="missing.safetensors"),
                                     **applied(directions=["ld", 0])}, rejected("ld", "file")),
    "load a path outside": ({"ld": node("LoadDirections", file="../../../etc/passwd"),
                             **applied(directions=["ld", 0])}, rejected("ld", "file")),
    "load a damaged file": ({"ld": node("LoadDirections", file="damaged.safetensors"),
                             **applied(directions=["ld", 0])},
                            failed(r"file: damaged.safetensors: not a readable safetensors file")),
    "load a foreign safetensors file": ({"ld": node("LoadDirections", file="foreign.safetensors"),
                                         **applied(directions=["ld", 0])},
                                        failed(r"file: foreign.safetensors: no 'semantic_directions' metadata")),
    "load a file from a newer pack": ({"ld": node("LoadDirections", file="newer.safetensors"),
                                       **applied(directions=["ld", 0])},
                                      failed(r"file: newer.safetensors: written with format version 99, newer")),
    "load a pickle": ({"ld": node("LoadDirections", file="renamed.safetensors"), **applied(directions=["ld", 0])},
                      failed(r"file: renamed.safetensors: this is a PyTorch pickle")),
}


def files_outside_writable(base: Path) -> set:
    return {str(path.relative_to(base)) for path in base.rglob("*")
            if path.is_file() and path.name != LOG
            and not any(str(path.relative_to(base)).startswith(folder + "/") for folder in WRITABLE)}


@pytest.fixture(scope="module")
def battery(start_server):
    """A server of its own (the files it adds stay out of the shared server's folder)."""
    with start_server() as (url, base, _):
        yield prepared(url, base)


def prepared(url, base):
    folder = base / "models" / "directions"
    (folder / "damaged.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    (folder / "renamed.safetensors").write_bytes(b"\x80\x02}q\x00.")
    save_file({"weight": torch.zeros(2)}, str(folder / "foreign.safetensors"), metadata={"format": "pt"})
    newer = json.loads(safe_open(str(folder / "seed.safetensors"), "pt").metadata()[METADATA_KEY])
    with safe_open(str(folder / "seed.safetensors"), "pt") as seed:
        tensors = {key: seed.get_tensor(key) for key in seed.keys()}
    save_file(tensors, str(folder / "newer.safetensors"),
              metadata={METADATA_KEY: json.dumps({**newer, "format_version": 99})})
    return url, base, files_outside_writable(base)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_by_name(battery, case):
    url, base, before = battery
    case_nodes, expected = CASES[case]
    rejection, entry = submitted(url, {**BASE, **case_nodes})
    if expected[0] == "rejected":
        _, node_id, input_name = expected
        assert rejection is not None, f"ran instead of being rejected: {entry and entry['status']}"
        errors = rejection["node_errors"].get(node_id, {}).get("errors", [])
        named = [e for e in errors if e.get("extra_info", {}).get("input_name") == input_name]
        assert named, rejection
    else:
        assert rejection is None, rejection
        assert entry["status"]["status_str"] == "error", entry["status"]
        error = next(data for event, data in entry["status"]["messages"] if event == "execution_error")
        message = error["exception_message"]
        assert "\n" not in message.strip() and len(message) < 400, message
        assert re.match(expected[1], message), message
    assert requests.get(f"{url}/system_stats", timeout=10).ok
    assert files_outside_writable(base) == before
    assert not Path("/tmp/semdir-escape.safetensors").exists()
