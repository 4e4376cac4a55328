"""The pack's layout promises: a host-free library, relative imports, consistent metadata."""
import ast
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
HOST_MODULES = ("comfy", "comfy_extras", "comfy_execution", "comfy_api", "folder_paths", "nodes",
                "execution", "server")
LIBRARY_DEPENDENCIES = {"torch", "numpy", "safetensors", "einops"}


def library_modules():
    return sorted(f"directions.{p.stem}" if p.stem != "__init__" else "directions"
                  for p in (REPO / "directions").glob("*.py"))


def test_library_imports_nothing_of_the_host():
    """Every module of directions/, imported in a fresh interpreter, loads no host module."""
    code = (f"import importlib, sys\n"
            f"for name in {library_modules()!r}: importlib.import_module(name)\n"
            f"print(' '.join(sorted(sys.modules)))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            cwd=REPO)  # -c puts the working folder, the repository, first on the path
    modules = loaded.stdout.split()
    assert "directions.fileformat" in modules
    leaked = [m for m in modules if m.split(".")[0] in HOST_MODULES or m.startswith("comfy")]
    assert leaked == []


def imports_of(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            yield from ((alias.name, 0) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            yield node.module or "", node.level


@pytest.mark.parametrize("path", sorted((REPO / "directions").glob("*.py")), ids=lambda p: p.name)
def test_library_depends_only_on_its_four_packages(path):
    for module, level in imports_of(path):
        top = module.split(".")[0]
        if level == 0:
            assert top in LIBRARY_DEPENDENCIES or top in sys.stdlib_module_names, (path.name, module)


@pytest.mark.parametrize("path", [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py"))],
                         ids=lambda p: p.name)
def test_pack_imports_are_relative(path):
    """The host owns top-level names like ``nodes``: the pack reaches its own modules relatively."""
    for module, level in imports_of(path):
        if level == 0:
            assert module.split(".")[0] not in {"directions"} and module != "nodes", (path.name, module)


def test_requirements_match_pyproject_and_never_touch_torch():
    requirements = [line.strip() for line in (REPO / "requirements.txt").read_text().splitlines()
                    if line.strip() and not line.startswith("#")]
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert requirements == project["dependencies"]
    assert not any(r.split("=")[0].split(">")[0].split("<")[0].strip().lower()
                   in {"torch", "torchvision", "torchaudio"} for r in requirements)


def test_registry_metadata_and_version():
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    project, comfy = config["project"], config["tool"]["comfy"]
    for key in ("name", "version", "description", "license", "dependencies"):
        assert project[key], key
    assert project["urls"]["Repository"].startswith("https://")
    for key in ("PublisherId", "DisplayName", "Icon"):
        assert comfy[key], key
    import semantic_directions.directions
    assert semantic_directions.directions.__version__ == project["version"]


def test_registry_security_checks_pass():
    """The Comfy Registry's `node validate` runs ruff with these rules (exec, eval, `;` statements)."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--select", "S102,S307,E702",
                             "--exclude", ".venv,.cache", str(REPO)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
