"""Direction files: safetensors with the set's description as JSON in the header. Never pickle.

Layout: one tensor ``<site>:vectors`` ([count, width] float32) per site and ``<site>:gains``
([count] float32) where the set has gains; the header's metadata key ``semantic_directions``
holds ``{"format", "format_version", "pack_version", "method", "params", "model", "sites"}``,
``sites`` listing ``{"name", "count", "width", "gains"}`` in the set's order. Loading checks all
of it and reports the first problem in one line that names the file.
"""
import json
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .directionset import DirectionError, DirectionSet, SiteDirections

FORMAT = "semantic-directions"
FORMAT_VERSION = 1
METADATA_KEY = "semantic_directions"
SUFFIX = ".safetensors"
_HEADER_LIMIT = 100 * 1024 * 1024
_SAFE_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 ._+=()\[\]-]*$")
# Names Windows reserves for devices, with any extension: a file called so cannot be shared with it.
_RESERVED = re.compile(r"^(CON|PRN|AUX|NUL|COM[0-9]|LPT[0-9])(\..*)?$", re.IGNORECASE)
MAX_PART = 200  # characters a folder or file name may have (file systems allow 255 bytes, the suffix and .partial too)
MAX_NAME = 1000


class DirectionFileError(ValueError):
    """A direction file that cannot be read or written; the message is one line naming the file."""


def save_directions(dset: DirectionSet, path, overwrite: bool = False) -> Path:
    """Write ``dset`` to ``path``; refuses to replace an existing file unless ``overwrite``."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise DirectionFileError(f"{path.name}: a file of that name exists; choose another name "
                                 f"or allow overwriting")
    tensors, sites = {}, []
    for name, site in dset.sites.items():
        tensors[f"{name}:vectors"] = site.vectors.detach().cpu().contiguous()
        if site.gains is not None:
            tensors[f"{name}:gains"] = site.gains.detach().cpu().contiguous()
        sites.append({"name": name, "count": site.count, "width": site.width,
                      "gains": site.gains is not None})
    header = {"format": FORMAT, "format_version": FORMAT_VERSION, "pack_version": dset.pack_version,
              "method": dset.method, "params": dset.params, "model": dset.model, "sites": sites}
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_file(tensors, str(partial), metadata={METADATA_KEY: json.dumps(header, allow_nan=False)})
    os.replace(partial, path)
    return path


def load_directions(path) -> DirectionSet:
    """Read and fully validate a direction file; raise DirectionFileError on any problem."""
    path = Path(path)
    try:
        return _load(path)
    except DirectionError as err:
        raise DirectionFileError(f"{path.name}: {err}") from None


def _load(path: Path) -> DirectionSet:
    if not path.is_file():
        raise DirectionError("no such file")
    _check_container(path)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            names = set(handle.keys())
            header = _parse_header(metadata)
            expected = {}
            for entry in header["sites"]:
                expected[f"{entry['name']}:vectors"] = (entry["count"], entry["width"])
                if entry["gains"]:
                    expected[f"{entry['name']}:gains"] = (entry["count"],)
            missing, extra = sorted(set(expected) - names), sorted(names - set(expected))
            if missing:
                raise DirectionError(f"missing tensors {missing}")
            if extra:
                raise DirectionError(f"unexpected tensors {extra}")
            tensors = {}
            for name, shape in expected.items():
                tensor = handle.get_tensor(name)
                if tensor.dtype != torch.float32 or tuple(tensor.shape) != shape:
                    raise DirectionError(f"tensor {name} is {str(tensor.dtype).removeprefix('torch.')} "
                                         f"{list(tensor.shape)}, expected float32 {list(shape)}")
                tensors[name] = tensor
    except SafetensorError as err:
        raise DirectionError(f"not a readable safetensors file ({_one_line(err)})") from None
    sites = {entry["name"]: SiteDirections(tensors[f"{entry['name']}:vectors"],
                                           tensors.get(f"{entry['name']}:gains"))
             for entry in header["sites"]}
    return DirectionSet(sites=sites, method=header["method"], model=header["model"],
                        params=header["params"], pack_version=header["pack_version"])


def _check_container(path: Path) -> None:
    """Recognise the files people rename by mistake before handing the bytes to safetensors."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(9)
    header_size = int.from_bytes(head[:8], "little")
    if len(head) == 9 and head[8:] == b"{" and header_size <= min(size - 8, _HEADER_LIMIT):
        return
    if head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[1:2] in b"\x02\x03\x04\x05"):
        raise DirectionError("this is a PyTorch pickle (.pt/.ckpt), not a safetensors direction "
                             "file; pickles are never loaded")
    if len(head) < 9:
        raise DirectionError(f"truncated: {size} bytes is too short for a safetensors file")
    if head[8:] == b"{":
        raise DirectionError(f"truncated: the header claims {header_size} bytes but the file has {size}")
    raise DirectionError("not a safetensors file (no JSON header at its start)")


def _parse_header(metadata: dict) -> dict:
    if METADATA_KEY not in metadata:
        raise DirectionError(f"no '{METADATA_KEY}' metadata: not a direction file of this pack")
    try:
        header = json.loads(metadata[METADATA_KEY])
    except json.JSONDecodeError as err:
        raise DirectionError(f"metadata is not valid JSON ({err})") from None
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise DirectionError(f"metadata format is not '{FORMAT}'")
    version = header.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise DirectionError(f"format_version {version!r} is not a positive integer")
    if version > FORMAT_VERSION:
        raise DirectionError(f"written with format version {version}, newer than this pack reads "
                             f"({FORMAT_VERSION}); update the pack")
    for key, kind in (("pack_version", str), ("method", str), ("params", dict), ("model", dict),
                      ("sites", list)):
        if not isinstance(header.get(key), kind):
            raise DirectionError(f"metadata field '{key}' is missing or not a {kind.__name__}")
    if not header["sites"]:
        raise DirectionError("metadata lists no sites")
    seen = set()
    for entry in header["sites"]:
        if not (isinstance(entry, dict) and isinstance(entry.get("name"), str)
                and _positive_int(entry.get("count")) and _positive_int(entry.get("width"))
                and isinstance(entry.get("gains"), bool)):
            raise DirectionError(f"metadata site entry {entry!r} needs name, count, width, gains")
        if entry["name"] in seen:
            raise DirectionError(f"site {entry['name']} is listed twice")
        seen.add(entry["name"])
    return header


def _positive_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def safe_file_path(folder, name: str) -> Path:
    """The path for a user-given file name inside ``folder``, refusing anything that leaves it.

    Sub-folders are allowed (``faces/smile``); the suffix is added when missing.
    """
    if not isinstance(name, str) or not name.strip():
        raise DirectionFileError("file name is empty")
    if len(name) > MAX_NAME:
        raise DirectionFileError(f"file name is {len(name)} characters long; keep it under {MAX_NAME}")
    parts = name.strip().replace("\\", "/").split("/")
    for part in parts:
        if len(part) > MAX_PART:
            raise DirectionFileError(f"file name part {part[:40]!r}... is {len(part)} characters long; keep each "
                                     f"folder and file name under {MAX_PART}")
        if _RESERVED.match(part):
            raise DirectionFileError(f"file name {part!r} is reserved on Windows (CON, PRN, AUX, NUL, COM0-9, "
                                     f"LPT0-9); choose another so the file can be shared")
        if not _SAFE_PART.match(part) or part.endswith((" ", ".")):
            raise DirectionFileError(
                f"file name {name!r} is not allowed: use letters, digits, spaces and ._-+=()[] "
                f"with '/' between sub-folders, no '..' and no absolute path")
    if not parts[-1].endswith(SUFFIX):
        parts[-1] += SUFFIX
    folder = Path(folder).resolve()
    path = folder.joinpath(*parts).resolve()
    if folder not in path.parents:
        raise DirectionFileError(f"file name {name!r} leads outside the directions folder")
    return path
