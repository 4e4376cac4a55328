"""Server layer: ``main.py --cpu`` with the pack in custom_nodes, driven over HTTP. Every wait is bounded."""
import json

import pytest
import requests
from graphs import save_loaded_directions, submitted
from safetensors import safe_open

from harness.host import PACK_DIR_NAME, PACK_NODES, REPO

pytestmark = pytest.mark.server


def test_start_up_log_shows_the_pack_imported(server):
    _, _, log_path = server
    log = log_path.read_text()
    pack_lines = [line for line in log.splitlines() if PACK_DIR_NAME in line]
    assert any("seconds" in line for line in pack_lines), log[-3000:]
    assert not any("IMPORT FAILED" in line or "Cannot import" in line for line in pack_lines), log[-3000:]


def test_object_info_lists_every_node_with_its_inputs(server):
    url, _, _ = server
    info = requests.get(f"{url}/object_info", timeout=60).json()
    assert PACK_NODES <= set(info)
    assert set(info["SaveDirections"]["input"]["required"]) == {"directions", "filename", "overwrite"}
    assert info["LoadDirections"]["input"]["required"]["file"][0] == ["seed.safetensors"]
    assert info["LoadDirections"]["output"] == ["DIRECTIONS", "STRING"]
    assert info["SaveDirections"]["output_node"] is True
    assert all(info[name]["description"] for name in PACK_NODES)


def test_prompt_saves_and_loads_a_direction_file(server):
    url, base, _ = server
    rejection, entry = submitted(url, save_loaded_directions("seed.safetensors", "from_server"))
    assert rejection is None, rejection
    assert entry["status"]["status_str"] == "success", json.dumps(entry["status"])[:2000]
    assert entry["outputs"]["2"]["text"] == ["from_server.safetensors"]
    folder = base / "models" / "directions"
    with safe_open(str(folder / "seed.safetensors"), "pt") as a, \
            safe_open(str(folder / "from_server.safetensors"), "pt") as b:
        assert a.metadata() == b.metadata()
        assert all(a.get_tensor(k).equal(b.get_tensor(k)) for k in a.keys())


def test_the_host_lists_the_example_workflows_as_templates(server):
    url, _, _ = server
    templates = requests.get(f"{url}/workflow_templates", timeout=10).json()
    shipped = sorted(path.stem for path in (REPO / "workflows").glob("*.json"))
    assert shipped and sorted(templates[PACK_DIR_NAME]) == shipped
    served = requests.get(f"{url}/api/workflow_templates/{PACK_DIR_NAME}/{shipped[0]}.json", timeout=10)
    assert served.ok and served.json()["nodes"]
