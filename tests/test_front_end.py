"""Front-end layer: every example workflow opened in the real ComfyUI front end, served by the server
with the pack, in headless Chromium from Debian. Two front ends, each test id naming its own:
"pinned", the host's pinned comfyui-frontend-package (installed in .venv), and the newest one on
PyPI, which `make env` installs into .cache/frontend-<version> and the server serves with
--front-end-root.

Each test takes a screenshot of the loaded graph; with WRITE_THUMBNAILS=1 (`make workflows`) the
pinned front end's becomes the workflow's thumbnail, workflows/<name>.jpg, the picture the README
and the template browser show.
"""
import importlib.metadata
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
    "LiteGraph.Canvas.MinFontSizeForLOD": 1, "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
    # The test servers hold no model files and no input images; newer front ends (1.55+) flag each one
    # a workflow names with a warning toast and a red node. Missing node types stay flagged (default).
    "Comfy.ErrorSystem.ShowMissingModels": False, "Comfy.Workflow.ShowMissingMediaWarning": False}
# The pinned front end's "Introducing Nodes 2.0" banner would cover the top of every thumbnail; its
# close button only sets this key in the browser's local storage.
DISMISSED = "localStorage.setItem('vueNodesBannerDismissed', 'true')"
# Whatever the front end shows over the graph: dialogs, and toasts (PrimeVue's, and 1.58's own).
NOTICES = """() => Array.from(document.querySelectorAll(
        '.p-dialog, .p-toast-message, [role=dialog], [role=alertdialog], [role=alert], [role=status]'))
    .filter(element => !element.classList.contains('sr-only') && element.innerText.trim())
    .map(element => element.innerText.trim())"""
LOAD_TIMEOUT_MS = 120_000
# The newest front end; the Makefile's NEWEST_FRONTEND names the same version and installs it here.
NEWEST_FRONTEND = "1.58.1"
NEWEST_FRONTEND_ROOT = REPO / ".cache" / f"frontend-{NEWEST_FRONTEND}" / "comfyui_frontend_package" / "static"
FRONT_ENDS = ["pinned", NEWEST_FRONTEND]

pytestmark = [pytest.mark.server, pytest.mark.skipif(
    CHROMIUM is None and not os.environ.get("CI"),
    reason="needs Debian's chromium package (apt-get install chromium); CI installs it")]


@pytest.fixture(scope="module", params=FRONT_ENDS)
def front_end(request, start_server):
    """(name, version the page must report, server url): the shared server for the pinned front end,
    a second server with --front-end-root for the newest."""
    if request.param == "pinned":
        url, _, _ = request.getfixturevalue("server")
        yield request.param, importlib.metadata.version("comfyui-frontend-package"), url
        return
    if not (NEWEST_FRONTEND_ROOT / "index.html").is_file():
        message = (f"front end {NEWEST_FRONTEND} is not installed in {NEWEST_FRONTEND_ROOT.parent.parent} "
                   "(`make env` installs it)")
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    with start_server("--front-end-root", str(NEWEST_FRONTEND_ROOT)) as (url, _, _):
        yield request.param, NEWEST_FRONTEND, url


@pytest.fixture(scope="module")
def page(front_end):
    from playwright.sync_api import sync_playwright
    _, version, url = front_end
    for setting, value in SETTINGS.items():  # a whole graph fits the screen at about 40%: keep its text
        requests.post(f"{url}/settings/{setting}", json=value, timeout=10).raise_for_status()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport=VIEWPORT)
        page.errors = []
        page.on("pageerror", lambda error: page.errors.append(str(error)))
        page.add_init_script(DISMISSED)
        page.goto(url)
        page.wait_for_function("window.app && window.app.graph && document.querySelector('canvas')",
                               timeout=LOAD_TIMEOUT_MS)
        served = page.evaluate("() => window.__COMFYUI_FRONTEND_VERSION__")
        assert served == version, f"the server served front end {served}, not {version}"
        page.wait_for_timeout(1000)
        assert not page.evaluate(NOTICES), f"the front end opened with: {page.evaluate(NOTICES)}"
        assert not page.errors, page.errors
        yield page
        browser.close()


@pytest.mark.parametrize("name", sorted(path.stem for path in WORKFLOWS.glob("*.json")))
def test_workflow_opens_in_the_front_end(front_end, page, name, tmp_path):
    workflow = json.loads((WORKFLOWS / f"{name}.json").read_text(encoding="utf-8"))
    page.errors.clear()
    page.evaluate("async (workflow) => { await window.app.loadGraphData(workflow); }", workflow)
    page.wait_for_timeout(1000)
    notices = page.evaluate(NOTICES)
    assert not notices, f"the front end showed a dialog or a toast: {notices}"
    missing = page.evaluate("(types) => types.filter(t => !window.LiteGraph.registered_node_types[t])",
                            sorted({node["type"] for node in workflow["nodes"]}))
    assert not missing, f"node types missing in the front end: {missing}"
    loaded = page.evaluate("() => window.app.graph.serialize()")
    assert len(loaded["nodes"]) == len(workflow["nodes"]) and len(loaded["links"]) == len(workflow["links"])
    by_id = {node["id"]: node for node in loaded["nodes"]}
    # Newer front ends leave widgets_values out for a node without widgets, where the files say [];
    # every other difference counts. (1.58.1's live nodes have string ids, its serialized ones numbers.)
    without_widgets = set(page.evaluate(
        "() => window.app.graph.nodes.filter(node => !node.widgets?.length).map(node => String(node.id))"))
    changed = [node["type"] for node in workflow["nodes"]
               if by_id[node["id"]].get("widgets_values", [] if str(node["id"]) in without_widgets else None)
               != node["widgets_values"]]
    assert not changed, f"the front end read these nodes' widget values differently: {changed}"
    assert not page.errors, page.errors
    page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Canvas.FitView'); }")
    page.wait_for_timeout(500)
    thumbnail = os.environ.get("WRITE_THUMBNAILS") and front_end[0] == "pinned"
    page.screenshot(path=str((WORKFLOWS if thumbnail else tmp_path) / f"{name}.jpg"), type="jpeg", quality=80)
