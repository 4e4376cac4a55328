import socket
import subprocess
import sys
import time

import pytest
import requests

from harness.comfyui import ensure_host
from harness.host import prepare_base, server_environment, shared_host

SERVER_START_TIMEOUT_S = 180


def pytest_configure(config):
    """The host first: it loads the pack, which test modules then import as ``semantic_directions``."""
    shared_host()


@pytest.fixture(scope="session")
def host():
    """The real ComfyUI host with the pack loaded from a custom_nodes folder (one per process)."""
    return shared_host()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``main.py --cpu`` on a free port with the pack in custom_nodes and one direction file;
    yields (url, base folder, log path). Every wait is bounded."""
    from directions_testing import sample_set
    from semantic_directions.directions.fileformat import save_directions
    base = prepare_base(tmp_path_factory.mktemp("server-base"))
    save_directions(sample_set(), base / "models" / "directions" / "seed.safetensors")
    port, log_path = free_port(), base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch"]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ensure_host(), stdout=log, stderr=subprocess.STDOUT,
                                   env=server_environment())
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
