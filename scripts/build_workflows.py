"""Writes the example workflows in workflows/ (ComfyUI's UI format) from the short descriptions below.

Each description names nodes, their widget values and their links; the host's own node registry
supplies every node's inputs, outputs and widget order, so the files always match the nodes.
Run it after changing a description or a node's inputs (`make workflows`); a test checks the
checked-in files equal what it writes.
"""
import json
import sys
import tempfile
import uuid
from pathlib import Path

from workflow_format import extra_widget_value, is_widget

REPO = Path(__file__).resolve().parent.parent
WORKFLOWS = REPO / "workflows"
SD15_CHECKPOINT = "v1-5-pruned-emaonly-fp16.safetensors"
COLUMN = 380
NOTE_COLOUR = {"color": "#432", "bgcolor": "#653"}


class Node:
    def __init__(self, graph, node_id, node_type, pos, values, title=None):
        self.graph, self.id, self.type, self.pos, self.values, self.title = graph, node_id, node_type, pos, values, title
        self.inputs, self.widgets, self.outputs = [], [], []

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
        self.groups.append({"id": len(self.groups) + 1, "title": title, "bounding": [left, top, right - left, bottom - top],
                            "color": colour, "font_size": 24, "flags": {}})

    def ui(self, name: str) -> dict:
        nodes = []
        for order, node in enumerate(self.nodes):
            entry = {"id": node.id, "type": node.type, "pos": node.pos, "size": size(node), "flags": {},
                     "order": order, "mode": 0, "inputs": node.inputs,
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


def edit_real_image(registry) -> Graph:
    """Workflow 2: invert a photo with the unedited model, edit inside a mask, sample back beside the
    unedited reconstruction."""
    g = Graph(registry)
    checkpoint = g.add("CheckpointLoaderSimple", (0, 0), ckpt_name=SD15_CHECKPOINT)
    image = g.add("LoadImage", (0, 200), image="example.png")
    describe = g.add("CLIPTextEncode", (1, 0), "Describe the photo", clip=checkpoint["CLIP"],
                     text="a photo of a woman with long hair, outdoors")
    empty = g.add("CLIPTextEncode", (1, 260), "Empty negative", clip=checkpoint["CLIP"], text="")
    encode = g.add("VAEEncode", (1, 440), pixels=image["IMAGE"], vae=checkpoint["VAE"])
    invert = g.add("DDIMInvert", (2, 0), model=checkpoint["MODEL"], latent=encode["LATENT"], steps=50,
                   scheduler="normal", cfg=1.0, refine=2, positive=describe["CONDITIONING"])
    discover = g.add("DiscoverAttentionEigendirections", (2, 300), model=checkpoint["MODEL"], layers="all", count=10,
                     method="whitened", token_variance=1.0)
    preview_spectrum = g.add("PreviewImage", (2, 520), images=discover["spectrum"])
    canvas = g.add("SolidMask", (3, 0), value=0.0, width=512, height=512)
    square = g.add("SolidMask", (3, 160), value=1.0, width=256, height=256)
    mask = g.add("MaskComposite", (3, 320), destination=canvas["MASK"], source=square["MASK"], x=128, y=128,
                 operation="add")
    edit = g.add("ApplyDirection", (4, 0), model=checkpoint["MODEL"], directions=discover["directions"], index=0,
                 layer="all", alpha=0.4, start_percent=0.0, end_percent=0.5, apply_to="both", mask=mask["MASK"])
    samplers = {}
    for row, (name, model) in enumerate((("edited", edit["MODEL"]), ("reconstruction", checkpoint["MODEL"]))):
        samplers[name] = g.add("KSamplerAdvanced", (5, row * 420), f"Sample back: {name}", model=model,
                               add_noise="disable", noise_seed=0, steps=50, cfg=1.0, sampler_name="ddim",
                               scheduler="normal", positive=describe["CONDITIONING"], negative=empty["CONDITIONING"],
                               latent_image=invert["latent"], start_at_step=0, end_at_step=10000,
                               return_with_leftover_noise="disable")
    saves = []
    for row, name in enumerate(("edited", "reconstruction")):
        decoded = g.add("VAEDecode", (6, row * 420), samples=samplers[name]["LATENT"], vae=checkpoint["VAE"])
        saves.append(g.add("SaveImage", (7, row * 420), images=decoded["IMAGE"], filename_prefix=f"semdir_{name}"))
    notes = [
        g.note("**1. Load** an SD1.5 checkpoint and your photo (about 512 px). Describe the photo in the prompt.",
               (0, -220)),
        g.note("**2. Invert with the UNEDITED model** (straight from the checkpoint), cfg 1. refine 2 removes "
               "nearly all of plain DDIM inversion's drift; use the same steps and scheduler when sampling back.",
               (2, -220)),
        g.note("**3. Edit inside the mask.** The square is where the edit acts: change the MaskComposite x, y or "
               "paint a mask in LoadImage (right-click, Open in MaskEditor) and connect its MASK instead. Try "
               "other `index` values and alphas from -1 to 1; the range 0-0.5 edits structure.", (3, -220)),
        g.note("**4. Sample back** with **add_noise: disable**, the same steps and scheduler, sampler ddim, cfg 1. "
               "With alpha 0 the edited image equals the reconstruction.", (5, -220)),
    ]
    g.group("1. Load", checkpoint, image, notes[0])
    g.group("2. Invert (unedited model)", describe, empty, encode, invert, notes[1])
    g.group("3. Directions, mask and edit", discover, preview_spectrum, canvas, square, mask, edit, notes[2])
    g.group("4. Sample back (add_noise: disable) and save", *samplers.values(), *saves, notes[3])
    return g


WORKFLOW_BUILDERS = {"edit_real_image": edit_real_image}


def build_all(registry) -> dict:
    """File name -> the workflow's JSON text, as written to workflows/."""
    return {f"{name}.json": json.dumps(build(registry).ui(name), indent=2, ensure_ascii=False) + "\n"
            for name, build in WORKFLOW_BUILDERS.items()}


def main():
    sys.path.insert(0, str(REPO / "tests"))
    from host import Host
    host = Host(Path(tempfile.mkdtemp(prefix="semdir-workflows-")))
    for name, text in build_all(host.nodes.NODE_CLASS_MAPPINGS).items():
        (WORKFLOWS / name).write_text(text, encoding="utf-8")
        print("wrote", WORKFLOWS / name)


if __name__ == "__main__":
    main()
