"""The pack's layout promises: a host-free library, relative imports, consistent metadata."""
import ast
import os
import re
import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, from requirements-test.txt
    import tomli as tomllib

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


def test_the_code_passes_the_projects_lint_rules():
    """ruff with pyproject.toml's rules (pyflakes, pycodestyle at 120 columns, import order with the host's modules
    in their own section, bugbear): new code keeps the style of the rest."""
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", str(REPO)], capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


# Cited paths: a repository folder, then a file name with an extension. The lookbehind keeps out
# URLs and paths inside other folders (``models/directions/x.safetensors``), and ``*`` or ``<``
# (``workflows/*.json``, ``workflows/<name>.jpg``) stop a match, since those are patterns.
CITED_FOLDERS = ("docs", "directions", "nodes", "harness", "scripts", "benchmarks", "world", "tests", "workflows")
CITED_PATH = re.compile(r"(?<![\w./<>*-])((?:" + "|".join(CITED_FOLDERS) + r")/[\w./-]*\w\.\w+)")
MATH_SECTION = re.compile(r"docs/math\.md, section '([^']+)'")
MARKDOWN_LINK = re.compile(r"\]\(([^)\s]+)\)")
CODE_FOLDERS = ("directions", "nodes", "harness", "scripts", "benchmarks", "world")


def repository_texts():
    """(path, text) of every .py and .md file of the repository outside hidden and generated folders."""
    for folder, subfolders, files in os.walk(REPO):
        subfolders[:] = sorted(d for d in subfolders if not d.startswith(".") and d not in {"out", "__pycache__"})
        for name in sorted(files):
            if name.endswith((".py", ".md")):
                path = Path(folder) / name
                yield path, path.read_text(encoding="utf-8")


def slug(heading: str) -> str:
    """A heading's anchor as GitHub renders it: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def headings(path: Path) -> list:
    return [line.lstrip("#").strip() for line in path.read_text(encoding="utf-8").splitlines()
            if line.startswith("#")]


def test_cited_paths_and_math_sections_exist():
    """Every repository path the code and docs name resolves, every section of docs/math.md cited by
    its heading is a heading there, and every relative Markdown link (and its #anchor) is real."""
    math_headings = headings(REPO / "docs" / "math.md")
    broken = []
    for path, text in repository_texts():
        where = path.relative_to(REPO)
        flat = " ".join(text.split())  # a citation may wrap across lines
        broken += [(where, cited) for cited in CITED_PATH.findall(text) if not (REPO / cited).exists()]
        broken += [(where, f"section {name!r}") for name in MATH_SECTION.findall(flat) if name not in math_headings]
        if path.suffix == ".md":
            for link in MARKDOWN_LINK.findall(text):
                if re.match(r"[a-z]+:", link):
                    continue
                target, _, anchor = link.partition("#")
                resolved = (path.parent / target) if target else path
                if not resolved.exists() or (anchor and resolved.suffix == ".md"
                                             and anchor not in map(slug, headings(resolved))):
                    broken.append((where, link))
    assert broken == []


def test_math_doc_is_cited_from_the_library():
    """The library points readers at its derivations (and the citation test above checks each one)."""
    cited = {path.name for path, text in repository_texts()
             if path.parent.name == "directions" and "docs/math.md" in text}
    assert {"attention.py", "apply.py", "asyrp.py", "inversion.py", "svd.py", "activations.py"} <= cited


@pytest.mark.parametrize("folder", CODE_FOLDERS)
def test_code_cites_nothing_outside_the_repository(folder):
    """Design notes outside the repository are not something a reader has: code cites docs/math.md."""
    offenders = [str(path.relative_to(REPO)) for path in sorted((REPO / folder).rglob("*.py"))
                 if "design.md" in path.read_text(encoding="utf-8").lower()]
    assert offenders == []


def test_a_process_holds_one_copy_of_the_library(host):
    """Tests, benchmarks and the demo import the very modules the host's nodes run (one DirectionSet class)."""
    from harness.test_nodes.unets import build_unet
    from semantic_directions.directions.directionset import DirectionSet
    made = host.nodes.NODE_CLASS_MAPPINGS["DiscoverAttentionEigendirections"]().discover(
        build_unet("sd15"), "input_blocks.1", 2, "value", 1.0)[0]
    assert isinstance(made, DirectionSet)
    library_files = [module for module in list(sys.modules.values()) if getattr(module, "__file__", None)
                     and Path(module.__file__).resolve() == REPO / "directions" / "directionset.py"]
    assert len({id(module) for module in library_files}) == 1
    assert not any(name == "directions" or name.startswith("directions.") for name in sys.modules)


def test_only_the_harness_changes_the_import_path():
    """One documented place edits sys.path (harness/comfyui.py, to make the host importable)."""
    edit = re.compile(r"^\s*sys\.path\.(insert|append|extend)\(|^\s*sys\.path\s*=", re.MULTILINE)
    editing = sorted(str(path.relative_to(REPO)) for path in REPO.rglob("*.py")
                     if not path.is_relative_to(REPO / ".venv") and not path.is_relative_to(REPO / ".cache")
                     and edit.search(path.read_text(encoding="utf-8")))
    assert editing == ["harness/comfyui.py"]
