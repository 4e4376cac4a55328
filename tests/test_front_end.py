"""Front-end layer: every example workflow opened in the real ComfyUI front end (the host's pinned
comfyui-frontend-package, served by the server with the pack) in headless Chromium from Debian.

Each test takes a screenshot of the loaded graph; with WRITE_THUMBNAILS=1 (`make workflows`) it
becomes the workflow's thumbnail, workflows/<name>.jpg, the picture the README and the template
browser show.
"""
import json
import os
import shutil

import pytest
import requests

from harness.host import REPO

WORKFLOWS = REPO / "workflows"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
VIEWPORT = {"width": 1920, "height": 1080}
SETTINGS = {  # no first-run dialog, and thumbnails that show only the graph, the same on every run
    "Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
    "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}
LOAD_TIMEOUT_MS = 120_000

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="needs Debian's chromium package (apt-get install chromium); CI installs it")]


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright
    url, _, _ = server
    for setting, value in SETTINGS.items():  # a whole graph fits the screen at about 40%: keep its text
        requests.post(f"{url}/settings/{setting}", json=value, timeout=10).raise_for_status()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && document.querySelector('canvas')",
                               timeout=LOAD_TIMEOUT_MS)
        page.evaluate("""() => {  // the release banner would cover the top of every thumbnail
            const close = Array.from(document.querySelectorAll('button')).find(button => {
                const box = button.getBoundingClientRect();
                return box.top < 30 && box.right > window.innerWidth - 80; });
            if (close) close.click(); }""")
        yield page
        browser.close()


@pytest.mark.parametrize("name", sorted(path.stem for path in WORKFLOWS.glob("*.json")))
def test_workflow_opens_in_the_front_end(page, name, tmp_path):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    page.errors.clear()
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(1000)
    dialogs = page.evaluate("() => Array.from(document.querySelectorAll('.p-dialog')).map(d => d.innerText)")
    assert not dialogs, f"the front end showed a dialog: {dialogs}"
    missing = page.evaluate("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])",
                            sorted({node["type"] for node in workflow["nodes"]}))
    assert not missing, f"node types missing in the front end: {missing}"
    loaded = page.evaluate("() => window.app.graph.serialize()")
    assert len(loaded["nodes"]) == len(workflow["nodes"]) and len(loaded["links"]) == len(workflow["links"])
    by_id = {node["id"]: node for node in loaded["nodes"]}
    changed = [node["type"] for node in workflow["nodes"]
               if by_id[node["id"]].get("widgets_values") != node["widgets_values"]]
    assert not changed, f"the front end read these nodes' widget values differently: {changed}"
    assert not page.errors, page.errors
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
    page.wait_for_timeout(500)
    page.screenshot(path=str((WORKFLOWS if os.environ.get("WRITE_THUMBNAILS") else tmp_path) / f"{name}.jpg"),
                    type="jpeg", quality=80)
