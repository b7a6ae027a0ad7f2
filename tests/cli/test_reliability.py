"""Runs you can trust: run states and exit codes, kill and resume, per-case fault isolation, whole-model
integrity, damaged run folders, and the list of bad inputs with what each gets."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import bench.run
from bench.cli import main
from bench.results import drop_torn_tail, read_case_lines, summarize
from bench.signals import Terminated, interrupt_on_sigterm, interrupts_deferred, signal_name
from editors.base import EditOutcome, Editor, register
from tests.helpers import FACTS_FILE, bench_process, no_hparams, read_json

QUIET = ["--model", "tiny-gpt2", "--no-circuits", "--ppl-texts", "0"]


class _Nudge(Editor):
    """Test-only base: adds 0.01 to layer 0's MLP output weight (declared)."""

    def parameters_to_touch(self, cases):
        return [self.bundle.arch.mlp_out_weight_name(0)]

    def apply(self, cases):
        with torch.no_grad():
            self.bundle.arch.mlp_out_weight(self.bundle.model, 0).add_(0.01)
        return EditOutcome(layers=[0])


@register("test-undeclared")
class UndeclaredWeightEditor(_Nudge):
    """Test-only: also scales layer 1's MLP output weight, which it does not declare."""

    def apply(self, cases):
        with torch.no_grad():
            self.bundle.arch.mlp_out_weight(self.bundle.model, 1).mul_(1.001)
        return super().apply(cases)


@register("test-hook")
class LeftoverHookEditor(_Nudge):
    """Test-only: leaves a forward hook on layer 0's MLP output projection."""

    def apply(self, cases):
        self.bundle.arch.mlp_out_proj(self.bundle.model, 0).register_forward_hook(lambda m, i, o: o * 1.0)
        return super().apply(cases)


@register("test-index-error")
class IndexErrorEditor(_Nudge):
    """Test-only: raises IndexError on the case about France, edits the others."""

    def apply(self, cases):
        if any(c.subject == "France" for c in cases):
            raise IndexError("index 7 is out of bounds for dimension 0 with size 7")
        return super().apply(cases)


@register("test-always-fails")
class AlwaysFailsEditor(_Nudge):
    """Test-only: every edit raises."""

    def apply(self, cases):
        raise KeyError("missing_setting")


def run_dirs(out: Path) -> list[Path]:
    return sorted(p for p in out.iterdir() if p.is_dir()) if out.exists() else []


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- per-case fault isolation and whole-model integrity --------------------------------------------

@pytest.mark.parametrize("editor, culprit", [("test-undeclared", "changed tensors it did not declare"),
                                             ("test-hook", "left hooks on")])
def test_rogue_editor_stops_the_run_naming_what_it_changed(editor, culprit, tmp_path, cache, one_thread, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--editor", editor, *QUIET, "--n", "3", "--output", str(out), "--hparams", no_hparams(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1
    line = one_error_line(err)
    assert f"editor '{editor}'" in line and culprit in line
    expected = "transformer.h.1.mlp.c_proj.weight" if editor == "test-undeclared" else "transformer.h.0.mlp.c_proj"
    assert expected in line
    (run_dir,) = run_dirs(out)
    manifest, summary = read_json(run_dir / "manifest.json"), read_json(run_dir / "summary.json")
    assert manifest["status"] == summary["status"] == "failed" and summary["partial"] is True
    assert culprit in manifest["error"]
    assert len(read_case_lines(run_dir / "cases.jsonl").rows) == 1  # stopped after the first case


def test_an_exception_in_one_case_is_recorded_and_the_run_completes(tmp_path, cache, one_thread, capsys):
    out = tmp_path / "runs"
    data = tmp_path / "three.json"
    cases = read_json(FACTS_FILE)["cases"][:3]
    data.write_text(json.dumps({"name": "three", "cases": cases}))
    assert [c["subject"] for c in cases].count("France") == 1
    code = main(["run", "--editor", "test-index-error", *QUIET, "--dataset", str(data), "--output", str(out),
                 "--hparams", no_hparams(tmp_path)])
    assert code == 0, capsys.readouterr().err
    (run_dir,) = run_dirs(out)
    records = read_case_lines(run_dir / "cases.jsonl").rows
    failed = [r for r in records if r["status"] == "failed"]
    assert len(records) == 3 and len(failed) == 1
    assert failed[0]["subject"] == "France" and failed[0]["phase"] == "edit"
    assert failed[0]["error"] == {"type": "IndexError", "message": "index 7 is out of bounds for dimension 0 with size 7"}
    assert read_json(run_dir / "summary.json")["status"] == read_json(run_dir / "manifest.json")["status"] == "complete"


def test_failure_phase_is_the_phase_that_raised():
    def raised(phase: str, inner=None) -> BaseException:
        try:
            with bench.run.case_phase(phase):
                (inner or (lambda: 1 / 0))()
        except ZeroDivisionError as exc:
            return exc
        raise AssertionError("no exception")

    assert bench.run.phase_of(raised("edit")) == "edit"
    assert bench.run.phase_of(raised("restore")) == "restore"
    assert bench.run.phase_of(raised("score")) == "score"

    def find_circuit():  # a frame named like the run's circuit step
        return 1 / 0

    assert bench.run.phase_of(raised("score", find_circuit)) == "circuit"


def test_systematic_failures_stop_the_run_with_one_error(tmp_path, cache, one_thread, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--editor", "test-always-fails", *QUIET, "--n", "8", "--output", str(out),
                 "--hparams", no_hparams(tmp_path)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "first 5 cases all failed" in line and "KeyError" in line and "[edit]" in line
    (run_dir,) = run_dirs(out)
    assert len(read_case_lines(run_dir / "cases.jsonl").rows) == 5
    assert read_json(run_dir / "summary.json")["status"] == "failed"


def test_a_run_whose_every_case_failed_exits_1_with_why(tmp_path, cache, one_thread, capsys):
    out = tmp_path / "runs"
    code = main(["run", "--editor", "test-always-fails", *QUIET, "--n", "2", "--output", str(out),
                 "--hparams", no_hparams(tmp_path)])
    line = one_error_line(capsys.readouterr().err)
    assert code == 1 and "no case was edited: all 2 cases failed" in line and "KeyError" in line


def test_overlong_prompt_is_rejected_at_load_and_the_others_run(tmp_path, cache, one_thread, capsys):
    cases = read_json(FACTS_FILE)["cases"][:3]
    cases[1] = dict(cases[1], paraphrases=[" ".join(["word"] * 5000)])
    data = tmp_path / "long.json"
    data.write_text(json.dumps({"name": "long", "cases": cases}))
    out = tmp_path / "runs"
    code = main(["run", "--editor", "ft-l", *QUIET, "--dataset", str(data), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 0, err
    (run_dir,) = run_dirs(out)
    records = read_case_lines(run_dir / "cases.jsonl").rows
    assert [r["case_id"] for r in records] == [cases[0]["case_id"], cases[2]["case_id"]]
    manifest = read_json(run_dir / "manifest.json")
    (reason,) = manifest["cases"]["rejected_reasons"]
    assert reason.startswith(f"{cases[1]['case_id']}: record 1: a prompt is ") and "reads at most 256" in reason


# --- run states, interrupts and the leaderboard ----------------------------------------------------

def wait_for_cases(out: Path, n: int, process: subprocess.Popen, deadline_s: float = 300) -> Path:
    """The run folder, once its cases.jsonl has at least n lines (the process must still be running)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        for folder in run_dirs(out):
            cases = folder / "cases.jsonl"
            if cases.exists() and cases.read_bytes().count(b"\n") >= n:
                return folder
        assert process.poll() is None, process.communicate()
        time.sleep(0.05)
    process.kill()
    raise AssertionError(f"no {n} cases within {deadline_s} s")


@pytest.fixture
def handlers_restored():
    """The test may change SIGTERM's and SIGINT's handlers (bench's main installs its own); put them back."""
    previous = {signum: signal.getsignal(signum) for signum in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def test_sigterm_is_reported_even_when_a_library_raises_a_plain_keyboard_interrupt(handlers_restored):
    """Ray's ray.get turns the exception raised by the SIGTERM handler into a plain KeyboardInterrupt; the stop
    must still read SIGTERM (exit 143), and a Ctrl-C before any SIGTERM SIGINT."""
    interrupt_on_sigterm()
    assert signal_name(KeyboardInterrupt()) == "SIGINT"
    with pytest.raises(Terminated):
        signal.raise_signal(signal.SIGTERM)
    assert signal_name(KeyboardInterrupt()) == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN  # a second SIGTERM cannot cut the summary short
    interrupt_on_sigterm()  # a new run starts afresh
    assert signal_name(KeyboardInterrupt()) == "SIGINT"


def test_sigterm_exits_143_with_a_partial_summary_and_the_complete_row_stays(tmp_path, cache, one_thread, capsys):
    """(SIGINT is Python's KeyboardInterrupt: the resume tests below interrupt in-process and get 130.)"""
    signum, code = signal.SIGTERM, 143
    out = tmp_path / "runs"
    assert main(["run", "--editor", "ft-l", *QUIET, "--n", "3", "--output", str(out)]) == 0
    (complete,) = run_dirs(out)
    process = bench_process(["run", "--editor", "ft-l", *QUIET, "--n", "40", "--output", str(out)], cache)
    folder = wait_for_cases(out, 4, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=300)
    assert process.returncode == code, err
    assert f"interrupted by {signal.Signals(signum).name}" in err and "--resume" in err
    manifest, summary = read_json(folder / "manifest.json"), read_json(folder / "summary.json")
    assert manifest["status"] == summary["status"] == "interrupted" and summary["partial"] is True
    assert 4 <= summary["n_cases"] + summary["n_failed"] < 40 and summary["n_planned"] == 40
    capsys.readouterr()
    assert main(["leaderboard", "--runs", str(out), "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)["groups"][0]["rows"]
    assert [r["provenance"]["run_id"] for r in rows] == [complete.name]
    assert main(["leaderboard", "--runs", str(out), "--include-partial"]) == 0
    board = capsys.readouterr().out
    assert "| ft-l (partial: interrupted) [" in board and "| ft-l [" in board


def test_deferred_interrupts_let_the_block_finish_and_an_ignored_signal_stays_ignored(handlers_restored):
    signal.signal(signal.SIGINT, signal.default_int_handler)  # a shell's background job starts with SIGINT ignored
    finished = []
    with pytest.raises(KeyboardInterrupt):
        with interrupts_deferred():
            signal.raise_signal(signal.SIGINT)
            finished.append("after SIGINT")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # as after a first SIGTERM
    with interrupts_deferred():
        signal.raise_signal(signal.SIGTERM)
        finished.append("after an ignored SIGTERM")
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_IGN
    assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    assert finished == ["after SIGINT", "after an ignored SIGTERM"]


def test_sigterm_while_the_summary_is_written_waits_for_it(tmp_path, cache, one_thread, capsys, monkeypatch,
                                                          handlers_restored):
    """A stop that lands after the last case, while the run aggregates, used to leave the state 'running'
    with no summary; now the run finishes writing both, then exits 143."""
    real_read_cases = bench.run.read_cases

    def read_cases_then_sigterm(path):
        if sys._getframe(1).f_code.co_name == "finish_run":
            signal.raise_signal(signal.SIGTERM)
        return real_read_cases(path)

    monkeypatch.setattr(bench.run, "read_cases", read_cases_then_sigterm)
    out = tmp_path / "runs"
    assert main(["run", "--editor", "ft-l", *QUIET, "--n", "2", "--output", str(out)]) == 143
    assert "interrupted by SIGTERM" in capsys.readouterr().err
    (folder,) = run_dirs(out)
    manifest, summary = read_json(folder / "manifest.json"), read_json(folder / "summary.json")
    assert manifest["status"] == summary["status"] == "complete" and summary["n_cases"] == 2


class SigtermWhenCollected:
    def __del__(self):
        signal.raise_signal(signal.SIGTERM)  # the handler's exception is swallowed: "Exception ignored in ..."


def test_a_sigterm_swallowed_by_a_destructor_still_stops_the_run(tmp_path, cache, one_thread, monkeypatch,
                                                                 handlers_restored):
    real_edit_batch = bench.run.edit_batch

    def edit_batch_then_collect(*args, **kwargs):
        records = real_edit_batch(*args, **kwargs)
        SigtermWhenCollected()
        return records

    swallowed = []
    monkeypatch.setattr(bench.run, "edit_batch", edit_batch_then_collect)
    monkeypatch.setattr(sys, "unraisablehook", lambda unraisable: swallowed.append(unraisable.exc_type))
    out = tmp_path / "runs"
    assert main(["run", "--editor", "ft-l", *QUIET, "--n", "3", "--output", str(out)]) == 143
    assert swallowed == [Terminated]
    (folder,) = run_dirs(out)
    summary = read_json(folder / "summary.json")
    assert summary["status"] == "interrupted" and summary["n_cases"] == 1 and summary["signal"] == "SIGTERM"


def test_sigkill_at_five_random_points_then_resume_equals_an_uninterrupted_run(tmp_path, cache, one_thread):
    # kill points among the first 11 of 24 cases: a process that runs on past a point (the random sleep below)
    # must not finish the run before the next kill
    args = ["run", "--editor", "ft-l", *QUIET, "--n", "24"]
    assert main([*args, "--output", str(tmp_path / "ref")]) == 0  # one thread, as the subprocesses
    (ref_dir,) = run_dirs(tmp_path / "ref")
    out = tmp_path / "killed"
    rng = random.Random(13)
    points = sorted(rng.sample(range(1, 12), 5))
    process = bench_process([*args, "--output", str(out)], cache)
    written = 0
    for point in points:
        # a resumed process is killed only after it wrote a case of its own, so that every resume is recorded
        folder = wait_for_cases(out, max(point, written + 1), process)
        time.sleep(rng.uniform(0.0, 0.3))  # anywhere within the next case
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=60)
        written = (folder / "cases.jsonl").read_bytes().count(b"\n")
        assert read_json(folder / "manifest.json")["status"] == "running"
        process = bench_process(["run", "--resume", str(folder)], cache)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 0, err
    assert read_json(folder / "manifest.json")["status"] == "complete"
    assert len(read_json(folder / "manifest.json")["resumed"]) == 5

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in read_case_lines(path).rows]

    assert untimed(folder / "cases.jsonl") == untimed(ref_dir / "cases.jsonl")


def test_torn_last_line_is_reported_and_dropped(tmp_path):
    path = tmp_path / "cases.jsonl"
    path.write_text('{"case_id": "a", "status": "ok"}\n{"case_id": "b", "sta')
    lines = read_case_lines(path)
    assert [r["case_id"] for r in lines.rows] == ["a"] and "no newline" in lines.torn and not lines.bad
    assert "no newline (21 bytes)" in drop_torn_tail(path)
    assert path.read_text() == '{"case_id": "a", "status": "ok"}\n' and drop_torn_tail(path) is None


def test_resume_refuses_a_changed_configuration(tmp_path, cache, one_thread, capsys, monkeypatch):
    out = tmp_path / "runs"
    interrupt_after_cases(monkeypatch, 2)
    assert main(["run", "--editor", "ft-l", *QUIET, "--n", "4", "--output", str(out)]) == 130
    (folder,) = run_dirs(out)
    monkeypatch.undo()
    capsys.readouterr()
    assert main(["run", "--resume", str(folder), "--seed", "3"]) == 2
    assert "--seed 3 differs from the run's 0" in one_error_line(capsys.readouterr().err)
    original = read_json(folder / "manifest.json")
    for change, words in ((lambda m: m["hparams"].update(lr_extra=123.0), "the resolved hyperparameters changed (lr_extra"),
                          (lambda m: m["model"].update(sha256="0" * 64), "the model checksum changed"),
                          (lambda m: m.update(code_sha256="f" * 64), "code version"),
                          (lambda m: m["mode"].update(name="batch"), "the mode changed")):
        manifest = json.loads(json.dumps(original))
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))
        assert main(["run", "--resume", str(folder)]) == 2
        assert words in one_error_line(capsys.readouterr().err)
    (folder / "manifest.json").write_text(json.dumps(original))
    assert main(["run", "--resume", str(folder)]) == 0
    assert len(read_case_lines(folder / "cases.jsonl").rows) == 4
    assert main(["run", "--resume", str(folder)]) == 2
    assert "already complete" in one_error_line(capsys.readouterr().err)


def interrupt_after_cases(monkeypatch, n: int, exc: type[BaseException] = KeyboardInterrupt) -> None:
    """Makes the n+1-th call of _safe_batch raise exc (as Ctrl-C would, between two cases)."""
    real = bench.run._safe_batch
    calls = {"n": 0}

    def counting(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > n:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(bench.run, "_safe_batch", counting)


def test_sequential_resume_continues_from_the_last_checkpoint(tmp_path, cache, one_thread, monkeypatch):
    args = ["run", "--editor", "test-undeclared-free", *QUIET, "--n", "7", "--sequential", "--eval-every", "2",
            "--hparams", no_hparams(tmp_path)]
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: None)
    assert main([*args, "--output", str(tmp_path / "ref")]) == 0
    (ref,) = run_dirs(tmp_path / "ref")
    interrupt_after_cases(monkeypatch, 5)
    assert main([*args, "--output", str(tmp_path / "cut")]) == 130
    (cut,) = run_dirs(tmp_path / "cut")
    assert (cut / "checkpoint.pt").exists()
    assert torch.load(cut / "checkpoint.pt")["batches_done"] == 4  # the checkpoint after 4 edits
    monkeypatch.setattr(bench.run, "_safe_batch", TRUE_SAFE_BATCH)
    assert main(["run", "--resume", str(cut)]) == 0
    assert not (cut / "checkpoint.pt").exists()

    def untimed(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if not k.startswith("seconds")} for r in read_case_lines(path).rows]

    assert untimed(cut / "cases.jsonl") == untimed(ref / "cases.jsonl")
    assert untimed(cut / "sequential.jsonl") == untimed(ref / "sequential.jsonl")


TRUE_SAFE_BATCH = bench.run._safe_batch


@register("test-undeclared-free")
class PerCaseNudge(_Nudge):
    """Test-only: a per-case edit of layer 0's MLP output weight, keeping no state outside the weights."""

    def apply(self, cases):
        with torch.no_grad():
            for case in cases:
                self.bundle.arch.mlp_out_weight(self.bundle.model, 0).add_(0.01 * (len(case.subject) % 4 + 1))
        return EditOutcome(layers=[0])


# --- the leaderboard over damaged and partial folders ----------------------------------------------

def fake_run(runs: Path, name: str, n: int, status: str | None = "complete", finished: str = "2026-01-01") -> Path:
    folder = runs / name
    folder.mkdir(parents=True)
    cases = [{"case_id": f"c{i}", "status": "ok", "post": {"efficacy_score": 1.0, "paraphrase_score": 1.0,
                                                          "neighborhood_score": 0.5}} for i in range(n)]
    manifest = {"editor": "rome", "model": {"name": "m", "sha256": "ab" * 32}, "dataset": {"name": "d", "sha256": "c"},
                "finished": finished, "mode": {"name": "single", "batch_size": 1}}
    if status:
        manifest["status"] = status
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "cases.jsonl").write_text("".join(json.dumps(c) + "\n" for c in cases))
    (folder / "summary.json").write_text(json.dumps(dict(summarize(cases), editor="rome", model="m", dataset="d")))
    return folder


def board(runs: Path, capsys, *extra: str) -> tuple[list[str], str]:
    assert main(["leaderboard", "--runs", str(runs), "--format", "json", *extra]) == 0
    captured = capsys.readouterr()
    rows = [r["provenance"]["run_id"] for g in json.loads(captured.out)["groups"] for r in g["rows"]]
    return rows, captured.err


def test_damaged_folders_are_skipped_and_named(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "good", 3)
    (fake_run(runs, "bad-summary", 3) / "summary.json").write_text('{"n_cases": 3,')
    (fake_run(runs, "bad-manifest", 3) / "manifest.json").write_text("[1, 2]")
    with open(fake_run(runs, "bad-line", 3) / "cases.jsonl", "a") as handle:
        handle.write("42\n")
    fake_run(runs, "string-model", 3)
    manifest = read_json(runs / "string-model" / "manifest.json")
    (runs / "string-model" / "manifest.json").write_text(json.dumps(dict(manifest, model="m")))
    rows, err = board(runs, capsys)
    assert rows == ["good"]
    assert "bad-summary: summary.json is not valid JSON" in err
    assert "bad-manifest: manifest.json is a JSON list, not an object" in err
    assert "bad-line: cases.jsonl line 4 is a JSON int, not an object" in err
    assert "string-model: manifest.json: 'model' is a str, not an object" in err
    assert main(["leaderboard", "--runs", str(runs)]) == 0  # markdown renders too


def test_partial_and_smaller_runs_never_replace_a_complete_one(tmp_path, capsys):
    runs = tmp_path / "runs"
    fake_run(runs, "a-complete-40", 40, finished="2026-01-01")
    fake_run(runs, "b-interrupted-5", 5, status="interrupted", finished="2026-01-02")
    killed = fake_run(runs, "c-killed", 2, status="running", finished="")
    (killed / "summary.json").unlink()
    fake_run(runs, "d-failed-0", 0, status="failed", finished="2026-01-03")
    fake_run(runs, "e-complete-5", 5, finished="2026-01-04")
    rows, err = board(runs, capsys)
    assert rows == ["a-complete-40"]
    assert "kept a-complete-40 (40 cases)" in err and "e-complete-5 (5 cases)" in err
    rows, _ = board(runs, capsys, "--include-partial")
    assert rows[0] == "a-complete-40" and set(rows) == {"a-complete-40", "b-interrupted-5", "c-killed", "d-failed-0"}


def test_torn_line_in_a_run_folder_is_reported(tmp_path, capsys):
    runs = tmp_path / "runs"
    with open(fake_run(runs, "torn", 3) / "cases.jsonl", "a") as handle:
        handle.write('{"case_id": "c3", "sta')
    rows, err = board(runs, capsys)
    assert rows == ["torn"] and "torn: cases.jsonl line 4 has no newline" in err


# --- bad input: every kind gets one `error:` line and exit 2 ----------------------------------------

def bad_dataset(tmp_path: Path, text: str | bytes, name: str = "bad.json") -> str:
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


def bad_yaml(tmp_path: Path, text: str | None) -> str:
    path = tmp_path / "hp.yaml"
    if text is not None:
        path.write_text(text)
    return str(path)


FACT = read_json(FACTS_FILE)["cases"][0]
RUN = ["run", "--editor", "ft-l", *QUIET]
BAD_INPUTS = {
    # name: (argv builder, words the error line must contain)
    "unknown editor": (lambda t: ["run", "--editor", "nope"], "unknown editor 'nope'"),
    "no editor": (lambda t: ["run"], "run needs --editor"),
    "unknown model": (lambda t: ["run", "--editor", "ft-l", "--model", "./no/such/dir"], "does not exist"),
    "unknown dataset": (lambda t: RUN + ["--dataset", "no-such-data"], "unknown dataset 'no-such-data'; valid: "),
    "unknown relation": (lambda t: RUN + ["--dataset", "lre:no_such_relation"], "no_such_relation"),
    "--n 0": (lambda t: RUN + ["--n", "0"], "--n must be at least 1; got 0"),
    "--n -1": (lambda t: RUN + ["--n", "-1"], "--n must be at least 1; got -1"),
    "--top-n 0": (lambda t: RUN + ["--top-n", "0"], "--top-n must be at least 1; got 0"),
    "--top-n -5": (lambda t: RUN + ["--top-n", "-5"], "--top-n must be at least 1; got -5"),
    "--seed -1": (lambda t: RUN + ["--seed", "-1"], "--seed must be between 0 and"),
    "--batch-size 0": (lambda t: RUN + ["--batch-size", "0"], "--batch-size must be at least 1"),
    "--eval-every 0": (lambda t: RUN + ["--sequential", "--eval-every", "0"], "--eval-every must be at least 1"),
    "--eval-every -3": (lambda t: RUN + ["--sequential", "--eval-every", "-3"], "--eval-every must be at least 1"),
    "--eval-every without --sequential": (lambda t: RUN + ["--eval-every", "3"], "--eval-every needs --sequential"),
    "--ppl-texts -1": (lambda t: ["run", "--editor", "ft-l", "--ppl-texts", "-1"], "--ppl-texts must be at least 0"),
    "--n not a number": (lambda t: RUN + ["--n", "five"], "invalid int value: 'five'"),
    "--device cuda without CUDA": (lambda t: RUN + ["--device", "cuda"], "CUDA"),
    "--dtype nonsense": (lambda t: RUN + ["--dtype", "nonsense"], "unknown dtype 'nonsense'"),
    "malformed JSON": (lambda t: RUN + ["--dataset", bad_dataset(t, '{"cases": [')], "bad.json"),
    "empty JSON": (lambda t: RUN + ["--dataset", bad_dataset(t, "")], "bad.json"),
    "non-UTF-8 JSON": (lambda t: RUN + ["--dataset", bad_dataset(t, b'{"cases": ["\xff\xfe"]}')], "bad.json"),
    "record not an object": (lambda t: RUN + ["--dataset", bad_dataset(t, '{"cases": [42]}')], "record 0"),
    "missing field": (lambda t: RUN + ["--dataset", bad_dataset(t, json.dumps(
        {"cases": [{k: v for k, v in FACT.items() if k != "target_new"}]}))], "target_new"),
    "wrongly typed field": (lambda t: RUN + ["--dataset", bad_dataset(t, json.dumps(
        {"cases": [dict(FACT, subject=5)]}))], "subject"),
    "duplicate ids": (lambda t: RUN + ["--dataset", bad_dataset(t, json.dumps({"cases": [FACT, FACT]}))],
                      "duplicate case_id"),
    "every record rejected": (lambda t: RUN + ["--dataset", bad_dataset(t, json.dumps(
        {"cases": [dict(FACT, target_new=FACT["target_true"]), dict(FACT, case_id="x2", target_new="")]}))],
        "no case to edit: all 2 records were rejected"),
    "hparams a list": (lambda t: RUN + ["--hparams", bad_yaml(t, "- 1\n- 2\n")], "expected a mapping"),
    "hparams a scalar": (lambda t: RUN + ["--hparams", bad_yaml(t, "3\n")], "expected a mapping"),
    "hparams invalid YAML": (lambda t: RUN + ["--hparams", bad_yaml(t, "a: [1,\n")], "invalid YAML"),
    "hparams missing": (lambda t: RUN + ["--hparams", bad_yaml(t, None)], "does not exist"),
    "--output under a file": (lambda t: RUN + ["--output", bad_dataset(t, "x", "file.txt") + "/runs"], "file.txt"),
    "resume a folder that is no run": (lambda t: ["run", "--resume", str(t)], "has no manifest.json"),
    "leaderboard on a missing folder": (lambda t: ["leaderboard", "--runs", str(t / "none")], "does not exist"),
    "leaderboard bad format": (lambda t: ["leaderboard", "--format", "xml"], "invalid choice: 'xml'"),
    "circuit-diff on a non-circuit file": (lambda t: ["circuit-diff", bad_dataset(t, "[1, 2]"), bad_dataset(t, "{}")],
                                           "not a circuit.json file"),
    "circuit-diff with edges 5": (lambda t: ["circuit-diff", bad_dataset(t, json.dumps(
        {"method": "eap", "answer": "x", "edges": 5, "nodes": [], "n_graph_edges": 1})),
        bad_dataset(t, "{}", "b.json")], "not a circuit.json file"),
    "circuit --validation-fraction 2": (lambda t: ["circuit", "--validation-fraction", "2"],
                                        "--validation-fraction must be between 0.0 and 1.0"),
    "trace --samples 0": (lambda t: ["trace", "--samples", "0"], "--samples must be at least 1"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_gets_one_error_line_and_exit_2(name, tmp_path, cache, one_thread, capsys):
    build, words = BAD_INPUTS[name]
    argv = build(tmp_path)
    if "--output" not in argv and argv[0] == "run":
        argv += ["--output", str(tmp_path / "runs")]
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own checks
        code = exc.code
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and words in line, line
    assert not (tmp_path / "runs").exists() or not run_dirs(tmp_path / "runs")  # no run folder for bad input


def test_every_numeric_option_has_a_range():
    import argparse

    from bench.cli import NUMERIC_RANGES, _parser

    parser = _parser()
    subparsers = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    numeric = {a.dest for sub in subparsers.choices.values() for a in sub._actions if a.type in (int, float)}
    assert numeric and numeric <= set(NUMERIC_RANGES), numeric - set(NUMERIC_RANGES)


def test_run_ids_are_unique_under_parallel_starts():
    from bench.run import RunConfig, run_id

    cfg = RunConfig(editor="rome", model="tiny-gpt2")
    assert len({run_id(cfg) for _ in range(200)}) == 200
