"""Sharded sweeps on Ray: `python -m bench sweep SUITE.yaml`.

A suite expands editors x models x datasets x seeds (x hyperparameter files) into runs with the ordinary
run-folder layout. Each run's batches are shared out to Ray actors (workers): each loads the model once,
then edits, scores and restores one batch at a time through `bench.run.edit_batch`, the code path of
`bench run`. The driver alone writes the run folder: records come back in any order and are appended
exactly once, in the run's case order. A worker that dies (kill -9, out of memory) has its batch re-queued
on a fresh worker. The sweep file in the output folder maps every run of the suite to its folder, so
running the same command again skips complete runs and resumes the others.

Ray is an optional extra (`pip install -e '.[sweep]'`): it is imported only here, when a sweep starts.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import socket
import signal
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field, fields
from itertools import product
from pathlib import Path
from typing import Any

import yaml
from tqdm import tqdm

from bench.results import RunWriter, _atomic_json, read_cases
from bench.run import RunConfig, SystematicFailure, check_systematic, open_writer, run_to_end, summary_fields
from bench.signals import raise_if_stopped
from lmview.io import read_mapping

log = logging.getLogger("bench")

SWEEP_FILE = "sweep.json"
AXES = {"editors": "editor", "models": "model", "datasets": "dataset", "seeds": "seed"}
SUITE_KEYS = set(AXES) | {"hparams", "run", "output"}
NOT_IN_SUITE = {"editor", "model", "dataset", "seed", "hparams", "output"}  # set by the axes, or by the sweep
MAX_WORKER_DEATHS = 3  # a batch whose workers died this often fails its cases (phase "worker")
DEFAULT_START_TIMEOUT_S = 300.0


class SweepError(ValueError):
    """Bad input to a sweep, or a Ray that cannot be started: one `error:` line."""


class WorkerDied(RuntimeError):
    """The worker process running a batch died (killed, out of memory) MAX_WORKER_DEATHS times."""


# --- the suite --------------------------------------------------------------------------------

@dataclass
class SweepRun:
    key: str  # sha256 of the run's configuration: the same suite entry always maps to the same run folder
    cfg: RunConfig

    @property
    def label(self) -> str:
        hparams = f" ({Path(self.cfg.hparams).name})" if self.cfg.hparams else ""
        return f"{self.cfg.editor}{hparams} on {self.cfg.model} · {self.cfg.dataset} · seed {self.cfg.seed}"


def _list(suite: dict[str, Any], key: str, path: Path) -> list[Any]:
    value = suite.get(key)
    items = value if isinstance(value, list) else [value]
    if value is None or not items or any(isinstance(v, (dict, list)) or v is None for v in items):
        raise SweepError(f"{path}: '{key}' must be a value or a non-empty list of values")
    return items


def _resolve(value: str, base: Path) -> str:
    """A relative file path in the suite is relative to the suite file; names (facts, counterfact) stay."""
    candidate = base / value
    return str(candidate) if not Path(value).is_absolute() and candidate.exists() else value


def load_suite(path: Path, output: str | None = None) -> tuple[list[SweepRun], str]:
    """The suite's runs, in the order they run, and the output folder (--output wins over the suite's)."""
    if not path.is_file():
        raise SweepError(f"suite {path} does not exist")
    suite = read_mapping(path, lambda reason: SweepError(f"{path}: invalid YAML ({reason})"),
                         lambda _: SweepError(f"{path}: expected a mapping with editors, models, datasets and seeds"),
                         parse=yaml.safe_load)
    unknown = sorted(set(suite) - SUITE_KEYS)
    if unknown:
        raise SweepError(f"{path}: unknown key {unknown[0]!r}; valid: {', '.join(sorted(SUITE_KEYS))}")
    settings = suite.get("run") or {}
    allowed = {f.name for f in fields(RunConfig)} - NOT_IN_SUITE
    if not isinstance(settings, dict) or set(settings) - allowed:
        bad = sorted(set(settings) - allowed) if isinstance(settings, dict) else settings
        raise SweepError(f"{path}: 'run' must map run settings to values; not a setting: {bad}; valid: "
                         f"{', '.join(sorted(allowed))}")
    if settings.get("sequential"):
        raise SweepError(f"{path}: sequential runs are not sharded (their edits accumulate in one model); "
                         f"run them with python -m bench run --sequential")
    hparams = suite.get("hparams") or {}
    if not isinstance(hparams, dict):
        raise SweepError(f"{path}: 'hparams' must map an editor to a list of hyperparameter files")
    axes = {key: _list(suite, key, path) for key in AXES}
    base = path.resolve().parent
    runs = []
    for editor, model, dataset, seed in product(*axes.values()):
        files = hparams.get(editor) or [None]
        for hparams_file in files if isinstance(files, list) else [files]:
            cfg = RunConfig(editor=str(editor), model=_resolve(str(model), base), dataset=_resolve(str(dataset), base),
                            seed=int(seed), hparams=_resolve(str(hparams_file), base) if hparams_file else None,
                            **settings)
            runs.append(SweepRun(run_key(cfg), cfg))
    out = output or suite.get("output") or "runs"
    out = str(base / out) if output is None and suite.get("output") and not Path(out).is_absolute() else out
    for sweep_run in runs:
        sweep_run.cfg.output = out
    return runs, out


def run_key(cfg: RunConfig) -> str:
    config = {k: v for k, v in vars(cfg).items() if k != "output"}
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


# --- Ray ----------------------------------------------------------------------------------------

def import_ray():
    try:
        import ray
    except ImportError:
        raise SweepError("bench sweep needs Ray, an optional extra: pip install -e '.[sweep]'") from None
    return ray


def check_reachable(address: str, timeout_s: float) -> None:
    """A host:port address (also ray://host:port) must accept a TCP connection: ray.init on an address
    where nothing listens retries without end."""
    target = address.removeprefix("ray://").rsplit("/", 1)[0]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local": Ray resolves them itself and fails at once when there is no cluster
    try:
        socket.create_connection((host, int(port)), timeout=min(timeout_s, 30.0)).close()
    except OSError as exc:
        raise SweepError(f"Ray did not start at {address}: nothing answers there ({exc.strerror or exc})") from None


def start_ray(address: str | None, timeout_s: float) -> None:
    """ray.init on this machine (address None) or joining a cluster. A raylet on a busy machine may miss
    Ray's own 30 s start window (ray-project/ray#62883), so a local start is retried until timeout_s;
    what still fails is one error, never a fallback to running without Ray."""
    ray = import_ray()
    if address is not None:
        check_reachable(address, timeout_s)
    repo = str(Path(__file__).resolve().parent.parent)
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")])),
           **{k: v for k, v in os.environ.items() if k.startswith("KEBENCH_") or k == "HF_HOME"}}
    deadline, attempts = time.monotonic() + timeout_s, 0
    while True:
        attempts += 1
        try:
            on_sigterm = signal.getsignal(signal.SIGTERM)
            ray.init(address=address, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": env})
            # Ray's own SIGTERM handler exits at once; the caller's stops the run as interrupted instead
            signal.signal(signal.SIGTERM, on_sigterm)
            return
        except Exception as exc:  # noqa: BLE001 - Ray raises bare Exceptions on a failed start
            ray.shutdown()
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            if address is not None or time.monotonic() >= deadline:
                where = f"at {address}" if address else "on this machine"
                raise SweepError(f"Ray did not start {where} after {attempts} attempt(s) in {timeout_s:g} s: "
                                 f"{reason}") from None
            log.warning("sweep: Ray did not start (%s); trying again", reason)


def worker_class(ray: Any) -> Any:
    """The Ray actor class; defined here so that importing this module needs no Ray."""

    @ray.remote
    class CaseWorker:
        """One run's model, editor and cases in one process; edits the batches it is given."""

        def __init__(self, cfg: RunConfig, stored: dict[str, Any] | None, threads: int):
            import torch

            from bench.integrity import ModelGuard
            from bench.run import held_out_perplexity, heldout_for_ppl, prepare, warm_bridge

            torch.set_num_threads(threads)
            logging.basicConfig(level=logging.WARNING)
            self.run = prepare(cfg, stored)
            if cfg.circuits or cfg.relation_circuits:
                warm_bridge(self.run.bundle)
            self.guard = ModelGuard.of(self.run.bundle.model, cfg.editor)
            self.ppl_pre = held_out_perplexity(self.run.bundle, heldout_for_ppl(cfg.ppl_texts))

        def manifest(self) -> dict[str, Any]:
            return self.run.manifest

        def pid(self) -> int:
            return os.getpid()

        def edit(self, index: int) -> tuple[list[dict[str, Any]], dict[str, bytes]]:
            """Batch `index`'s records and the circuit files it wrote; the model is verified against its
            original afterwards (an IntegrityError fails the run)."""
            from bench.run import batches, declared_names, edit_batch

            run = self.run
            batch = batches(run.cases, run.cfg.batch_size)[index]
            folder = Path(tempfile.mkdtemp(prefix="kebench-sweep-"))
            try:
                records = edit_batch(run.bundle, run.editor, batch, run.pool, run.cfg, folder, index, self.ppl_pre)
                self.guard.verify(lambda: declared_names(run.editor, batch))
                files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}
            finally:
                shutil.rmtree(folder, ignore_errors=True)
            return records, files

    return CaseWorker


@dataclass
class Placement:
    """How many workers a run gets and what each one reserves."""

    workers: int
    num_cpus: float
    num_gpus: float

    @classmethod
    def of(cls, ray: Any, workers: int | None, per_gpu: int, threads: int, device: str) -> Placement:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0)) if device in ("auto", "cuda") else 0.0
        if device == "cuda" and not gpus:
            raise SweepError("--device cuda, but the Ray cluster has no GPU")
        if gpus:
            return cls(workers or max(1, int(gpus * per_gpu)), 1.0 / per_gpu, 1.0 / per_gpu)
        return cls(workers or max(1, int(float(resources.get("CPU", 1)) // threads)), float(threads), 0.0)


@dataclass
class SweepOptions:
    workers: int | None = None
    workers_per_gpu: int = 1
    threads_per_worker: int = 1
    address: str | None = None
    start_timeout_s: float = DEFAULT_START_TIMEOUT_S


# --- one run ------------------------------------------------------------------------------------

@dataclass
class RunProgress:
    """The driver's view of one run: batches still to edit, those out with a worker, results waiting for
    their turn to be written, and how often each batch's worker died."""

    order: list[int]  # the batches to edit, in the order they are written
    pending: deque[int] = field(default_factory=deque)
    position: int = 0  # order[position] is the next batch to write
    out: dict[Any, tuple[Any, int]] = field(default_factory=dict)  # object ref -> (worker, batch index)
    ready: dict[int, tuple[list[dict[str, Any]], dict[str, bytes]]] = field(default_factory=dict)
    deaths: dict[int, int] = field(default_factory=dict)


def previous_folder(output: Path, key: str) -> Path | None:
    path = output / SWEEP_FILE
    if not path.is_file():
        return None
    folder = json.loads(path.read_text()).get("runs", {}).get(key)
    return output / folder if folder and (output / folder / "manifest.json").is_file() else None


def remember(output: Path, key: str, run_dir: Path, suite: Path) -> None:
    path = output / SWEEP_FILE
    data = json.loads(path.read_text()) if path.is_file() else {"runs": {}}
    data["runs"][key] = run_dir.name
    data.setdefault("suites", [])
    if str(suite) not in data["suites"]:
        data["suites"].append(str(suite))
    _atomic_json(path, data)


@dataclass
class Planned:
    """One run of the suite and where it stands: already complete (folder, no work), to resume, or new."""

    run: SweepRun
    folder: Path | None = None
    stored: dict[str, Any] | None = None

    @property
    def estimate(self) -> int:
        """Its number of cases as far as known before a worker selects them (for the progress bar's total)."""
        return int(self.stored["n_planned"]) if self.stored and self.stored.get("n_planned") else self.run.cfg.n or 0

    @property
    def complete(self) -> bool:
        return self.stored is not None and self.stored.get("status") == "complete"


def plan(runs: list[SweepRun], output: Path) -> list[Planned]:
    """What each run of the suite needs: nothing (complete), a resume (killed or interrupted) or a new
    folder (never started, or failed: a failed run is not resumed, like `bench run --resume`)."""
    from bench.resume import check_resumable, stored_manifest

    planned = []
    for sweep_run in runs:
        folder = previous_folder(output, sweep_run.key)
        stored = stored_manifest(folder) if folder is not None else None
        if stored is not None and stored.get("status") == "failed":
            log.warning("sweep: %s failed in %s (%s); it starts again in a new folder", sweep_run.label, folder,
                        stored.get("error"))
            folder = stored = None
        elif folder is not None and stored is not None and stored.get("status") != "complete":
            check_resumable(folder, stored)
        planned.append(Planned(sweep_run, folder, stored))
    return planned


def sweep(suite: Path, options: SweepOptions, output: str | None = None) -> list[tuple[Path | None, dict[str, Any]]]:
    """Every run of the suite, one after another, each sharded across workers; (folder, summary) per run
    (summary {"status": "complete", "skipped": True} for a run already complete). Ray starts only when
    a run is left to do."""
    from editors.base import get_editor

    runs, out = load_suite(suite, output)
    for sweep_run in runs:
        get_editor(sweep_run.cfg.editor)  # an unknown editor is bad input, before Ray starts
    planned = plan(runs, Path(out))
    results: list[tuple[Path | None, dict[str, Any]]] = [(p.folder, {"status": "complete", "skipped": True})
                                                         for p in planned if p.complete]
    for p in planned:
        if p.complete:
            log.info("sweep: %s is complete in %s; skipped", p.run.label, p.folder)
    todo = [p for p in planned if not p.complete]
    if not todo:
        return results
    ray = import_ray()
    start_ray(options.address, options.start_timeout_s)
    try:
        # one bar for the whole sweep; its total is corrected as each run's cases are selected
        with tqdm(total=sum(p.estimate for p in todo), desc="sweep", unit="case", dynamic_ncols=True) as bar:
            for p in todo:
                results.append(run_sharded(ray, p, options, bar, suite))
                if results[-1][1].get("status") == "interrupted":
                    break
    finally:
        ray.shutdown()
    return results


def run_sharded(ray: Any, planned: Planned, options: SweepOptions, bar: tqdm, suite: Path
                ) -> tuple[Path, dict[str, Any]]:
    """One run of the sweep: workers, the run folder once the first worker has loaded it, the batches."""
    from bench.run import batches

    sweep_run, stored, previous = planned.run, planned.stored, planned.folder
    cfg = sweep_run.cfg
    place = Placement.of(ray, options.workers, options.workers_per_gpu, options.threads_per_worker, cfg.device)
    worker_cls = worker_class(ray).options(num_cpus=place.num_cpus, num_gpus=place.num_gpus)

    selected = {"stored": stored}

    def new_worker() -> Any:
        return worker_cls.remote(cfg, selected["stored"], options.threads_per_worker)

    first = new_worker()
    manifest = first_manifest(ray, first, sweep_run)
    # the other workers take the first one's selection of cases (and skip the known-fact scan)
    selected["stored"] = stored or {"case_ids": manifest["case_ids"], "cases": manifest["cases"]}
    writer = open_writer(cfg, manifest, stored, previous)
    remember(Path(cfg.output), sweep_run.key, writer.dir, suite)
    writer.manifest["sweep"] = {"suite": str(suite), "workers": place.workers, "num_cpus": place.num_cpus,
                                "num_gpus": place.num_gpus, "ray": ray.__version__}
    writer.write_manifest()
    all_batches = batches([c for c in manifest["case_ids"]], cfg.batch_size)
    written = read_cases(writer.cases_path)
    done = {r.get("case_id") for r in written}
    todo = [i for i, batch in enumerate(all_batches) if not all(cid in done for cid in batch)]
    progress = RunProgress(todo, deque(todo))
    bar.total += len(manifest["case_ids"]) - planned.estimate
    bar.refresh()
    bar.update(len(done & set(manifest["case_ids"])))
    bar.set_postfix_str(sweep_run.label)
    log.info("sweep: %s: %d batches to edit on %d workers, into %s", sweep_run.label, len(todo),
             min(place.workers, len(todo)), writer.dir)
    workers = [first] + [new_worker() for _ in range(min(place.workers, len(todo)) - 1)]

    def edit_all() -> None:
        try:
            drive(ray, workers, new_worker, progress, all_batches, writer, written, done, bar)
        finally:
            for worker in workers:
                ray.kill(worker)

    summary = run_to_end(edit_all, writer, summary_fields(cfg, manifest), (SystematicFailure, SweepError))
    return writer.dir, summary


def first_manifest(ray: Any, worker: Any, sweep_run: SweepRun) -> dict[str, Any]:
    """The run's manifest from its first worker; a worker that cannot load the run is one error."""
    try:
        return ray.get(worker.manifest.remote())
    except ray.exceptions.RayError as exc:
        raise SweepError(f"{sweep_run.label}: the worker could not load the run: {cause_line(exc)}") from None


def cause_line(exc: BaseException) -> str:
    """The first line of what went wrong inside Ray (the actor's own exception when there is one)."""
    cause = getattr(exc, "cause", None) or exc
    inner = getattr(cause, "cause", None)
    cause = inner if isinstance(inner, BaseException) else cause
    return f"{type(cause).__name__}: {(str(cause).strip().splitlines() or [''])[0]}"[:400]


def drive(ray: Any, workers: list[Any], new_worker: Any, progress: RunProgress, all_batches: list[list[str]],
          writer: RunWriter, written: list[dict[str, Any]], done: set[str],
          bar: tqdm) -> None:
    """Keeps every worker busy with one batch; writes results in batch order as they become writable;
    re-queues the batch of a worker that died and replaces the worker."""
    idle = list(workers)  # the first worker is loaded already: it takes the first batch
    while progress.pending or progress.out:
        while idle and progress.pending:
            worker, index = idle.pop(0), progress.pending.popleft()
            progress.out[worker.edit.remote(index)] = (worker, index)
        (ref,), _ = ray.wait(list(progress.out), num_returns=1)
        worker, index = progress.out.pop(ref)
        try:
            progress.ready[index] = ray.get(ref)
            idle.append(worker)
            bar.update(sum(cid not in done for cid in all_batches[index]))
        except ray.exceptions.RayTaskError as exc:
            raise SweepError(f"worker failed: {cause_line(exc)}") from None
        except ray.exceptions.RayError as exc:  # the process died: killed, out of memory, node lost
            progress.deaths[index] = progress.deaths.get(index, 0) + 1
            log.warning("sweep: the worker editing batch %d died (%s); %s", index, cause_line(exc),
                        "re-queued on a new worker" if progress.deaths[index] < MAX_WORKER_DEATHS
                        else f"its cases fail after {MAX_WORKER_DEATHS} deaths")
            ray.kill(worker)
            replacement = new_worker()
            workers[workers.index(worker)] = replacement
            idle.append(replacement)
            if progress.deaths[index] < MAX_WORKER_DEATHS:
                progress.pending.appendleft(index)
            else:
                progress.ready[index] = (died_records(all_batches[index], index), {})
                bar.update(len(all_batches[index]))
        write_ready(progress, writer, written, done)
        raise_if_stopped()  # a SIGTERM whose exception a destructor swallowed


def died_records(case_ids: list[str], index: int) -> list[dict[str, Any]]:
    """Failed records for a batch whose workers kept dying (the driver has the case ids, not the cases)."""
    message = f"the worker process died {MAX_WORKER_DEATHS} times while editing this batch"
    return [{"case_id": case_id, "batch_index": index, "status": "failed", "phase": "worker",
             "error": {"type": WorkerDied.__name__, "message": message}, "reason": f"{WorkerDied.__name__}: {message}"}
            for case_id in case_ids]


def write_ready(progress: RunProgress, writer: RunWriter, written: list[dict[str, Any]], done: set[str]) -> None:
    """Appends every result whose earlier batches are all written, in batch order, each case once."""
    while progress.position < len(progress.order) and progress.order[progress.position] in progress.ready:
        records, files = progress.ready.pop(progress.order[progress.position])
        if files:
            folder = writer.dir / "circuits"
            folder.mkdir(exist_ok=True)
            for name, content in files.items():
                (folder / name).write_bytes(content)
        for record in records:
            if record["case_id"] not in done:  # a batch cut off by an earlier interruption: only its missing cases
                writer.append(record)
                written.append(record)
                done.add(record["case_id"])
        check_systematic(written)
        progress.position += 1
