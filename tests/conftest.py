"""Shared fixtures: tiny models of both architectures, and the device under test."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from lmview.models import load_model

SHARED_DATA = Path(__file__).resolve().parent.parent.parent / "shared" / "data"


def pytest_addoption(parser):
    parser.addoption("--device", default="cpu", help="device for model tests: cpu or cuda")


@pytest.fixture(scope="session")
def device(request) -> str:
    return request.config.getoption("--device")


@pytest.fixture(scope="session", params=["tiny-gpt2", "tiny-llama"])
def tiny_model(request, device):
    return load_model(request.param, device=device)


WORDS = ("the capital of France is Paris and the language of Germany is German while rivers run "
         "through old cities where people speak many languages about history music science art").split()


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


def write_pseudo_corpus(folder: Path, n_paragraphs: int) -> Path:
    """Seeded pseudo-English paragraphs, enough tokens for a full-rank C on the tiny models."""
    rng = random.Random(0)
    paras = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(40, 80))) + "." for _ in range(n_paragraphs)]
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(paras))
    return path


def tiny_rome_hparams(folder: Path, topic: str, model: str = "tiny-gpt2") -> Path:
    """The shipped tiny-model ROME YAML with key statistics from a 30-paragraph corpus about `topic`."""
    corpus = folder / "corpus.txt"
    corpus.write_text("\n\n".join(f"Text number {i} on {topic}." for i in range(30)))
    repo = Path(__file__).resolve().parent.parent
    base = (repo / "editors" / "hparams" / "rome" / f"{model}.yaml").read_text()
    path = folder / "rome.yaml"
    path.write_text(base + f"\nmom2_dataset: {corpus}\nmom2_n_samples: 30\n")
    return path
