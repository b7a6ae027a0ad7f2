"""Pytest fixtures and options: tiny models of both architectures (one per test, or both per module), the
device under test, one thread, and a model cache per module. Plain helpers are in tests/helpers.py."""

from __future__ import annotations

import pytest
import torch

from lmview.models import ModelBundle, load_model


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for model tests: cpu or cuda")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request, device):
    return load_model(request.param, device=device)


@pytest.fixture(scope="module")
def tiny_models() -> dict[str, ModelBundle]:
    """Fresh tiny models of both architectures, by name, shared by one module's tests."""
    return {name: load_model(name, "cpu") for name in ("tiny-gpt2", "tiny-llama")}


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from intra-op threads, and a busy CPU makes them spin."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory):
    """One cache dir per test module: tiny models are built once, statistics land here."""
    root = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KEBENCH_CACHE", str(root))
        yield root


@pytest.fixture(autouse=True)
def no_stop_left_over():
    """A test that delivers SIGTERM in-process leaves its record in bench.signals; later runs must not stop on it."""
    import bench.signals

    yield
    bench.signals._received.clear()
