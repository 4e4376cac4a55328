"""The real ComfyUI host in this process, loading the pack the way ComfyUI does at start-up.

A fresh base directory holds ``custom_nodes`` (links to the pack and to the test-only nodes in
``tests/host_nodes``), ``models``, ``input`` and ``output``. The host's own node registry imports
both from there; prompts go through ``execution.validate_prompt`` and ``execution.PromptExecutor``.
"""
import asyncio
import inspect
import os
import sys
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PACK_DIR_NAME = "comfyui-semantic-directions"
PACK_NODES = {"SaveDirections", "LoadDirections", "DiscoverAttentionEigendirections", "ApplyDirection",
              "AsyrpSampler", "LabelledImageGrid", "DDIMInvert", "DDIMInversionSampler", "SVDLatentAttribute",
              "SVDLatentExplore", "SVDLatentAnalysis"}
TEST_NODES_DIR_NAME = "semdir_test_nodes"
sys.path.insert(0, str(REPO / "scripts"))
from fetch_comfyui import ensure_host  # noqa: E402


class PromptRejected(Exception):
    """validate_prompt refused a prompt; ``node_errors`` says why for each node."""

    def __init__(self, error, node_errors):
        super().__init__(f"{error.get('message')}: {error.get('details')} {node_errors}")
        self.error, self.node_errors = error, node_errors


class NodeFailed(Exception):
    """A node raised while the executor ran the prompt; ``message`` is what the user sees."""

    def __init__(self, node_type, message):
        super().__init__(f"{node_type}: {message}")
        self.node_type, self.message = node_type, message


def prepare_base(base: Path) -> Path:
    """A ComfyUI base directory whose custom_nodes hold the pack and the test-only nodes."""
    custom = base / "custom_nodes"
    custom.mkdir(parents=True, exist_ok=True)
    for name, target in ((PACK_DIR_NAME, REPO), (TEST_NODES_DIR_NAME, REPO / "tests" / "host_nodes")):
        if not (custom / name).exists():
            (custom / name).symlink_to(target, target_is_directory=True)
    return base


class Host:
    """One in-process host: its modules, a real PromptServer (never started) and an executor."""

    def __init__(self, base: Path, device: str = "cpu"):
        root = ensure_host()
        self.root, self.base = root, prepare_base(base)
        sys.path.insert(0, str(root))
        import comfy.options  # noqa: F401  (argument parsing stays off: defaults apply)
        from comfy.cli_args import args
        args.base_directory = str(base)
        args.cpu = device == "cpu"
        args.database_url = "sqlite:///:memory:"
        import folder_paths
        import utils.extra_config  # noqa: F401  (main.py imports it before the rest)
        import comfy.utils  # noqa: F401
        import execution
        import server
        import nodes
        self.folder_paths, self.execution, self.nodes = folder_paths, execution, nodes
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop, *self._asset_manager(server, args))
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC,
            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})

    @staticmethod
    def _asset_manager(server, args):
        """Newer hosts take an asset manager; give them the no-op one main.py uses without assets."""
        if "asset_manager" not in inspect.signature(server.PromptServer.__init__).parameters:
            return ()
        from app.assets.manager import NoAssets
        return (NoAssets(args),)

    @property
    def pack_loaded(self) -> bool:
        return PACK_DIR_NAME in self.nodes.LOADED_MODULE_DIRS

    def run(self, prompt: dict, cached: bool = True) -> dict:
        """Validate and execute an API-format prompt; return the UI outputs per node id.

        Like a running ComfyUI, the executor keeps its cache between prompts; ``cached=False``
        forgets it first, so every node executes again.
        """
        if not cached:
            self.executor.reset()
        prompt_id = str(uuid.uuid4())
        valid, error, outputs, node_errors = self.loop.run_until_complete(
            self.execution.validate_prompt(prompt_id, prompt, None))
        if not valid:
            raise PromptRejected(error, node_errors)
        self.executor.execute(prompt, prompt_id, {}, outputs)
        for event, data in self.executor.status_messages:
            if event == "execution_error":
                raise NodeFailed(data["node_type"], data["exception_message"])
            if event == "execution_interrupted":
                raise NodeFailed(data["node_type"], "interrupted")
        assert self.executor.success
        return self.executor.history_result["outputs"]

    def models_dir(self, folder: str) -> Path:
        return Path(self.folder_paths.get_folder_paths(folder)[0])


def requested_device() -> str:
    """``SEMDIR_TEST_DEVICE=cuda`` runs the host tests on the GPU (the host's default device)."""
    return os.environ.get("SEMDIR_TEST_DEVICE", "cpu")
