"""Host layer: the pack loaded by the real host, and Save/Load Directions run by its executor."""
import pytest
from directions_testing import sample_set
from graphs import save_loaded_directions
from safetensors import safe_open

from harness.host import PACK_NODES, NodeFailed, PromptRejected
from semantic_directions.directions.fileformat import save_directions


def file_contents(path):
    with safe_open(str(path), "pt") as handle:
        return handle.metadata(), {k: handle.get_tensor(k) for k in handle.keys()}


@pytest.fixture
def directions_dir(host):
    folder = host.models_dir("directions")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def test_host_loads_the_pack_from_custom_nodes(host):
    assert host.pack_loaded
    registry = host.nodes.NODE_CLASS_MAPPINGS
    from_pack = {name for name, cls in registry.items()
                 if getattr(cls, "RELATIVE_PYTHON_MODULE", "") == "custom_nodes.comfyui-semantic-directions"}
    assert from_pack == PACK_NODES
    for name in PACK_NODES:
        assert registry[name].RELATIVE_PYTHON_MODULE == "custom_nodes.comfyui-semantic-directions"
        assert host.nodes.NODE_DISPLAY_NAME_MAPPINGS[name]


def test_directions_folder_is_registered(host):
    assert host.models_dir("directions") == host.base / "models" / "directions"


@pytest.mark.parametrize("name", sorted(PACK_NODES))
def test_every_node_explains_itself(host, name):
    cls = host.nodes.NODE_CLASS_MAPPINGS[name]
    assert cls.DESCRIPTION and cls.CATEGORY == "semantic directions"
    assert len(getattr(cls, "OUTPUT_TOOLTIPS", ())) == len(cls.RETURN_TYPES)
    for section in cls.INPUT_TYPES().values():
        for input_name, spec in section.items():
            assert spec[1].get("tooltip"), f"{name}.{input_name} has no tooltip"


def test_save_and_load_round_trip_through_the_executor(host, directions_dir):
    save_directions(sample_set(), directions_dir / "original.safetensors")
    outputs = host.run(save_loaded_directions("original.safetensors", "copies/copy"))
    assert outputs["2"]["text"] == ["copies/copy.safetensors"]
    original = file_contents(directions_dir / "original.safetensors")
    copy = file_contents(directions_dir / "copies" / "copy.safetensors")
    assert original[0] == copy[0]
    assert original[1].keys() == copy[1].keys()
    assert all(original[1][k].equal(copy[1][k]) for k in original[1])


def test_save_refuses_to_overwrite_unless_asked(host, directions_dir):
    save_directions(sample_set(), directions_dir / "keep.safetensors")
    save_directions(sample_set(gains=False), directions_dir / "other.safetensors")
    before = (directions_dir / "keep.safetensors").read_bytes()
    with pytest.raises(NodeFailed, match="keep.safetensors: a file of that name exists"):
        host.run(save_loaded_directions("other.safetensors", "keep"), cached=False)
    assert (directions_dir / "keep.safetensors").read_bytes() == before
    host.run(save_loaded_directions("other.safetensors", "keep", overwrite=True), cached=False)
    assert (directions_dir / "keep.safetensors").read_bytes() != before


@pytest.mark.parametrize("name", ["../outside", "/tmp/abs", "a/../../b"])
def test_save_names_cannot_leave_the_folder(host, directions_dir, name):
    save_directions(sample_set(), directions_dir / "src.safetensors", overwrite=True)
    escaped = (directions_dir / f"{name}.safetensors").resolve()  # where the name would have put the file
    assert not escaped.exists()
    with pytest.raises(NodeFailed, match="file name .* is not allowed"):
        host.run(save_loaded_directions("src.safetensors", name), cached=False)
    assert not escaped.exists()


def test_damaged_file_gets_a_one_line_error(host, directions_dir):
    path = directions_dir / "damaged.safetensors"
    save_directions(sample_set(), path)
    path.write_bytes(path.read_bytes()[:-64])
    with pytest.raises(NodeFailed) as err:
        host.run(save_loaded_directions("damaged.safetensors", "never"), cached=False)
    assert err.value.message.startswith("file: damaged.safetensors: ")
    assert "\n" not in err.value.message.strip()


def test_unknown_file_is_rejected_before_running(host, directions_dir):
    with pytest.raises(PromptRejected) as err:
        host.run(save_loaded_directions("missing.safetensors", "x"))
    assert [e["extra_info"]["input_name"] for node in err.value.node_errors.values() for e in node["errors"]] == \
        ["file"]


def test_load_lists_only_direction_files(host, directions_dir):
    (directions_dir / "notes.txt").write_text("not a direction file")
    save_directions(sample_set(), directions_dir / "listed.safetensors", overwrite=True)
    choices = host.nodes.NODE_CLASS_MAPPINGS["LoadDirections"].INPUT_TYPES()["required"]["file"][0]
    assert "listed.safetensors" in choices and "notes.txt" not in choices
