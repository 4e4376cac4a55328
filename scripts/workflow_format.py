"""ComfyUI's two workflow formats: the UI format the front end saves, and the API format the server runs.

The UI format stores each node's widget values as a list in the order of the node's inputs, with
extra entries for widgets the front end adds (a seed's 'control after generate', an upload
button), and its connections as a separate list of links. ``to_api`` turns it into the API
format, using the host's node registry for the input order, as the front end does.
"""
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONT_END_ONLY = {"Note", "MarkdownNote"}


def is_widget(config) -> bool:
    """An input the front end shows as a widget (a value), rather than as a socket for a link."""
    kind = config[0]
    options = config[1] if len(config) > 1 else {}
    return (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput", False)


def extra_widget_value(name: str, config):
    """The value of the widget the front end adds after this input's own, if it adds one.

    INT inputs get a 'control after generate' widget when their spec asks for it, or by default
    when named seed or noise_seed; upload inputs (image, audio, video, file) get the upload
    button's widget, whose stored value is the upload kind.
    """
    options = config[1] if len(config) > 1 else {}
    if options.get("control_after_generate", config[0] == "INT" and name in ("seed", "noise_seed")):
        return "fixed"
    uploads = [key for key in ("image_upload", "audio_upload", "video_upload", "file_upload") if options.get(key)]
    return uploads[0].removesuffix("_upload") if uploads else None


ACTIVE, MUTED = 0, 2  # the front end's node modes; 4 (bypassed) would need rewiring and is refused


def to_api(workflow: dict, registry: dict) -> dict:
    """A UI-format workflow as an API-format prompt, as the front end queues it: notes and muted
    nodes are left out. Bypassed nodes, and nodes the registry does not know, are errors."""
    links = {link[0]: link for link in workflow["links"]}
    modes = {node["id"]: node.get("mode", ACTIVE) for node in workflow["nodes"]}
    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in FRONT_END_ONLY or modes[node["id"]] == MUTED:
            continue
        if modes[node["id"]] != ACTIVE:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed")
        if node["type"] not in registry:
            raise ValueError(f"node {node['id']}: type {node['type']} is not installed")
        spec = registry[node["type"]].INPUT_TYPES()
        inputs = {}
        for slot in node.get("inputs", []):
            if slot.get("link") is not None:
                _, origin, origin_slot, _, _, _ = links[slot["link"]]
                if modes.get(origin) != ACTIVE:
                    raise ValueError(f"node {node['id']} ({node['type']}): input {slot['name']} comes from "
                                     f"node {origin}, which is muted")
                inputs[slot["name"]] = [str(origin), origin_slot]
        values = list(node.get("widgets_values", []))
        for name, config in {**spec.get("required", {}), **spec.get("optional", {})}.items():
            if not is_widget(config):
                continue
            if not values:
                raise ValueError(f"node {node['id']} ({node['type']}): no widget value for {name}")
            value = values.pop(0)
            inputs.setdefault(name, value)
            if extra_widget_value(name, config) is not None:
                values.pop(0)
        if values:
            raise ValueError(f"node {node['id']} ({node['type']}): {len(values)} widget values left over")
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt
