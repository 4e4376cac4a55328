"""The real ComfyUI host in this process, loading the pack the way ComfyUI does at start-up.

A base directory holds ``custom_nodes`` (a link to the pack, and a one-line package that loads
``harness.test_nodes``), ``models``, ``input`` and ``output``. The host's own node registry imports
both from there; prompts go through ``execution.validate_prompt`` and ``execution.PromptExecutor``.

The host imports the pack under a name made from its folder's path. :class:`Host` makes that very
module importable as ``semantic_directions`` too, so tests, benchmarks and the demo use the library
the host's nodes use (one ``DirectionSet`` class per process), never a second copy from the source tree.
"""
import asyncio
import atexit
import importlib
import inspect
import os
import pkgutil
import shutil
import sys
import tempfile
import uuid
from pathlib import Path

from .comfyui import REPO, make_importable

PACK_DIR_NAME = "comfyui-semantic-directions"
PACK_MODULE = "semantic_directions"
PACK_NODES = {"SaveDirections", "LoadDirections", "DiscoverAttentionEigendirections", "ApplyDirection",
              "AsyrpSampler", "LabelledImageGrid", "DDIMInvert", "DDIMInversionSampler", "SVDLatentAttribute",
              "SVDLatentExplore", "SVDLatentAnalysis", "DirectionsFromSamples", "DirectionFromPromptPair",
              "DirectionFromExamplePair", "DirectionsFromImage", "ProjectOutDirections"}
TEST_NODES_DIR_NAME = "semdir_test_nodes"
TEST_NODES_SHIM = "from harness.test_nodes import NODE_CLASS_MAPPINGS  # noqa: F401  (the development harness)\n"


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
    if not (custom / PACK_DIR_NAME).exists():
        (custom / PACK_DIR_NAME).symlink_to(REPO, target_is_directory=True)
    (custom / TEST_NODES_DIR_NAME).mkdir(exist_ok=True)
    (custom / TEST_NODES_DIR_NAME / "__init__.py").write_text(TEST_NODES_SHIM)
    return base


def server_environment() -> dict:
    """The environment for a ``main.py`` process on a prepared base: the harness importable by name."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path}


class Host:
    """One in-process host: its modules, a real PromptServer (never started) and an executor."""

    def __init__(self, base: Path, device: str = "cpu"):
        self.root, self.base = make_importable(), prepare_base(base)
        import comfy.options  # noqa: F401  (argument parsing stays off: defaults apply)
        from comfy.cli_args import args
        args.base_directory = str(base)
        args.cpu = device == "cpu"
        args.database_url = "sqlite:///:memory:"
        # the host's own start-up order: main.py imports folder_paths, then its extra config, before the rest
        # isort: off
        import folder_paths
        import utils.extra_config  # noqa: F401
        import comfy.utils  # noqa: F401
        import execution
        import server
        import nodes
        # isort: on
        self.folder_paths, self.execution, self.nodes = folder_paths, execution, nodes
        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.server = server.PromptServer(self.loop, *self._asset_manager(server, args))
        self.loop.run_until_complete(nodes.init_extra_nodes(init_custom_nodes=True, init_api_nodes=False))
        self.executor = execution.PromptExecutor(
            self.server, cache_type=execution.CacheType.CLASSIC,
            cache_args={"lru": 0, "ram": 0, "ram_inactive": 0})
        if self.pack_loaded:
            _name_pack(nodes.NODE_CLASS_MAPPINGS["SaveDirections"].__module__.rsplit(".nodes.", 1)[0])

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


def _name_pack(loaded: str) -> None:
    """Make the pack the host imported as ``loaded`` importable as ``semantic_directions``: the same
    module objects under a second name, every library and node module included."""
    for part in ("directions", "nodes"):
        package = importlib.import_module(f"{loaded}.{part}")
        for module in pkgutil.iter_modules(package.__path__):
            importlib.import_module(f"{loaded}.{part}.{module.name}")
    for name, module in list(sys.modules.items()):
        if name == loaded or name.startswith(loaded + "."):
            sys.modules[PACK_MODULE + name[len(loaded):]] = module


def requested_device() -> str:
    """``SEMDIR_TEST_DEVICE=cuda`` runs the host tests on the GPU (the host's default device)."""
    return os.environ.get("SEMDIR_TEST_DEVICE", "cpu")


_shared = []


def shared_host(device: str | None = None) -> Host:
    """The process's host on a temporary base directory (removed at exit), made on first use, on
    ``device`` (default: :func:`requested_device`)."""
    if not _shared:
        base = Path(tempfile.mkdtemp(prefix="semdir-host-"))
        atexit.register(shutil.rmtree, base, ignore_errors=True)
        _shared.append(Host(base, device=device or requested_device()))
    return _shared[0]
