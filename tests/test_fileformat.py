"""Library layer: the direction data model and its safetensors file format, on plain tensors."""
import json
import pickle
import re
import struct

import pytest
import torch
from directions_testing import SITE_A, orthonormal, sample_set
from safetensors.torch import save_file

from semantic_directions.directions import __version__
from semantic_directions.directions.directionset import (
    DirectionError,
    DirectionSet,
    SiteDirections,
    describe,
    site_kind,
)
from semantic_directions.directions.fileformat import (
    FORMAT_VERSION,
    METADATA_KEY,
    DirectionFileError,
    load_directions,
    safe_file_path,
    save_directions,
)


def assert_same(a: DirectionSet, b: DirectionSet):
    assert list(a.sites) == list(b.sites)
    for name in a.sites:
        assert torch.equal(a.sites[name].vectors, b.sites[name].vectors)
        ga, gb = a.sites[name].gains, b.sites[name].gains
        assert (ga is None and gb is None) or torch.equal(ga, gb)
    assert (a.method, a.model, a.params, a.pack_version) == (b.method, b.model, b.params, b.pack_version)


@pytest.mark.parametrize("gains", [True, False])
def test_round_trip_is_bit_identical(tmp_path, gains):
    dset = sample_set(gains)
    path = save_directions(dset, tmp_path / "set.safetensors")
    assert_same(dset, load_directions(path))
    assert not list(tmp_path.glob("*.partial"))


def test_save_refuses_to_overwrite_unless_asked(tmp_path):
    path = save_directions(sample_set(), tmp_path / "set.safetensors")
    before = path.read_bytes()
    with pytest.raises(DirectionFileError, match="exists"):
        save_directions(sample_set(gains=False), path)
    assert path.read_bytes() == before
    save_directions(sample_set(gains=False), path, overwrite=True)
    assert load_directions(path).sites[SITE_A].gains is None


def rewrite(path, tensors=None, header=None, metadata=None):
    """Write a file like the pack does, with parts replaced."""
    good = sample_set()
    save_directions(good, path, overwrite=True)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as handle:
        current = {k: handle.get_tensor(k) for k in handle.keys()}
        meta = handle.metadata()
    head = json.loads(meta[METADATA_KEY])
    if header:
        header(head)
    if tensors:
        tensors(current)
    meta = metadata if metadata is not None else {METADATA_KEY: json.dumps(head)}
    save_file(current, str(path), metadata=meta)
    return path


def set_item(mapping, key, value):
    mapping[key] = value


BAD_FILES = {
    "truncated": (lambda p: p.write_bytes(p.read_bytes()[:-100]), "truncated|not a readable"),
    "truncated header": (lambda p: p.write_bytes(p.read_bytes()[:50]), "truncated"),
    "tiny file": (lambda p: p.write_bytes(b"\x01\x02"), "too short"),
    "renamed pickle": (lambda p: p.write_bytes(pickle.dumps({"x": 1}, protocol=4)), "pickle"),
    "renamed torch.save": (lambda p: torch.save({"v": torch.ones(2)}, p), "pickle"),
    "not safetensors": (lambda p: p.write_bytes(b"GIF89a" + bytes(100)), "not a safetensors file"),
    "broken header": (lambda p: p.write_bytes(struct.pack("<Q", 10) + b"{not json}" + bytes(8)),
                      "not a readable safetensors file"),
    "extra tensor": (lambda p: rewrite(p, tensors=lambda t: set_item(t, "stray", torch.zeros(3))),
                     r"unexpected tensors \['stray'\]"),
    "missing tensor": (lambda p: rewrite(p, tensors=lambda t: t.pop(f"{SITE_A}:gains")),
                       "missing tensors"),
    "NaN": (lambda p: rewrite(p, tensors=lambda t: t[f"{SITE_A}:vectors"].__setitem__((0, 0), float("nan"))),
            "NaN"),
    "not unit norm": (lambda p: rewrite(p, tensors=lambda t: t[f"{SITE_A}:vectors"].mul_(2)), "unit norm"),
    "wrong dtype": (lambda p: rewrite(p, tensors=lambda t: set_item(
        t, f"{SITE_A}:vectors", t[f"{SITE_A}:vectors"].half())), "float16"),
    "wrong shape": (lambda p: rewrite(p, tensors=lambda t: set_item(
        t, f"{SITE_A}:vectors", orthonormal(4, 32, 0))), r"expected float32 \[4, 64\]"),
    "newer format": (lambda p: rewrite(p, header=lambda h: set_item(h, "format_version", FORMAT_VERSION + 1)),
                     "newer than this pack reads"),
    "no metadata": (lambda p: rewrite(p, metadata={}), "no 'semantic_directions' metadata"),
    "metadata not json": (lambda p: rewrite(p, metadata={METADATA_KEY: "{oops"}), "not valid JSON"),
    "wrong format": (lambda p: rewrite(p, header=lambda h: set_item(h, "format", "other")), "format"),
    "bad site entry": (lambda p: rewrite(p, header=lambda h: h["sites"][0].pop("width")),
                       "needs name, count, width, gains"),
    "missing field": (lambda p: rewrite(p, header=lambda h: h.pop("method")), "'method'"),
    "unknown site": (lambda p: rewrite(p, header=lambda h: set_item(h["sites"][0], "name", "weird"),
                                       tensors=lambda t: [set_item(t, k.replace(SITE_A, "weird"), t.pop(k))
                                                          for k in list(t) if k.startswith(SITE_A)]),
                     "not a known site"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_files_get_one_line_errors_naming_the_file(tmp_path, case):
    damage, expected = BAD_FILES[case]
    path = tmp_path / "bad_file.safetensors"
    save_directions(sample_set(), path)
    damage(path)
    with pytest.raises(DirectionFileError) as err:
        load_directions(path)
    message = str(err.value)
    assert message.startswith("bad_file.safetensors: ")
    assert "\n" not in message
    assert re.search(expected, message), message


def test_missing_file(tmp_path):
    with pytest.raises(DirectionFileError, match="nope.safetensors: no such file"):
        load_directions(tmp_path / "nope.safetensors")


def test_loading_never_unpickles(tmp_path, monkeypatch):
    path = tmp_path / "evil.safetensors"
    torch.save({"v": torch.ones(2)}, path)
    monkeypatch.setattr(pickle, "loads", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("unpickled"))
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load called"))
    with pytest.raises(DirectionFileError, match="pickle"):
        load_directions(path)


@pytest.mark.parametrize("name", ["../escape", "/etc/passwd", "a/../../b", "..", "", "  ", "a\\..\\..\\b",
                                  "con\x00trol", "sub/.hidden", "trailing."])
def test_unsafe_names_are_refused(tmp_path, name):
    with pytest.raises(DirectionFileError, match="file name"):
        safe_file_path(tmp_path, name)


def test_safe_names_stay_inside_the_folder(tmp_path):
    assert safe_file_path(tmp_path, "smile") == (tmp_path / "smile.safetensors").resolve()
    assert safe_file_path(tmp_path, "faces/smile v2.safetensors") == \
        (tmp_path / "faces" / "smile v2.safetensors").resolve()


def test_data_model_rejects_bad_sets():
    good = orthonormal(2, 8, 0)
    cases = [
        ({"not_a_site": SiteDirections(good)}, "not a known site"),
        ({SITE_A: SiteDirections(good.double())}, "float32"),
        ({SITE_A: SiteDirections(good * 3)}, "unit norm"),
        ({SITE_A: SiteDirections(good, torch.ones(3))}, "gains"),
        ({SITE_A: SiteDirections(good, torch.tensor([1.0, float("inf")]))}, "infinite"),
        ({}, "at least one site"),
    ]
    for sites, expected in cases:
        with pytest.raises(DirectionError, match=expected):
            DirectionSet(sites=sites, method="m", model={"family": "SD15", "fingerprint": "x"})
    with pytest.raises(DirectionError, match="finite numbers"):
        DirectionSet(sites={SITE_A: SiteDirections(good)}, method="m",
                     model={"family": "SD15", "fingerprint": "x"}, params={"c": float("nan")})


def test_site_kinds_and_summary():
    assert site_kind(SITE_A) == "attn1"
    assert site_kind("h_space") == "h_space"
    with pytest.raises(DirectionError, match="'latent' is not a known site"):
        site_kind("latent")  # no node makes or takes directions in the latent itself
    text = describe(sample_set())
    assert text.splitlines()[0] == f"test directions for SD15 (3 sites, pack {__version__})"
    assert f"{SITE_A}: 4 x 64" in text
