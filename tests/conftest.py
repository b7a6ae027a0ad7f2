"""Shared fixtures: tiny models of both architectures, and the device under test."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.models import load_model

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for model tests: cpu or cuda")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request, device):
    return load_model(request.param, device=device)
