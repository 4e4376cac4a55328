import socket
import subprocess
import sys
import time

import pytest
import requests

from host import Host, prepare_base, requested_device  # first: it puts scripts/ on the path
from directions_testing import sample_set
from directions.fileformat import save_directions
from fetch_comfyui import ensure_host

SERVER_START_TIMEOUT_S = 180


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real ComfyUI host with the pack loaded from a custom_nodes folder (one per session)."""
    return Host(tmp_path_factory.mktemp("comfyui-base"), device=requested_device())


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``main.py --cpu`` on a free port with the pack in custom_nodes and one direction file;
    yields (url, base folder, log path). Every wait is bounded."""
    base = prepare_base(tmp_path_factory.mktemp("server-base"))
    save_directions(sample_set(), base / "models" / "directions" / "seed.safetensors")
    port, log_path = free_port(), base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ensure_host(), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while True:
            assert process.poll() is None, f"server exited:\n{log_path.read_text()[-3000:]}"
            assert time.monotonic() < deadline, \
                f"server not up in {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}"
            try:
                if requests.get(f"{url}/system_stats", timeout=5).ok:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        yield url, base, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)
