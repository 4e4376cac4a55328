"""The README's demo command on the built-in faces world model: it writes its folder and names it."""
import os
import re
import subprocess
import sys

import pytest
from PIL import Image
from safetensors import safe_open

from harness.host import REPO

pytestmark = pytest.mark.server


def test_demo_writes_its_folder(tmp_path):
    result = subprocess.run([sys.executable, "-m", "scripts.demo"], cwd=REPO, capture_output=True, text=True,
                            timeout=900, env={**os.environ, "DEMO_OUT": str(tmp_path), "CKPT": ""})
    assert result.returncode == 0, result.stderr[-3000:]
    folder = re.search(r"demo: everything is in (\S+)", result.stdout).group(1)
    files = {path.name for path in tmp_path.glob("demo-*/*")}
    assert str(tmp_path) in folder and {"report.txt", "directions_whitened.safetensors", "input_photo.png"} <= files
    assert all(any(name.startswith(prefix) for name in files)
               for prefix in ("semdir_sweep", "semdir_edited", "semdir_reconstruction"))
    report = next(tmp_path.glob("demo-*/report.txt")).read_text()
    assert "faces world model" in report and re.search(r"\d+\.\d+ s  render the strength sweep", report)
    edited = Image.open(next(tmp_path.glob("demo-*/semdir_edited_*.png")))
    assert edited.size == (128, 128)  # the world's 32 pixels, shown 4x
    with safe_open(str(next(tmp_path.glob("demo-*/directions_whitened.safetensors"))), "pt") as directions:
        assert directions.metadata()["semantic_directions"]
