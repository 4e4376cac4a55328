"""Writes the example workflows in workflows/ (ComfyUI's UI format) from the short descriptions below.

Each description names nodes, their widget values and their links; the host's own node registry
supplies every node's inputs, outputs and widget order, so the files always match the nodes.
Run it after changing a description or a node's inputs (`make workflows`); a test checks the
checked-in files equal what it writes.
"""
import json
import tempfile
import uuid
from pathlib import Path

from scripts.workflow_format import MUTED, extra_widget_value, is_widget

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
SDXL_CHECKPOINT = "sd_xl_base_1.0.safetensors"
FLUX_MODEL, FLUX_VAE = "flux1-dev.safetensors", "ae.safetensors"
FLUX_TEXT_ENCODERS = ("clip_l.safetensors", "t5xxl_fp16.safetensors")
COLUMN = 380
NOTE_COLOUR = {"color": "#432", "bgcolor": "#653"}


class Node:
    def __init__(self, graph, node_id, node_type, pos, values, title=None):
        self.graph, self.id, self.type, self.pos = graph, node_id, node_type, pos
        self.values, self.title = values, title
        self.inputs, self.widgets, self.outputs, self.mode = [], [], [], 0

    def __getitem__(self, output):
        """node["IMAGE"] or node[1]: one of this node's outputs, to link to another node's input."""
        names = [slot["name"] for slot in self.outputs]
        return self, names.index(output) if isinstance(output, str) else output


class Graph:
    def __init__(self, registry):
        self.registry, self.nodes, self.links, self.groups = registry, [], [], []

    def add(self, node_type, at, title=None, /, **values) -> Node:
        """A node at ``at`` = (column, y) with an optional title; ``values`` are its widget values and
        links (another node's output, e.g. checkpoint["MODEL"]) by input name."""
        node = Node(self, len(self.nodes) + 1, node_type, [at[0] * COLUMN, at[1]], values, title)
        cls = self.registry[node_type]
        spec = cls.INPUT_TYPES()
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node.outputs = [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (name, kind) in enumerate(zip(names, cls.RETURN_TYPES))]
        for group in ("required", "optional"):
            for name, config in spec.get(group, {}).items():
                value = values.pop(name, None)
                if is_widget(config):
                    if value is None:
                        value = config[1]["default"] if len(config) > 1 and "default" in config[1] else config[0][0]
                    node.widgets.append(value)
                    if extra_widget_value(name, config) is not None:
                        node.widgets.append(extra_widget_value(name, config))
                elif value is not None or group == "required":
                    node.inputs.append({"name": name, "type": config[0], "link": None})
                    if value is not None:
                        self._link(value, node, len(node.inputs) - 1)
        if values:
            raise ValueError(f"{node_type} has no inputs {sorted(values)}")
        self.nodes.append(node)
        return node

    def note(self, text, at, width=340, height=160):
        node = Node(self, len(self.nodes) + 1, "MarkdownNote", [at[0] * COLUMN, at[1]], {})
        node.widgets, node.size = [text], [width, height]
        self.nodes.append(node)
        return node

    def _link(self, source, target, slot):
        origin, index = source
        link_id = len(self.links) + 1
        kind = origin.outputs[index]["type"]
        self.links.append([link_id, origin.id, index, target.id, slot, kind])
        origin.outputs[index]["links"].append(link_id)
        target.inputs[slot]["link"] = link_id

    def group(self, title, *members, colour="#3f789e"):
        left = min(n.pos[0] for n in members) - 20
        top = min(n.pos[1] for n in members) - 60
        right = max(n.pos[0] + size(n)[0] for n in members) + 20
        bottom = max(n.pos[1] + size(n)[1] for n in members) + 20
        self.groups.append({"id": len(self.groups) + 1, "title": title,
                            "bounding": [left, top, right - left, bottom - top],
                            "color": colour, "font_size": 24, "flags": {}})

    def ui(self, name: str) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            entry = {"id": node.id, "type": node.type, "pos": node.pos, "size": size(node), "flags": {},
                     "order": order, "mode": node.mode, "inputs": node.inputs,
                     "outputs": [{**slot, "links": slot["links"] or None} for slot in node.outputs],
                     "properties": {"Node name for S&R": node.type} if node.type != "MarkdownNote" else {},
                     "widgets_values": node.widgets}
            if node.title is not None:
                entry["title"] = node.title
            if node.type == "MarkdownNote":
                entry.update(NOTE_COLOUR)
            nodes.append(entry)
        return {"id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-semantic-directions/{name}")), "revision": 0,
                "last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.75, "offset": [40, 80]}}, "version": 0.4}


def size(node) -> list:
    if hasattr(node, "size"):
        return node.size
    rows = max(len(node.inputs), len(node.outputs)) + len(node.widgets)
    height = 46 + 24 * rows + (260 if node.type in ("LoadImage", "SaveImage", "PreviewImage") else 0)
    return [320, height]


def photo_inverted(g, description: str, steps: int) -> tuple:
    """Column 0 to 2: the checkpoint, the photo, its description and an empty negative, its encoding, and DDIM
    Invert with the unedited model at cfg 1."""
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    image = g.add("LoadImage", (0, 200), image="example.png")
    describe = g.add("CLIPTextEncode", (1, 0), "Describe the photo", clip=checkpoint["CLIP"], text=description)
    empty = g.add("CLIPTextEncode", (1, 260), "Empty negative", clip=checkpoint["CLIP"], text="")
    encode = g.add("VAEEncode", (1, 440), pixels=image["IMAGE"], vae=checkpoint["VAE"])
    invert = g.add("DDIMInvert", (2, 0), model=checkpoint["MODEL"], latent=encode["LATENT"], steps=steps,
                   scheduler="normal", cfg=1.0, refine=2, positive=describe["CONDITIONING"])
    return checkpoint, image, describe, empty, encode, invert


def square_mask(g, column: int, side: int, x: int, y: int) -> tuple:
    """A 512 px mask, 1 inside a square of ``side`` at (x, y): the canvas, the square and their composite."""
    canvas = g.add("SolidMask", (column, 0), value=0.0, width=512, height=512)
    square = g.add("SolidMask", (column, 180), value=1.0, width=side, height=side)
    return canvas, square, g.add("MaskComposite", (column, 360), destination=canvas["MASK"], source=square["MASK"],
                                 x=x, y=y, operation="add")


def edit_real_image(registry) -> Graph:
    """Workflow 2: invert a photo with the unedited model, edit inside a mask, sample back beside the
    unedited reconstruction."""
    g = Graph(registry)
    checkpoint, image, describe, empty, encode, invert = photo_inverted(g, "a photo of a woman with long hair, "
                                                                        "outdoors", steps=50)
    discover = g.add("DiscoverAttentionEigendirections", (3, 0), model=checkpoint["MODEL"], layers="all", count=10,
                     method="whitened", token_variance=1.0)
    preview_spectrum = g.add("PreviewImage", (3, 240), images=discover["spectrum"])
    canvas, square, mask = square_mask(g, 4, 256, 128, 128)
    edit = g.add("ApplyDirection", (5, 0), model=checkpoint["MODEL"], directions=discover["directions"], index=0,
                 layer="all", alpha=0.4, start_percent=0.0, end_percent=0.5, apply_to="both", mask=mask["MASK"])
    samplers = {}
    for row, (name, model) in enumerate((("edited", edit["MODEL"]), ("reconstruction", checkpoint["MODEL"]))):
        samplers[name] = g.add("KSamplerAdvanced", (6, row * 420), f"Sample back: {name}", model=model,
                               add_noise="disable", noise_seed=0, steps=50, cfg=1.0, sampler_name="ddim",
                               scheduler="normal", positive=describe["CONDITIONING"], negative=empty["CONDITIONING"],
                               latent_image=invert["latent"], start_at_step=0, end_at_step=10000,
                               return_with_leftover_noise="disable")
    saves = []
    for row, name in enumerate(("edited", "reconstruction")):
        decoded = g.add("VAEDecode", (7, row * 420), samples=samplers[name]["LATENT"], vae=checkpoint["VAE"])
        saves.append(g.add("SaveImage", (8, row * 420), images=decoded["IMAGE"], filename_prefix=f"semdir_{name}"))
    notes = [
        g.note("**1. Load** an SD1.5 checkpoint and your photo (about 512 px). Describe the photo in the prompt.",
               (0, -220)),
        g.note("**2. Invert with the UNEDITED model** (straight from the checkpoint), cfg 1. refine 2 removes "
               "nearly all of plain DDIM inversion's drift; use the same steps and scheduler when sampling back.",
               (2, -220)),
        g.note("**3. Edit inside the mask.** The square is where the edit acts: change the MaskComposite x, y or "
               "paint a mask in LoadImage (right-click, Open in MaskEditor) and connect its MASK instead. Try "
               "other `index` values and alphas from -1 to 1; the range 0-0.5 edits structure.", (4, -220)),
        g.note("**4. Sample back** with **add_noise: disable**, the same steps and scheduler, sampler ddim, cfg 1. "
               "With alpha 0 the edited image equals the reconstruction.", (6, -220)),
    ]
    g.group("1. Load", checkpoint, image, notes[0])
    g.group("2. Invert (unedited model)", describe, empty, encode, invert, notes[1])
    g.group("3. Directions, mask and edit", discover, preview_spectrum, canvas, square, mask, edit, notes[2])
    g.group("4. Sample back (add_noise: disable) and save", *samplers.values(), *saves, notes[3])
    return g


PORTRAIT = "a portrait photo of a person, natural light, detailed"
NEGATIVE = "blurry, lowres, deformed"
SWEEP = "-1, -0.5, 0, 0.5, 1"


def prompts(g, checkpoint, column, positive=PORTRAIT):
    return (g.add("CLIPTextEncode", (column, 0), "Prompt", clip=checkpoint["CLIP"], text=positive),
            g.add("CLIPTextEncode", (column, 260), "Negative prompt", clip=checkpoint["CLIP"], text=NEGATIVE))


def discover_and_sweep(registry, checkpoint_name=SD15_CHECKPOINT, size=512, family="SD1.5") -> Graph:
    """Workflow 1 (and 5 for SDXL): directions from the weights, one sampler call renders a strength
    sweep as a batch, the grid labels it; the spectrum says how many directions matter."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=checkpoint_name)
    positive, negative = prompts(g, checkpoint, 1)
    discover = g.add("DiscoverAttentionEigendirections", (2, 0), model=checkpoint["MODEL"], layers="all", count=10,
                     method="whitened", token_variance=1.0)
    spectrum = g.add("PreviewImage", (2, 240), images=discover["spectrum"])
    edit = g.add("ApplyDirection", (3, 0), model=checkpoint["MODEL"], directions=discover["directions"], index=0,
                 layer="all", alpha=0.5, start_percent=0.0, end_percent=0.6, apply_to="both", alpha_list=SWEEP)
    latent = g.add("EmptyLatentImage", (3, 420), width=size, height=size, batch_size=5)
    same_noise = g.add("LatentBatchSeedBehavior", (3, 600), samples=latent["LATENT"], seed_behavior="fixed")
    sampler = g.add("KSampler", (4, 0), model=edit["MODEL"], seed=42, steps=25, cfg=7.0, sampler_name="euler",
                    scheduler="normal", positive=positive["CONDITIONING"], negative=negative["CONDITIONING"],
                    latent_image=same_noise["LATENT"], denoise=1.0)
    decoded = g.add("VAEDecode", (5, 0), samples=sampler["LATENT"], vae=checkpoint["VAE"])
    grid = g.add("LabelledImageGrid", (5, 160), images=decoded["IMAGE"], labels=SWEEP, columns=0)
    save = g.add("SaveImage", (6, 0), images=grid["IMAGE"], filename_prefix="semdir_sweep")
    notes = [
        g.note(f"**1. Load** a {family} checkpoint and write a prompt.", (0, -220)),
        g.note("**2. Discover** directions from the attention weights alone (well under a second). The spectrum "
               "shows how fast each layer's gains fall: the first few directions matter most.", (2, -220)),
        g.note("**3. Sweep** direction `index` over the alphas in `alpha_list`: image i of the batch gets value i, "
               "so keep EmptyLatentImage's batch_size equal to the list's length; LatentBatchSeedBehavior (fixed) "
               "gives every image the same noise, so only alpha differs. Try other indices, and `layer` such as "
               "input_blocks.8 or middle_block for more local or global edits.", (3, -220)),
        g.note("**4. The grid** labels each image with its alpha; alpha 0 is the unedited image.", (5, -220)),
    ]
    g.group("1. Load and prompt", checkpoint, positive, negative, notes[0])
    g.group("2. Discover", discover, spectrum, notes[1])
    g.group("3. Sweep", edit, latent, same_noise, sampler, notes[2])
    g.group("4. Grid", decoded, grid, save, notes[3])
    return g


def asyrp_edit(registry) -> Graph:
    """Workflow 3: Apply Direction on an encoder layer, sampled with the Asyrp asymmetric step through
    SamplerCustomAdvanced, beside the same seed unedited."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    positive, negative = prompts(g, checkpoint, 1)
    discover = g.add("DiscoverAttentionEigendirections", (2, 0), model=checkpoint["MODEL"], layers="input_blocks.8",
                     count=10, method="whitened", token_variance=1.0)
    edit = g.add("ApplyDirection", (2, 240), model=checkpoint["MODEL"], directions=discover["directions"], index=0,
                 layer="input_blocks.8", alpha=0.6, start_percent=0.0, end_percent=0.5, apply_to="both")
    noise = g.add("RandomNoise", (3, 0), noise_seed=7)
    asyrp = g.add("AsyrpSampler", (3, 140), boost_eta=0.0, boost_start_percent=0.8)
    schedule = g.add("BasicScheduler", (3, 280), model=checkpoint["MODEL"], scheduler="normal", steps=40, denoise=1.0)
    latent = g.add("EmptyLatentImage", (3, 460), width=512, height=512, batch_size=1)
    columns = []
    for row, (name, model) in enumerate((("edited", edit["MODEL"]), ("unedited", checkpoint["MODEL"]))):
        guider = g.add("CFGGuider", (4, row * 420), f"Guider: {name}", model=model,
                       positive=positive["CONDITIONING"], negative=negative["CONDITIONING"], cfg=7.0)
        sample = g.add("SamplerCustomAdvanced", (5, row * 420), f"Sample: {name}", noise=noise["NOISE"],
                       guider=guider["GUIDER"], sampler=asyrp["SAMPLER"], sigmas=schedule["SIGMAS"],
                       latent_image=latent["LATENT"])
        decoded = g.add("VAEDecode", (6, row * 420), samples=sample["output"], vae=checkpoint["VAE"])
        columns += [guider, sample, decoded, g.add("SaveImage", (7, row * 420), images=decoded["IMAGE"],
                                                   filename_prefix=f"semdir_asyrp_{name}")]
    notes = [
        g.note("**1. Discover and apply** a direction at an encoder layer, on the first half of sampling. For "
               "h-space (`h_space`), take directions from Directions From Samples or a pair node (see the "
               "named_direction workflow).", (2, -220)),
        g.note("**2. Asyrp Sampler**: on the edited steps x0 comes from the edited model and the noise direction "
               "from the unedited one, in one batched UNet call; elsewhere it is plain DDIM. The unedited row "
               "uses the same noise and sampler.", (3, -220)),
    ]
    g.group("1. Load and prompt", checkpoint, positive, negative)
    g.group("2. Discover and apply", discover, edit, notes[0])
    g.group("3. Asyrp sampling", noise, asyrp, schedule, latent, notes[1])
    g.group("4. Edited and unedited", *columns)
    return g


def prompt_pair(g, checkpoint, source_text: str, target_text: str, batch: int):
    """Column 1: a source prompt, the target prompt (the attribute), the negative prompt and an empty latent."""
    return (g.add("CLIPTextEncode", (1, 0), "Source prompt", clip=checkpoint["CLIP"], text=source_text),
            g.add("CLIPTextEncode", (1, 260), "Target prompt (the attribute)", clip=checkpoint["CLIP"],
                  text=target_text),
            g.add("CLIPTextEncode", (1, 520), "Negative prompt", clip=checkpoint["CLIP"], text=NEGATIVE),
            g.add("EmptyLatentImage", (1, 780), width=512, height=512, batch_size=batch))


def svd_attribute(registry) -> Graph:
    """Workflow 4: a prompt pair sampled part way with the same seed, the attribute moved through the
    latents' singular values, sampling resumed with the source prompt; the spectra of the source's
    trajectory plotted."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    source_prompt, target_prompt, negative, latent = prompt_pair(
        g, checkpoint, "a photo of a man, portrait, natural light",
        "a photo of a man with glasses, portrait, natural light", 1)

    def advanced(title, prompt, latent_in, at, start, end):
        """KSamplerAdvanced over steps start..end of 30: from the start it adds the seed's noise and keeps
        the leftover noise; from step 12 it resumes such a latent to the end."""
        partial = start == 0
        return g.add("KSamplerAdvanced", at, title, model=checkpoint["MODEL"],
                     add_noise="enable" if partial else "disable", noise_seed=3, steps=30, cfg=7.0,
                     sampler_name="ddim", scheduler="normal", positive=prompt["CONDITIONING"],
                     negative=negative["CONDITIONING"], latent_image=latent_in, start_at_step=start, end_at_step=end,
                     return_with_leftover_noise="enable" if partial else "disable")

    def partial(title, prompt, end, at):
        return advanced(title, prompt, latent["LATENT"], at, 0, end)

    def resume(title, prompt, latent_in, at):
        return advanced(title, prompt, latent_in, at, 12, 10000)
    source = partial("Source to step 12", source_prompt, 12, (2, 0))
    target = partial("Target to step 12", target_prompt, 12, (2, 420))
    attribute = g.add("SVDLatentAttribute", (3, 0), source=source["LATENT"], target=target["LATENT"], k=16, m=8,
                      target_weight=1.0, source_weight=1.0, target_values_weight=0.1, source_values_weight=0.1,
                      iterations=300, seed=0, keep_rest=True)
    outputs = []
    for row, (name, latent_in) in enumerate((("edited", attribute["LATENT"]), ("original", source["LATENT"]))):
        resumed = resume(f"Resume with the source prompt: {name}", source_prompt, latent_in, (4, row * 420))
        decoded = g.add("VAEDecode", (5, row * 420), samples=resumed["LATENT"], vae=checkpoint["VAE"])
        outputs += [resumed, decoded, g.add("SaveImage", (6, row * 420), images=decoded["IMAGE"],
                                            filename_prefix=f"semdir_svd_{name}")]
    early = partial("Source to step 6", source_prompt, 6, (2, 920))
    late = partial("Source to step 18", source_prompt, 18, (2, 1340))
    first_two = g.add("LatentBatch", (3, 920), samples1=early["LATENT"], samples2=source["LATENT"])
    trajectory = g.add("LatentBatch", (3, 1060), samples1=first_two["LATENT"], samples2=late["LATENT"])
    analysis = g.add("SVDLatentAnalysis", (4, 920), latents=trajectory["LATENT"], k=8)
    plot = g.add("PreviewImage", (5, 920), images=analysis["IMAGE"])
    notes = [
        g.note("**1. Two prompts, one seed**: the source and the target differ only in the attribute. Both stop "
               "at step 12 of 30 with their leftover noise.", (1, -220)),
        g.note("**2. SVD Latent Attribute** keeps the source's leading singular vectors and takes m from the "
               "target; a small MLP fits their values. Raise m or target_weight for a stronger attribute, "
               "source_weight to keep more of the original.", (3, -220)),
        g.note("**3. Resume with the SOURCE prompt** from the same step (add_noise: disable), beside the "
               "unedited original.", (4, -220)),
        g.note("**Analysis**: the source at steps 6, 12 and 18; the leading subspaces settle early.", (4, 1060)),
    ]
    g.group("1. Prompt pair to step 12", checkpoint, source_prompt, target_prompt, negative, latent, source, target,
            notes[0])
    g.group("2. Attribute", attribute, notes[1])
    g.group("3. Resume and save", *outputs, notes[2])
    g.group("Analysis of the source's trajectory", early, late, first_two, trajectory, analysis, plot, notes[3])
    return g


def save_and_reuse(registry) -> Graph:
    """Workflow 6: discover once and save; load the file and apply it on another seed. The load group
    starts muted: run once, refresh (R), unmute it (Ctrl+M) and run again."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    positive, negative = prompts(g, checkpoint, 1)
    discover = g.add("DiscoverAttentionEigendirections", (2, 0), model=checkpoint["MODEL"], layers="all", count=10,
                     method="whitened", token_variance=1.0)
    save = g.add("SaveDirections", (3, 0), directions=discover["directions"], filename="portrait/whitened",
                 overwrite=True)
    load = g.add("LoadDirections", (2, 420), file="portrait/whitened.safetensors")
    summary = g.add("PreviewAny", (3, 420), source=load["summary"])
    edit = g.add("ApplyDirection", (3, 640), model=checkpoint["MODEL"], directions=load["directions"], index=1,
                 layer="all", alpha=0.5, start_percent=0.0, end_percent=0.6, apply_to="both")
    latent = g.add("EmptyLatentImage", (4, 640), width=512, height=512, batch_size=1)
    sampler = g.add("KSampler", (5, 420), model=edit["MODEL"], seed=1234, steps=25, cfg=7.0, sampler_name="euler",
                    scheduler="normal", positive=positive["CONDITIONING"], negative=negative["CONDITIONING"],
                    latent_image=latent["LATENT"], denoise=1.0)
    decoded = g.add("VAEDecode", (6, 420), samples=sampler["LATENT"], vae=checkpoint["VAE"])
    image = g.add("SaveImage", (7, 420), images=decoded["IMAGE"], filename_prefix="semdir_reused")
    reuse = [load, summary, edit, latent, sampler, decoded, image]
    for node in reuse:
        node.mode = MUTED
    notes = [
        g.note("**1. Discover and save** to models/directions/portrait/whitened.safetensors (the file records the "
               "model it belongs to; loading it on another model is an error).", (2, -220)),
        g.note("**2. Reuse**: this group starts muted. After the first run press R (refresh) so Load Directions "
               "lists the file, select this group, press Ctrl+M to unmute, and run with any seed.", (4, 200)),
    ]
    g.group("1. Discover and save", checkpoint, positive, negative, discover, save, notes[0])
    g.group("2. Load and apply on another seed", *reuse, notes[1], colour="#8A8")
    return g


def named_direction(registry) -> Graph:
    """Workflow 7: a prompt pair sampled on the same seeds gives a named h-space direction; the Asyrp
    Sampler renders its sweep on a new seed, labelled."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    source, target, negative, seeds = prompt_pair(
        g, checkpoint, "a portrait photo of a person, neutral expression, natural light",
        "a portrait photo of a person, smiling, natural light", 8)
    pair = g.add("DirectionFromPromptPair", (2, 0), model=checkpoint["MODEL"], source=source["CONDITIONING"],
                 target=target["CONDITIONING"], negative=negative["CONDITIONING"], latent=seeds["LATENT"], seed=1,
                 add_noise="enable", steps=20, cfg=7.0, sampler_name="ddim", scheduler="normal", site="h_space",
                 start_percent=0.0, end_percent=0.6, source_name="neutral", target_name="smiling")
    previews = []
    for row, name in enumerate(("source_samples", "target_samples")):
        decoded = g.add("VAEDecode", (2, 620 + row * 380), f"Pair: {name.split('_')[0]}", samples=pair[name],
                        vae=checkpoint["VAE"])
        previews += [decoded, g.add("PreviewImage", (3, 620 + row * 380), images=decoded["IMAGE"])]
    sweep = seed_sweep(g, checkpoint, (source, negative), pair["directions"], 0, "semdir_named")
    notes = [
        g.note("**1. A prompt pair**: the same prompt without and with the attribute. Both are sampled on the same "
               "8 seeds, so they differ only by the attribute.", (1, -220)),
        g.note("**2. Direction From Prompt Pair** records h-space (the middle block's output) over the range you "
               "will edit in and returns the mean difference, named. alpha 1 moves h-space by the whole "
               "difference. The previews show both batches.", (2, -220)),
        g.note("**3. Sweep on a new seed** with the Asyrp Sampler (h-space edits need it): alpha -1 to 1 along "
               "the batch, all from one noise (RandomNoise + LatentBatchSeedBehavior fixed).", (6, -220)),
    ]
    g.group("1. Prompt pair", checkpoint, source, target, negative, seeds, notes[0])
    g.group("2. Named direction", pair, *previews, notes[1])
    g.group("3. Sweep with the Asyrp Sampler", *sweep, notes[2])
    return g


def seed_sweep(g, checkpoint, conditioning, directions, y: int, prefix: str) -> list:
    """A direction's first vector at h-space over 0-0.6 of the schedule, alpha -1 to 1 along a batch of five
    from one noise (seed 1234), sampled with the Asyrp Sampler at cfg 7, labelled and saved; columns 4 to 9
    from ``y``."""
    positive, negative = conditioning
    edit = g.add("ApplyDirection", (4, y), model=checkpoint["MODEL"], directions=directions, index=0,
                 layer="h_space", alpha=1.0, start_percent=0.0, end_percent=0.6, apply_to="both", alpha_list=SWEEP)
    noise = g.add("RandomNoise", (5, y), noise_seed=1234)
    asyrp = g.add("AsyrpSampler", (5, y + 140), boost_eta=0.0, boost_start_percent=0.8)
    schedule = g.add("BasicScheduler", (5, y + 280), model=checkpoint["MODEL"], scheduler="normal", steps=20,
                     denoise=1.0)
    latent = g.add("EmptyLatentImage", (6, y), width=512, height=512, batch_size=5)
    same_noise = g.add("LatentBatchSeedBehavior", (6, y + 180), samples=latent["LATENT"], seed_behavior="fixed")
    guider = g.add("CFGGuider", (6, y + 340), model=edit["MODEL"], positive=positive["CONDITIONING"],
                   negative=negative["CONDITIONING"], cfg=7.0)
    sample = g.add("SamplerCustomAdvanced", (7, y), noise=noise["NOISE"], guider=guider["GUIDER"],
                   sampler=asyrp["SAMPLER"], sigmas=schedule["SIGMAS"], latent_image=same_noise["LATENT"])
    decoded = g.add("VAEDecode", (8, y), samples=sample["output"], vae=checkpoint["VAE"])
    grid = g.add("LabelledImageGrid", (8, y + 160), images=decoded["IMAGE"], labels=SWEEP, columns=0,
                 directions=directions)
    save = g.add("SaveImage", (9, y), images=grid["IMAGE"], filename_prefix=prefix)
    return [edit, noise, asyrp, schedule, latent, same_noise, guider, sample, decoded, grid, save]


def conditional_direction(registry) -> Graph:
    """Workflow 12: two prompt pairs give an 'old' and an 'eyeglasses' h-space direction; Project Out Directions
    removes the second from the first, and both versions of 'old' are swept on a new seed."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    prompts = [g.add("CLIPTextEncode", (1, 260 * i), title, clip=checkpoint["CLIP"], text=text) for i, (title, text)
               in enumerate((("Age: source", "a portrait photo of a young person, natural light"),
                             ("Age: target", "a portrait photo of an old person, natural light"),
                             ("Eyeglasses: source", "a portrait photo of a person, natural light"),
                             ("Eyeglasses: target", "a portrait photo of a person wearing eyeglasses, natural light"),
                             ("Negative prompt", NEGATIVE)))]
    young, old, plain, glasses, negative = prompts
    seeds = g.add("EmptyLatentImage", (1, 1300), width=512, height=512, batch_size=8)

    def pair(source, target, y, names):
        return g.add("DirectionFromPromptPair", (2, y), model=checkpoint["MODEL"], source=source["CONDITIONING"],
                     target=target["CONDITIONING"], negative=negative["CONDITIONING"], latent=seeds["LATENT"],
                     seed=1, add_noise="enable", steps=20, cfg=7.0, sampler_name="ddim", scheduler="normal",
                     site="h_space", start_percent=0.0, end_percent=0.6, source_name=names[0], target_name=names[1])
    age, eyeglasses = pair(young, old, 0, ("young", "old")), pair(plain, glasses, 700, ("no eyeglasses", "eyeglasses"))
    projected = g.add("ProjectOutDirections", (3, 0), directions=age["directions"], remove=eyeglasses["directions"])
    summary = g.add("PreviewAny", (3, 260), "How much of 'old' is kept", source=projected["summary"])
    plain_sweep = seed_sweep(g, checkpoint, (plain, negative), age["directions"], 0, "semdir_old")
    kept_sweep = seed_sweep(g, checkpoint, (plain, negative), projected["directions"], 900, "semdir_old_no_eyeglasses")
    notes = [
        g.note("**1. Two prompt pairs** on the same 8 seeds: the attribute to edit (age) and one to keep still "
               "(eyeglasses), which old faces in the training data often wear.", (1, -220)),
        g.note("**2. Project Out Directions** removes from 'old' its part along 'eyeglasses' (InterFaceGAN's "
               "conditional editing). The summary says how much of 'old' is kept: little means the two were "
               "nearly the same change.", (3, -220)),
        g.note("**3. Both sweeps on a new seed** with the Asyrp Sampler: top, 'old' as found; bottom, 'old' with "
               "'eyeglasses' projected out. alpha 1 is each direction's own change.", (6, -220)),
    ]
    g.group("1. Prompt pairs", checkpoint, *prompts, seeds, notes[0])
    g.group("2. Named directions, one projected out of the other", age, eyeglasses, projected, summary, notes[1])
    g.group("3. 'old'", *plain_sweep, notes[2])
    g.group("4. 'old' without 'eyeglasses'", *kept_sweep)
    return g


EXAMPLES = {"without": ("neutral_1.png", "neutral_2.png"), "with_attribute": ("smiling_1.png", "smiling_2.png")}


def asyrp_sweep(g, checkpoint, conditioning, latent, directions, y: int, alpha: float, labels: str, prefix: str,
                mask=None) -> list:
    """An inverted photo's latent in five copies, the first direction at h-space over 0-0.6 of the schedule with
    one alpha per copy, sampled back with the Asyrp Sampler (add_noise off, the inversions' 30 normal steps),
    labelled and saved; the nodes, columns 5 to 9 from ``y``."""
    positive, negative = conditioning
    copies = g.add("RepeatLatentBatch", (5, y), samples=latent, amount=5)
    edit = g.add("ApplyDirection", (6, y), model=checkpoint["MODEL"], directions=directions, index=0,
                 layer="h_space", alpha=alpha, start_percent=0.0, end_percent=0.6, apply_to="both",
                 **({"mask": mask} if mask is not None else {}), alpha_list=labels)
    asyrp = g.add("AsyrpSampler", (6, y + 240), boost_eta=0.0, boost_start_percent=0.8)
    schedule = g.add("BasicScheduler", (6, y + 380), model=checkpoint["MODEL"], scheduler="normal", steps=30,
                     denoise=1.0)
    sample = g.add("SamplerCustom", (7, y), model=edit["MODEL"], add_noise=False, noise_seed=0, cfg=1.0,
                   positive=positive["CONDITIONING"], negative=negative["CONDITIONING"], sampler=asyrp["SAMPLER"],
                   sigmas=schedule["SIGMAS"], latent_image=copies["LATENT"])
    decoded = g.add("VAEDecode", (8, y), samples=sample["output"], vae=checkpoint["VAE"])
    grid = g.add("LabelledImageGrid", (8, y + 160), images=decoded["IMAGE"], labels=labels, columns=0,
                 directions=directions)
    save = g.add("SaveImage", (9, y), images=grid["IMAGE"], filename_prefix=prefix)
    return [copies, edit, asyrp, schedule, sample, decoded, grid, save]


def directions_from_examples(registry) -> Graph:
    """Workflow 8: photos without and with an attribute, inverted, give a pair direction at h-space, applied
    to a third inverted photo as a sweep with the Asyrp Sampler."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    describe = g.add("CLIPTextEncode", (1, 0), "Describe the photos", clip=checkpoint["CLIP"],
                     text="a portrait photo of a person")
    empty = g.add("CLIPTextEncode", (1, 260), "Empty negative", clip=checkpoint["CLIP"], text="")

    def inverted(images, at, title):
        loaded = [g.add("LoadImage", (at[0], at[1] + 420 * i), image=name) for i, name in enumerate(images)]
        batch = g.add("ImageBatch", (at[0] + 1, at[1]), image1=loaded[0]["IMAGE"], image2=loaded[1]["IMAGE"]) \
            if len(loaded) == 2 else None
        encoded = g.add("VAEEncode", (at[0] + 1, at[1] + 140), pixels=(batch or loaded[0])["IMAGE"],
                        vae=checkpoint["VAE"])
        invert = g.add("DDIMInvert", (at[0] + 2, at[1]), f"Invert: {title}", model=checkpoint["MODEL"],
                       latent=encoded["LATENT"], steps=30, scheduler="normal", cfg=1.0, refine=2,
                       positive=describe["CONDITIONING"])
        return [*loaded, *([batch] if batch else []), encoded, invert], invert
    without_nodes, without = inverted(EXAMPLES["without"], (2, 0), "neutral")
    with_nodes, with_attribute = inverted(EXAMPLES["with_attribute"], (2, 860), "smiling")
    pair = g.add("DirectionFromExamplePair", (5, 0), model=checkpoint["MODEL"], positive=describe["CONDITIONING"],
                 negative=empty["CONDITIONING"], without=without["latent"], with_attribute=with_attribute["latent"],
                 seed=0, add_noise="disable", steps=30, cfg=1.0, sampler_name="ddim", scheduler="normal",
                 site="h_space", start_percent=0.0, end_percent=0.6, without_name="neutral", with_name="smiling")
    third_nodes, third = inverted(("edit_me.png",), (2, 2000), "the photo to edit")
    sweep = asyrp_sweep(g, checkpoint, (describe, empty), third["latent"], pair["directions"], 2000, alpha=1.0,
                        labels=SWEEP, prefix="semdir_from_examples")
    notes = [
        g.note("**1. Examples**: two or more photos without the attribute and two or more with it (ImageBatch "
               "takes more), inverted with the unedited model at cfg 1. More examples average out everything "
               "else they differ in.", (2, -220)),
        g.note("**2. Direction From Example Pair** samples both inverted batches back (add_noise: disable, the "
               "inversion's steps and scheduler, ddim, cfg 1) and returns the h-space difference between them, "
               "named.", (5, -220)),
        g.note("**3. The photo to edit**, inverted, five copies: the Asyrp Sampler (SamplerCustom, add_noise off) "
               "renders alpha -1 to 1; alpha 0 is its reconstruction.", (6, 1760)),
    ]
    g.group("1. Examples, inverted", checkpoint, describe, empty, *without_nodes, *with_nodes, notes[0])
    g.group("2. Pair direction", pair, notes[1])
    g.group("3. Apply to another photo", *third_nodes, *sweep, notes[2])
    return g


LOCAL_SWEEP = "-0.1, -0.05, 0, 0.05, 0.1"


def localized_edit(registry) -> Graph:
    """Workflow 11: LOCO-Edit's localized edits: the directions that change the masked region of this photo's
    prediction most (Directions From Image with a mask), applied inside the same mask to the inverted photo,
    swept with the Asyrp Sampler."""
    g = Graph(registry)
    checkpoint, image, describe, empty, encode, invert = photo_inverted(g, "a portrait photo of a person", steps=30)
    canvas, square, mask = square_mask(g, 3, 192, 160, 96)
    found = g.add("DirectionsFromImage", (4, 0), model=checkpoint["MODEL"], positive=describe["CONDITIONING"],
                  negative=empty["CONDITIONING"], latent=encode["LATENT"], seed=0, percent=0.3, cfg=1.0,
                  site="h_space", count=4, mask=mask["MASK"])
    sweep = asyrp_sweep(g, checkpoint, (describe, empty), invert["latent"], found["directions"], 0, alpha=0.1,
                        labels=LOCAL_SWEEP, prefix="semdir_localized", mask=mask["MASK"])
    notes = [
        g.note("**1. Load** an SD1.5 checkpoint and your photo (about 512 px), describe it, and invert it with the "
               "UNEDITED model at cfg 1.", (0, -220)),
        g.note("**2. Where to edit**: the square (move it with MaskComposite's x and y, or paint a mask in "
               "LoadImage and connect its MASK instead). **Directions From Image** finds the h-space shifts that "
               "change this photo's prediction inside the mask most, at 0.3 of the schedule: a few blocks of "
               "model calls, not one per channel.", (3, -220)),
        g.note("**3. Edit inside the same mask** and sample the inverted photo back with the Asyrp Sampler "
               "(SamplerCustom, add_noise off, the inversion's steps and scheduler): five copies render alpha "
               "-0.1 to 0.1; alpha 0 is its reconstruction. Try index 1 to 3, and larger alphas.", (5, -220)),
    ]
    g.group("1. Load and invert (unedited model)", checkpoint, image, describe, empty, encode, invert, notes[0])
    g.group("2. Mask and the directions for this photo", canvas, square, mask, found, notes[1])
    g.group("3. Edit inside the mask and sample back", *sweep, notes[2])
    return g


def flux_loaders(g):
    """Flux as its users load it: the diffusion model, the two text encoders, the VAE."""
    unet = g.add("UNETLoader", (0, 0), unet_name=FLUX_MODEL, weight_dtype="default")
    clip = g.add("DualCLIPLoader", (0, 180), clip_name1=FLUX_TEXT_ENCODERS[0], clip_name2=FLUX_TEXT_ENCODERS[1],
                 type="flux")
    vae = g.add("VAELoader", (0, 400), vae_name=FLUX_VAE)
    return unet, clip, vae


def flux_prompt(g, clip, column, text, title="Prompt"):
    """A prompt with Flux's distilled guidance, and the empty one KSampler's negative input needs at cfg 1."""
    encoded = g.add("CLIPTextEncode", (column, 0), title, clip=clip["CLIP"], text=text)
    guided = g.add("FluxGuidance", (column, 260), conditioning=encoded["CONDITIONING"], guidance=3.5)
    empty = g.add("CLIPTextEncode", (column, 400), "Empty negative (unused at cfg 1)", clip=clip["CLIP"], text="")
    return encoded, guided, empty


def flux_discover_and_sweep(registry) -> Graph:
    """Workflow 9: Discover on Flux's image attention, a strength sweep in one batch, labelled."""
    g = Graph(registry)
    unet, clip, vae = flux_loaders(g)
    encoded, guided, empty = flux_prompt(g, clip, 1, PORTRAIT)
    discover = g.add("DiscoverAttentionEigendirections", (2, 0), model=unet["MODEL"], layers="double", count=10,
                     method="whitened", token_variance=1.0)
    spectrum = g.add("PreviewImage", (2, 240), images=discover["spectrum"])
    edit = g.add("ApplyDirection", (3, 0), model=unet["MODEL"], directions=discover["directions"], index=0,
                 layer="double", alpha=0.5, start_percent=0.0, end_percent=0.6, apply_to="both", alpha_list=SWEEP)
    latent = g.add("EmptySD3LatentImage", (3, 420), width=1024, height=1024, batch_size=5)
    same_noise = g.add("LatentBatchSeedBehavior", (3, 600), samples=latent["LATENT"], seed_behavior="fixed")
    sampler = g.add("KSampler", (4, 0), model=edit["MODEL"], seed=42, steps=20, cfg=1.0, sampler_name="euler",
                    scheduler="simple", positive=guided["CONDITIONING"], negative=empty["CONDITIONING"],
                    latent_image=same_noise["LATENT"], denoise=1.0)
    decoded = g.add("VAEDecode", (5, 0), samples=sampler["LATENT"], vae=vae["VAE"])
    grid = g.add("LabelledImageGrid", (5, 160), images=decoded["IMAGE"], labels=SWEEP, columns=0)
    save = g.add("SaveImage", (6, 0), images=grid["IMAGE"], filename_prefix="semdir_flux_sweep")
    notes = [
        g.note("**1. Load Flux** as usual: the diffusion model (UNETLoader), CLIP-L and T5 (DualCLIPLoader, type "
               "flux), the VAE. FluxGuidance sets the distilled guidance; KSampler runs at cfg 1.", (0, -220)),
        g.note("**2. Discover** on the double blocks' image attention (`single` for the single blocks, `all` for "
               "both): seconds on a GPU, from the weights alone.", (2, -220)),
        g.note("**3. Sweep** index 0 over alpha_list, one image per value, the same noise for all. Only image tokens "
               "move; the prompt's tokens are never touched.", (3, -220)),
    ]
    g.group("1. Load and prompt", unet, clip, vae, encoded, guided, empty, notes[0])
    g.group("2. Discover", discover, spectrum, notes[1])
    g.group("3. Sweep and grid", edit, latent, same_noise, sampler, decoded, grid, save, notes[2])
    return g


def flux_edit_real_image(registry) -> Graph:
    """Workflow 10: invert a photo with Flux (its NOISE output), sample it back through SamplerCustomAdvanced with an
    edit on the double blocks, beside the plain reconstruction."""
    g = Graph(registry)
    unet, clip, vae = flux_loaders(g)
    image = g.add("LoadImage", (0, 580), image="example.png")
    encoded, guided, _ = flux_prompt(g, clip, 1, "a photo of a woman with long hair, outdoors", "Describe the photo")
    latent = g.add("VAEEncode", (1, 560), pixels=image["IMAGE"], vae=vae["VAE"])
    invert = g.add("DDIMInvert", (2, 0), model=unet["MODEL"], latent=latent["LATENT"], steps=28, scheduler="simple",
                   cfg=1.0, refine=2, positive=guided["CONDITIONING"])
    discover = g.add("DiscoverAttentionEigendirections", (2, 420), model=unet["MODEL"], layers="double", count=10,
                     method="whitened", token_variance=1.0)
    edit = g.add("ApplyDirection", (3, 420), model=unet["MODEL"], directions=discover["directions"], index=0,
                 layer="double", alpha=0.4, start_percent=0.0, end_percent=0.5, apply_to="both")
    sampler = g.add("KSamplerSelect", (3, 0), sampler_name="euler")
    schedule = g.add("BasicScheduler", (3, 140), model=unet["MODEL"], scheduler="simple", steps=28, denoise=1.0)
    columns = []
    for row, (name, model) in enumerate((("edited", edit["MODEL"]), ("reconstruction", unet["MODEL"]))):
        guider = g.add("BasicGuider", (4, row * 420), f"Guider: {name}", model=model,
                       conditioning=guided["CONDITIONING"])
        sample = g.add("SamplerCustomAdvanced", (5, row * 420), f"Sample back: {name}", noise=invert["noise"],
                       guider=guider["GUIDER"], sampler=sampler["SAMPLER"], sigmas=schedule["SIGMAS"],
                       latent_image=latent["LATENT"])
        decoded = g.add("VAEDecode", (6, row * 420), samples=sample["output"], vae=vae["VAE"])
        columns += [guider, sample, decoded, g.add("SaveImage", (7, row * 420), images=decoded["IMAGE"],
                                                   filename_prefix=f"semdir_flux_{name}")]
    notes = [
        g.note("**1. Invert** the photo with the unedited model at cfg 1, with the prompt that describes it "
               "(through FluxGuidance, as you will sample back). Flux's flow schedule starts at pure noise: use "
               "DDIM Invert's `noise` output.", (2, -220)),
        g.note("**2. Sample back** with SamplerCustomAdvanced: the inversion's noise, the same scheduler and steps, "
               "euler. The edited guider's model carries Apply Direction; the other reconstructs the photo.",
               (4, -220)),
    ]
    g.group("1. Load, describe, invert", unet, clip, vae, image, encoded, guided, latent, invert, notes[0])
    g.group("2. Edit and sample back", discover, edit, sampler, schedule, *columns, notes[1])
    return g


WORKFLOW_BUILDERS = {
    "discover_and_sweep": discover_and_sweep,
    "edit_real_image": edit_real_image,
    "asyrp_edit": asyrp_edit,
    "svd_attribute": svd_attribute,
    "sdxl_discover_and_sweep": lambda registry: discover_and_sweep(registry, SDXL_CHECKPOINT, 1024, "SDXL"),
    "save_and_reuse": save_and_reuse,
    "named_direction": named_direction,
    "directions_from_examples": directions_from_examples,
    "flux_discover_and_sweep": flux_discover_and_sweep,
    "flux_edit_real_image": flux_edit_real_image,
    "localized_edit": localized_edit,
    "conditional_direction": conditional_direction,
}


def build_all(registry) -> dict:
    """File name -> the workflow's JSON text, as written to workflows/."""
    return {f"{name}.json": json.dumps(build(registry).ui(name), indent=2, ensure_ascii=False) + "\n"
            for name, build in WORKFLOW_BUILDERS.items()}


def main():
    from harness.host import Host
    host = Host(Path(tempfile.mkdtemp(prefix="semdir-workflows-")))
    for name, text in build_all(host.nodes.NODE_CLASS_MAPPINGS).items():
        (WORKFLOWS / name).write_text(text, encoding="utf-8")
        print("wrote", WORKFLOWS / name)


if __name__ == "__main__":
    main()
