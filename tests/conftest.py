import pytest

from host import Host, requested_device


@pytest.fixture(scope="session")
def host(tmp_path_factory):
    """The real ComfyUI host with the pack loaded from a custom_nodes folder (one per session)."""
    return Host(tmp_path_factory.mktemp("comfyui-base"), device=requested_device())
