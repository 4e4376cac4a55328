import contextlib
import os
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
    """One torch thread unless OMP_NUM_THREADS says otherwise; then the host, first: it loads the pack,
    which test modules then import as ``semantic_directions``.

    The tests' models are tiny: a second thread gains nothing on them, and where other processes keep
    the cores busy every op waits for it to be scheduled (on 2 loaded cores the tiny UNet took 0.05 s a
    call on 1 thread and 0.9 to 1.4 s on 2, so a workflow test took 230 s instead of 9)."""
    if "OMP_NUM_THREADS" not in os.environ:
        import torch
        torch.set_num_threads(1)
    shared_host()


@pytest.fixture(scope="session")
def host():
    """The real ComfyUI host with the pack loaded from a custom_nodes folder (one per process)."""
    return shared_host()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def running_server(base, *extra_args):
    """``main.py --cpu`` on a free port over a prepared base, plus ``extra_args``; yields (url, log
    path) and stops the server after. Every wait is bounded."""
    port, log_path = free_port(), base / "server.log"
    command = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
               "--base-directory", str(base), "--database-url", "sqlite:///:memory:",
               "--disable-auto-launch", *extra_args]
    with log_path.open("w") as log:
        process = subprocess.Popen(command, cwd=ensure_host(), stdout=log, stderr=subprocess.STDOUT,
                                   env={"OMP_NUM_THREADS": "1", **server_environment()})  # as pytest_configure
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
        yield url, log_path
    finally:
        process.terminate()
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=20)


def server_base(tmp_path_factory):
    """A fresh base folder for a server: the pack in custom_nodes and one direction file."""
    from directions_testing import sample_set

    from semantic_directions.directions.fileformat import save_directions
    base = prepare_base(tmp_path_factory.mktemp("server-base"))
    save_directions(sample_set(), base / "models" / "directions" / "seed.safetensors")
    return base


@pytest.fixture(scope="session")
def server(tmp_path_factory):
    """``main.py --cpu`` on a free port with the pack in custom_nodes and one direction file;
    yields (url, base folder, log path). Every wait is bounded."""
    base = server_base(tmp_path_factory)
    with running_server(base) as (url, log_path):
        yield url, base, log_path


@pytest.fixture(scope="session")
def start_server(tmp_path_factory):
    """Start another server like ``server`` with extra arguments (``--front-end-root DIR``):
    ``with start_server(*args) as (url, base, log_path):``, on its own base folder."""
    @contextlib.contextmanager
    def start(*extra_args):
        base = server_base(tmp_path_factory)
        with running_server(base, *extra_args) as (url, log_path):
            yield url, base, log_path
    return start
