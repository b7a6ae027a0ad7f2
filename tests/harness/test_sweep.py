"""bench sweep: suite expansion, Ray kept out of `bench run`, and (with Ray installed) a sharded sweep equal
to the serial run, also when a worker is killed with SIGKILL in the middle of a batch.

Ray's start takes tens of seconds on a busy 2-core machine, so the Ray tests are two, each one sweep."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench.cli import main
from bench.sweep import SweepError, import_ray, load_suite
from tests.helpers import REPO_ROOT, bench_process

requires_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                                  reason="Ray is not installed (optional extra: pip install -e '.[sweep]')")


def write_suite(folder: Path, text: str) -> Path:
    path = folder / "suite.yaml"
    path.write_text(text)
    return path


def test_suite_expands_every_axis_and_hparams_files(tmp_path):
    (tmp_path / "a.yaml").write_text("lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("lr: 0.2\n")
    suite = write_suite(tmp_path, "editors: [ft-l, rome]\nmodels: [tiny-gpt2, tiny-llama]\ndatasets: facts\n"
                                  "seeds: [0, 1, 2]\nhparams: {ft-l: [a.yaml, b.yaml]}\nrun: {n: 3, circuits: false}\n"
                                  "output: out\n")
    runs, out = load_suite(suite)
    # ft-l: 2 models x 3 seeds x 2 files; rome: 2 models x 3 seeds with its default hyperparameters
    assert len(runs) == 12 + 6 and out == str(tmp_path / "out")
    assert len({r.key for r in runs}) == len(runs)
    assert {r.cfg.hparams for r in runs if r.cfg.editor == "ft-l"} == {str(tmp_path / "a.yaml"), str(tmp_path / "b.yaml")}
    assert {r.cfg.hparams for r in runs if r.cfg.editor == "rome"} == {None}
    assert all(r.cfg.n == 3 and r.cfg.circuits is False and r.cfg.output == out for r in runs)
    assert load_suite(suite, "elsewhere")[1] == "elsewhere"
    assert [r.key for r in load_suite(suite)[0]] == [r.key for r in runs]  # the same suite, the same run folders


@pytest.mark.parametrize("text, message", [
    ("- a list", "expected a mapping"),
    ("editors: [ft-l]\nmodels: [tiny-gpt2]\ndatasets: [facts]\n", "'seeds' must be a value or a non-empty list"),
    ("editors: []\nmodels: [m]\ndatasets: [d]\nseeds: [0]\n", "'editors' must be"),
    ("editors: [ft-l]\nmodels: [m]\ndatasets: [d]\nseeds: [0]\nworkers: 3\n", "unknown key 'workers'"),
    ("editors: [ft-l]\nmodels: [m]\ndatasets: [d]\nseeds: [0]\nrun: {editor: x}\n", "not a setting: ['editor']"),
    ("editors: [ft-l]\nmodels: [m]\ndatasets: [d]\nseeds: [0]\nrun: {sequential: true}\n", "not sharded"),
    ("editors: [ft-l\n", "invalid YAML"),
])
def test_bad_suites_get_one_error_line(tmp_path, capsys, text, message):
    assert main(["sweep", str(write_suite(tmp_path, text))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err, err


def test_bench_run_does_not_import_ray_and_a_sweep_without_it_says_how_to_install(monkeypatch):
    code = "import sys, bench.cli, bench.run; bench.cli._parser(); assert 'ray' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)
    monkeypatch.setitem(sys.modules, "ray", None)  # what an environment without the extra sees
    with pytest.raises(SweepError, match=r"pip install -e '\.\[sweep\]'"):
        import_ray()


# --- with Ray ------------------------------------------------------------------------------------

def untimed(path: Path) -> list[dict]:
    return [{k: v for k, v in json.loads(line).items() if not k.startswith("seconds")}
            for line in path.read_text().splitlines()]


def only_run(folder: Path) -> Path:
    (run_dir,) = [p for p in folder.iterdir() if p.is_dir()]
    return run_dir


def sweep_process(suite: Path, out: Path, cache: Path, *extra: str) -> subprocess.Popen:
    return bench_process(["sweep", str(suite), "--output", str(out), "--workers", "2", *extra], cache,
                         start_new_session=True)


SUITE = "editors: [ft-l]\nmodels: [tiny-gpt2]\ndatasets: [facts]\nseeds: [{seed}]\nrun: {run}\n"


@requires_ray
def test_sweep_on_two_workers_equals_the_serial_run(tmp_path, cache, one_thread):
    """Cases and circuit files byte for byte (timings aside), the summary's state, and a second call that
    finds the run complete and starts no Ray."""
    run = "{n: 4, ppl_texts: 0}"
    assert main(["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--ppl-texts", "0", "--n", "4", "--seed", "3",
                 "--output", str(tmp_path / "serial")]) == 0
    suite = write_suite(tmp_path, SUITE.format(seed=3, run=run))
    process = sweep_process(suite, tmp_path / "sweep", cache)
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err
    serial, sharded = only_run(tmp_path / "serial"), only_run(tmp_path / "sweep")
    assert untimed(sharded / "cases.jsonl") == untimed(serial / "cases.jsonl")
    files = sorted(p.name for p in (serial / "circuits").iterdir())
    assert files and files == sorted(p.name for p in (sharded / "circuits").iterdir())
    assert all((serial / "circuits" / f).read_bytes() == (sharded / "circuits" / f).read_bytes() for f in files)
    manifest = json.loads((sharded / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["sweep"]["workers"] == 2
    again = subprocess.run([sys.executable, "-m", "bench", "sweep", str(suite), "--output", str(tmp_path / "sweep")],
                           cwd=REPO_ROOT, env=dict(os.environ, KEBENCH_CACHE=str(cache)), capture_output=True, text=True,
                           timeout=300)
    assert again.returncode == 0 and "(already complete)" in again.stdout and "Ray" not in again.stderr


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, command line) of every process under root."""
    parents, commands = {}, {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                parents[int(entry.name)] = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                commands[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
            except (OSError, ValueError, IndexError):
                continue
    found, frontier = [], [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent]
        found += [(pid, commands[pid]) for pid in children]
        frontier += children
    return found


@requires_ray
def test_a_worker_killed_mid_batch_loses_and_duplicates_nothing(tmp_path, cache, one_thread):
    n = 10
    assert main(["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--no-circuits", "--ppl-texts", "0", "--n",
                 str(n), "--output", str(tmp_path / "serial")]) == 0
    suite = write_suite(tmp_path, SUITE.format(seed=0, run=f"{{n: {n}, circuits: false, ppl_texts: 0}}"))
    process = sweep_process(suite, tmp_path / "sweep", cache)
    try:
        deadline, victim = time.monotonic() + 600, None
        while victim is None and time.monotonic() < deadline and process.poll() is None:
            # a worker process is titled ray::CaseWorker.edit while it edits a batch
            editing = [pid for pid, cmd in descendants(process.pid) if cmd.startswith("ray::CaseWorker.edit")]
            if editing:
                victim = editing[0]
                os.kill(victim, signal.SIGKILL)
            time.sleep(0.02)
        assert victim is not None, "no worker was seen editing a batch"
        _, err = process.communicate(timeout=900)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 0, err
    assert "died" in err and "re-queued on a new worker" in err
    sharded, serial = only_run(tmp_path / "sweep"), only_run(tmp_path / "serial")
    rows = untimed(sharded / "cases.jsonl")
    assert len(rows) == n and rows == untimed(serial / "cases.jsonl")


def test_ray_start_keeps_the_callers_sigterm_handler(monkeypatch):
    """ray.init installs a SIGTERM handler that exits at once (status "failed", SystemExit); after the start
    the caller's handler (the CLI's: stop as "interrupted", exit 143) must be the one in place again."""
    import bench.sweep as sweep

    class FakeRay:
        def init(self, **kwargs):
            signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(1))

        def shutdown(self):
            pass

    def callers_handler(signum, frame):
        raise KeyboardInterrupt

    monkeypatch.setattr(sweep, "import_ray", lambda: FakeRay())
    saved = signal.signal(signal.SIGTERM, callers_handler)
    try:
        sweep.start_ray(None, timeout_s=1)
        assert signal.getsignal(signal.SIGTERM) is callers_handler
    finally:
        signal.signal(signal.SIGTERM, saved)


@requires_ray
def test_an_address_where_nothing_listens_is_one_error_line(tmp_path, capsys):
    with socket.socket() as probe:  # a port that was free a moment ago
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    suite = write_suite(tmp_path, SUITE.format(seed=0, run="{n: 1}"))
    assert main(["sweep", str(suite), "--output", str(tmp_path / "out"), "--address", f"127.0.0.1:{port}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: Ray did not start at 127.0.0.1:{port}: nothing answers")
