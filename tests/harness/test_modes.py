"""Editing modes (--batch-size, --sequential) and the held-out Wikipedia perplexity, on the tiny models."""

from __future__ import annotations

import json
import math

import pytest
import torch

import bench.run
from bench.cli import main
from bench.data import load_dataset
from bench.perplexity import heldout_texts, overlaps_keystats, wiki_perplexity
from bench.results import RunWriter
from bench.run import RunConfig, restore, run_batch, run_case, run_sequential
from bench.scoring import case_target_nll, counterfact_scores
from editors.base import EditOutcome, Editor, get_editor, load_hparams, register
from lmview.arch import backup
from lmview.cache import cache_dir
from lmview.case import EditCase
from tests.helpers import no_hparams

TEXTS = ("The river flows north through the valley and reaches the sea after three hundred kilometres.",
         "A short one.",
         "Paris is the capital and largest city of France, on the Seine.",
         "x",
         "Mathematics is the study of numbers, shapes and patterns; " * 12)


def add_amount(case: EditCase) -> float:
    return 0.05 * (len(case.subject) % 5 + 1)


@register("test-add")
class AddEditor(Editor):
    """Test-only: adds a per-case constant to layer 0's MLP output weight; NaN for the subject 'Nowhere'."""

    def __init__(self, bundle, hparams):
        super().__init__(bundle, hparams)
        self.calls: list[list[str]] = []
        self.undone = 0

    def parameters_to_touch(self, cases):
        return [self.bundle.arch.mlp_out_weight_name(0)]

    def apply(self, cases):
        self.calls.append([c.case_id for c in cases])
        weight = self.bundle.arch.mlp_out_weight(self.bundle.model, 0)
        with torch.no_grad():
            for case in cases:
                weight.add_(float("nan") if case.subject == "Nowhere" else add_amount(case))
        return EditOutcome(layers=[0], stats={"n_cases": len(cases)})

    def undo(self):
        self.undone += 1


@register("test-add-batched")
class BatchedAddEditor(AddEditor):
    """Test-only: AddEditor that takes a whole batch in one apply()."""

    batched = True


def facts(n: int) -> list[EditCase]:
    return load_dataset("facts").cases[:n]


def nowhere(case: EditCase) -> EditCase:
    return EditCase(case.case_id + "-nan", case.relation, "Nowhere", case.prompt, case.target_true, case.target_new,
                    case.paraphrases, case.neighborhood)


def quiet_cfg(editor: str, **kw) -> RunConfig:
    return RunConfig(editor=editor, circuits=False, ppl_texts=0, curve_ppl_texts=0, **kw)


def ft_editor(bundle, name: str = "ft-l") -> Editor:
    hparams, _ = load_hparams(name, bundle.name, bundle.arch.family)
    hparams.update(num_steps=4, lr=5e-3, norm_constraint=1e-2)  # a visible, still deterministic change
    return get_editor(name)(bundle, hparams)


def weights(bundle, names: list[str]) -> dict[str, torch.Tensor]:
    return backup(bundle.model, names)


# --- --batch-size ---------------------------------------------------------------------------

def test_batch_of_non_batched_editor_equals_one_by_one(tiny_model, tmp_path):
    """FT-M (not batched) on a batch of 2 = apply([c1]) then apply([c2]); pre-scores come before any edit."""
    editor, (c1, c2) = ft_editor(tiny_model, "ft-m"), facts(2)
    names = editor.parameters_to_touch([c1])
    original = weights(tiny_model, names)
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    pre2 = counterfact_scores(case_target_nll(model, tok, c2, dev))
    cfg = quiet_cfg("ft-m")
    try:
        records = run_batch(tiny_model, editor, [c1, c2], ["France"], cfg, tmp_path, batch_index=7, keep_edits=True)
        batched = weights(tiny_model, names)
        restore(model, original)
        editor.apply([c1])
        editor.apply([c2])
        by_hand = weights(tiny_model, names)
        restore(model, original)
        run_batch(tiny_model, editor, [c1], ["France"], cfg, tmp_path, 0, keep_edits=True)
        run_batch(tiny_model, editor, [c2], ["France"], cfg, tmp_path, 1, keep_edits=True)
        one_by_one = weights(tiny_model, names)
    finally:
        restore(model, original)
    assert all(not torch.equal(batched[n], original[n]) for n in names)
    assert all(torch.equal(batched[n], by_hand[n]) and torch.equal(batched[n], one_by_one[n]) for n in names)
    assert [r["status"] for r in records] == ["ok", "ok"] and [r["batch_index"] for r in records] == [7, 7]
    assert flat(records[1]["pre"]) == pytest.approx(flat(pre2), rel=1e-6, abs=1e-9)  # scored before c1's edit


def flat(scores: dict) -> dict:
    """Scores with the per-prompt NLL lists spread into scalar keys (pytest.approx compares flat mappings)."""
    out = {}
    for key, value in scores.items():
        if isinstance(value, list):
            out.update({f"{key}.{i}.{k}": v for i, row in enumerate(value) for k, v in row.items()})
        else:
            out[key] = value
    return out


@pytest.mark.parametrize("editor_name, expected_calls", [("test-add", 3), ("test-add-batched", 1)])
def test_batch_restores_bitwise_with_one_apply_per_batch_or_case(tiny_model, tmp_path, editor_name, expected_calls):
    editor = get_editor(editor_name)(tiny_model, {})
    cases = facts(3)
    before = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    records = run_batch(tiny_model, editor, cases, ["France"], quiet_cfg(editor_name), tmp_path, batch_index=2)
    after = dict(tiny_model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert len(editor.calls) == expected_calls and sum(map(len, editor.calls)) == 3 and editor.undone == 1
    assert [r["case_id"] for r in records] == [c.case_id for c in cases]
    assert all(r["status"] == "ok" and r["batch_index"] == 2 for r in records)
    # the post-scores see all three edits: the same weights for every case of the batch
    shifted = sum(add_amount(c) for c in cases)
    weight = tiny_model.arch.mlp_out_weight(tiny_model.model, 0)
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.add_(shifted)
        expected = counterfact_scores(case_target_nll(tiny_model.model, tiny_model.tokenizer, cases[0], tiny_model.device))
        weight.copy_(saved)
    assert records[0]["post"]["p_new"] == pytest.approx(expected["p_new"], rel=1e-5)


def test_nan_in_a_batch_fails_every_case_and_restores(tiny_model, tmp_path):
    editor = get_editor("test-add-batched")(tiny_model, {})
    cases = [facts(1)[0], nowhere(facts(1)[0])]
    before = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    records = bench.run._safe_batch(tiny_model, editor, cases, ["France"], quiet_cfg("test-add-batched"), tmp_path)
    after = dict(tiny_model.model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert [r["status"] for r in records] == ["failed", "failed"] and "NaN" in records[0]["reason"]


# --- --sequential ----------------------------------------------------------------------------

def test_sequential_failed_batch_rolls_back_only_itself(tiny_model, tmp_path):
    editor = get_editor("test-add")(tiny_model, {})
    good1, good2 = facts(2)
    name = tiny_model.arch.mlp_out_weight_name(0)
    original = weights(tiny_model, [name])
    cfg = quiet_cfg("test-add", sequential=True)
    try:
        statuses = [run_batch(tiny_model, editor, [case], ["France"], cfg, tmp_path, i, keep_edits=True)[0]["status"]
                    for i, case in enumerate([good1, nowhere(good1), good2])]
        kept = weights(tiny_model, [name])[name]
    finally:
        restore(tiny_model.model, original)
    assert statuses == ["ok", "failed", "ok"]
    expected = original[name] + add_amount(good1)
    expected = expected + add_amount(good2)
    assert torch.equal(kept, expected)
    assert editor.undone == 0  # undo() is left to the end of a sequential run


def test_sequential_curve_points_and_bitwise_restore(tiny_model, tmp_path, monkeypatch):
    texts = TEXTS[:3]
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: texts if n else None)
    editor = ft_editor(tiny_model)
    cases = facts(5)
    before = {n: p.detach().clone() for n, p in tiny_model.model.named_parameters()}
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    base_ppl = wiki_perplexity(model, tok, dev, list(texts))
    cfg = RunConfig(editor="ft-l", circuits=False, sequential=True, eval_every=2, curve_ppl_texts=3)
    writer = RunWriter(tmp_path / "run", {"editor": "ft-l"})
    points = run_sequential(tiny_model, editor, cases, ["France"], cfg, writer)
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in before)  # restored once, at the end
    assert [p["n_edits"] for p in points] == [0, 2, 4, 5]
    on_disk = [json.loads(line) for line in (writer.dir / "sequential.jsonl").read_text().splitlines()]
    assert on_disk == json.loads(json.dumps(points))
    records = [json.loads(line) for line in writer.cases_path.read_text().splitlines()]
    assert [r["batch_index"] for r in records] == [0, 1, 2, 3, 4] and all(r["status"] == "ok" for r in records)
    assert points[0]["ppl"] == pytest.approx(base_ppl, rel=1e-6) and points[0]["efficacy"] is None

    # independent recomputation of the point after 2 edits: apply both by hand, score both cases
    names = editor.parameters_to_touch(cases)
    original = weights(tiny_model, names)
    try:
        editor.apply([cases[0]])
        editor.apply([cases[1]])
        scores = [counterfact_scores(case_target_nll(model, tok, c, dev)) for c in cases[:2]]
        ppl_two = wiki_perplexity(model, tok, dev, list(texts))
        norms = {n: (float((w - original[n]).norm()), float(w.norm()), float(original[n].norm()))
                 for n, w in weights(tiny_model, names).items()}
    finally:
        restore(model, original)
    point = points[1]
    assert points[0]["weights"] == [] and points[0]["ppl_ratio"] == 1.0 and points[0]["collapsed"] is False
    assert {w["tensor"] for w in point["weights"]} == set(names)
    for row in point["weights"]:
        delta, norm, norm_0 = norms[row["tensor"]]
        assert delta > 0 and row["layer"] == bench.run.layer_of(row["tensor"]) is not None
        assert (row["delta_norm"], row["norm"], row["norm_0"]) == pytest.approx((delta, norm, norm_0), rel=1e-5)
    assert point["ppl_ratio"] == pytest.approx(ppl_two / base_ppl, rel=1e-6) and point["collapsed"] is False
    for key, field in (("efficacy", "efficacy_score"), ("paraphrase", "paraphrase_score"),
                       ("neighborhood", "neighborhood_score"), ("efficacy_magnitude", "efficacy_magnitude")):
        assert point[key] == pytest.approx(sum(s[field] for s in scores) / 2, rel=1e-5, abs=1e-9), key
    assert point["ppl"] == pytest.approx(ppl_two, rel=1e-6) and point["ppl"] != points[0]["ppl"]
    # the unedited reference: every case scored on the restored (unedited) weights, the point's means over its cases
    plain = {c.case_id: counterfact_scores(case_target_nll(model, tok, c, dev)) for c in cases}
    assert set(points[0]["unedited_cases"]) == set(plain)
    for case_id, row in points[0]["unedited_cases"].items():
        assert row == pytest.approx({k: plain[case_id][k] for k in row}, rel=1e-5, abs=1e-9)
        assert set(row) == {"efficacy_score", "paraphrase_score", "neighborhood_score"}
    for key, field in (("efficacy", "efficacy_score"), ("neighborhood", "neighborhood_score")):
        assert point["unedited"][key] == pytest.approx(sum(plain[c.case_id][field] for c in cases[:2]) / 2,
                                                       rel=1e-5, abs=1e-9), key
        assert points[0]["unedited"][key] == pytest.approx(sum(p[field] for p in plain.values()) / 5, rel=1e-5,
                                                           abs=1e-9), key


def test_sequential_curve_re_scores_only_the_fixed_sample(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: None)
    editor = ft_editor(tiny_model)
    cases = facts(6)
    sample = bench.run.curve_sample(cases, 3, seed=7)
    assert len(sample) == 3 and sample == bench.run.curve_sample(cases, 3, seed=7) <= {c.case_id for c in cases}
    assert bench.run.curve_sample(cases, 0, 7) is None and bench.run.curve_sample(cases, 6, 7) is None
    cfg = RunConfig(editor="ft-l", circuits=False, sequential=True, eval_every=4, eval_sample=3, seed=7)
    points = run_sequential(tiny_model, editor, cases, ["France"], cfg, RunWriter(tmp_path / "run", {}))
    assert [(p["n_edits"], p["n_cases"]) for p in points] == [(0, 0), (4, 4), (6, 6)]
    first_four = [c for c in cases[:4] if c.case_id in sample]
    assert points[1]["n_scored"] == len(first_four) and points[2]["n_scored"] == 3
    assert set(points[0]["unedited_cases"]) == sample  # the unedited reference covers the sample only

    # independent recomputation of the last point: all six edits applied by hand, the sampled cases scored
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    original = weights(tiny_model, editor.parameters_to_touch(cases))
    try:
        for case in cases:
            editor.apply([case])
        scores = [counterfact_scores(case_target_nll(model, tok, c, dev)) for c in cases if c.case_id in sample]
    finally:
        restore(model, original)
    for key, field in (("efficacy", "efficacy_score"), ("neighborhood", "neighborhood_score")):
        assert points[2][key] == pytest.approx(sum(s[field] for s in scores) / 3, rel=1e-5, abs=1e-9), key


def blowup_noise(weight: torch.Tensor) -> torch.Tensor:
    return 10.0 * torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)).to(weight)


def output_weight_name(bundle) -> str:
    head = bundle.model.get_output_embeddings().weight
    return next(n for n, p in bundle.model.named_parameters() if p is head)


@register("test-blowup")
class BlowupEditor(AddEditor):
    """Test-only: the third case and later add fixed noise of scale 10 to the unembedding (a random-init
    model's near-uniform predictions become sharp and wrong)."""

    def parameters_to_touch(self, cases):
        return [output_weight_name(self.bundle)]

    def apply(self, cases):
        self.calls.append([c.case_id for c in cases])
        if len(self.calls) >= 3:
            with torch.no_grad():
                weight = self.bundle.model.get_output_embeddings().weight
                weight.add_(blowup_noise(weight))
        return EditOutcome(layers=[], stats={})


def test_sequential_curve_flags_collapse_at_the_first_point_past_ten_times_the_perplexity(tiny_model, tmp_path,
                                                                                         monkeypatch):
    texts = TEXTS[:3]
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: texts if n else None)
    editor = BlowupEditor(tiny_model, {})
    cfg = RunConfig(editor="test-blowup", circuits=False, sequential=True, eval_every=1, curve_ppl_texts=3)
    points = run_sequential(tiny_model, editor, facts(4), ["France"], cfg, RunWriter(tmp_path / "run", {"editor": "x"}))
    ratios = [p["ppl_ratio"] for p in points]
    assert ratios[:3] == [1.0, 1.0, 1.0] and ratios[3] > 10  # the hand-made blow-up really is one
    assert [p["collapsed"] for p in points] == [False, False, False, True, True]
    noise = float(blowup_noise(tiny_model.model.get_output_embeddings().weight).norm())
    assert [round(p["weights"][0]["delta_norm"] / noise, 4) for p in points[1:]] == [0.0, 0.0, 1.0, 2.0]
    fields = bench.run.final_curve_fields(points)
    assert fields["sequential_collapsed_at"] == 3 and "> 10" in fields["collapse_criterion"]


def test_cli_sequential_run_writes_curve_and_mode(tmp_path, monkeypatch, device):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: TEXTS[:2] if n else None)
    out = tmp_path / "runs"
    code = main(["run", "--editor", "test-add", "--model", "tiny-gpt2", "--n", "3", "--all-cases", "--no-circuits",
                 "--sequential", "--eval-every", "2", "--output", str(out), "--device", device,
                 "--hparams", no_hparams(tmp_path)])
    assert code == 0
    (run_dir,) = out.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["mode"]["name"] == "sequential" and manifest["mode"]["eval_every"] == 2
    curve = [json.loads(line) for line in (run_dir / "sequential.jsonl").read_text().splitlines()]
    assert [p["n_edits"] for p in curve] == [0, 2, 3]
    assert {"n_edits", "efficacy", "paraphrase", "neighborhood", "ppl"} <= set(curve[-1])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["mode"] == "sequential" and summary["sequential_ppl"] == curve[-1]["ppl"]
    assert summary["sequential_ppl_base"] == curve[0]["ppl"]
    assert len((run_dir / "cases.jsonl").read_text().splitlines()) == 3


def test_no_generation_leaves_out_only_the_generation_family(tmp_path, monkeypatch, device):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: TEXTS[:2] if n else None)
    runs = {}
    for flag in ([], ["--no-generation"]):
        out = tmp_path / f"runs{len(flag)}"
        assert main(["run", "--editor", "test-add", "--model", "tiny-gpt2", "--n", "2", "--no-circuits",
                     "--sequential", "--eval-every", "1", "--output", str(out), "--device", device,
                     "--hparams", no_hparams(tmp_path), *flag]) == 0
        (run_dir,) = out.iterdir()
        records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
        curve = [json.loads(line) for line in (run_dir / "sequential.jsonl").read_text().splitlines()]
        config = json.loads((run_dir / "manifest.json").read_text())["config"]
        runs[bool(flag)] = records, curve, config
    (with_gen, curve_with, config_with), (without, curve_without, config_without) = runs[False], runs[True]
    assert config_with["generation"] is True and config_without["generation"] is False
    generation = {"post_generation", "post_generation_text"}
    assert all(generation <= set(r) for r in with_gen) and not any(generation & set(r) for r in without)
    timing = {"seconds_edit"}
    assert [{k: v for k, v in r.items() if k not in generation | timing} for r in with_gen] == \
           [{k: v for k, v in r.items() if k not in timing} for r in without]
    assert [{k: v for k, v in p.items() if k != "seconds"} for p in curve_with] == \
           [{k: v for k, v in p.items() if k != "seconds"} for p in curve_without]


def test_cli_batch_run_one_line_per_case(tmp_path, monkeypatch, device):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: TEXTS[:2] if n else None)
    out = tmp_path / "runs"
    assert main(["run", "--editor", "test-add-batched", "--model", "tiny-llama", "--n", "5", "--all-cases",
                 "--no-circuits", "--batch-size", "2", "--output", str(out), "--device", device,
                 "--hparams", no_hparams(tmp_path)]) == 0
    (run_dir,) = out.iterdir()
    records = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert [r["batch_index"] for r in records] == [0, 0, 1, 1, 2]
    assert len({r["ppl_pre"] for r in records}) == 1  # every batch starts from the restored weights
    assert records[0]["ppl_post"] == records[1]["ppl_post"] != records[2]["ppl_post"]
    assert json.loads((run_dir / "manifest.json").read_text())["mode"] == {
        "name": "batch", "batch_size": 2, "ppl_texts": 8, "restore": "after every batch"}


def test_cli_mode_errors_exit_2(capsys):
    assert main(["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--eval-every", "3"]) == 2
    assert "--eval-every needs --sequential" in capsys.readouterr().err
    assert main(["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--batch-size", "0"]) == 2
    assert "--batch-size must be at least 1" in capsys.readouterr().err


# --- perplexity ------------------------------------------------------------------------------

def reference_perplexity(model, tokenizer, texts, max_len: int) -> float:
    """One text at a time through Hugging Face's own shifted cross-entropy (`labels=`)."""
    nll, count = 0.0, 0
    for text in texts:
        ids = tokenizer(text).input_ids[:max_len]
        if len(ids) < 2:
            continue
        batch = torch.tensor([ids], device=model.device)
        with torch.no_grad():
            loss = model(input_ids=batch, labels=batch).loss
        nll += float(loss) * (len(ids) - 1)
        count += len(ids) - 1
    return math.exp(nll / count)


@pytest.mark.parametrize("max_len", [16, 128])
def test_perplexity_matches_per_text_hf_loss(tiny_model, max_len):
    model, tok = tiny_model.model, tiny_model.tokenizer
    expected = reference_perplexity(model, tok, TEXTS, max_len)
    got = wiki_perplexity(model, tok, tiny_model.device, list(TEXTS), max_len=max_len, batch_size=2)
    assert got == pytest.approx(expected, rel=1e-5)
    # padding is masked: the batch size does not matter
    assert wiki_perplexity(model, tok, tiny_model.device, list(TEXTS), max_len, batch_size=5) == pytest.approx(got, rel=1e-5)


def test_perplexity_rejects_texts_without_predictions(tiny_model):
    with pytest.raises(ValueError, match="two or more tokens"):
        wiki_perplexity(tiny_model.model, tiny_model.tokenizer, tiny_model.device, ["x"])


def test_heldout_texts_come_from_the_end(monkeypatch):
    fake = [f"text {i}" for i in range(100)]
    monkeypatch.setattr("bench.perplexity.wiki_texts", lambda: (fake, "fake"))
    assert heldout_texts(5) == fake[95:]
    with pytest.raises(ValueError):
        heldout_texts(0)
    with pytest.raises(ValueError):
        heldout_texts(101)
    # the key-statistics sample never draws the corpus's last 1,000 texts (editors/keystats.py HELDOUT_TAIL)
    assert not overlaps_keystats(32, 100000, 10033) and not overlaps_keystats(1000, 100000, 10033)
    assert overlaps_keystats(1001, 10, 10033) and not overlaps_keystats(1001, 0, 10033)


def test_heldout_texts_disjoint_from_key_statistics_texts():
    if not (cache_dir() / "corpora" / "wiki-offline" / "summaries_en-us.json").exists():
        pytest.skip("the offline Wikipedia corpus is not in the cache (fetched on first use by a run)")
    from editors.keystats import draw_sample
    from lmview.corpus import load_corpus

    held_out = heldout_texts(32)
    everything = draw_sample("wikipedia", 100000).texts  # the largest sample: all sampleable texts
    assert len(held_out) == 32 and not set(held_out) & set(everything)
    assert len(everything) == len(load_corpus("wikipedia")[0]) - 1000


def test_run_case_records_ppl_pre_and_post(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(bench.run, "heldout_for_ppl", lambda n: TEXTS[:3] if n else None)
    editor = get_editor("test-add")(tiny_model, {})
    case = facts(1)[0]
    model, tok, dev = tiny_model.model, tiny_model.tokenizer, tiny_model.device
    expected_pre = wiki_perplexity(model, tok, dev, list(TEXTS[:3]))
    record = run_case(tiny_model, editor, case, ["France"], RunConfig(editor="test-add", circuits=False, ppl_texts=3),
                      tmp_path)
    name = tiny_model.arch.mlp_out_weight_name(0)
    saved = weights(tiny_model, [name])
    try:
        with torch.no_grad():
            tiny_model.arch.mlp_out_weight(model, 0).add_(add_amount(case))
        expected_post = wiki_perplexity(model, tok, dev, list(TEXTS[:3]))
    finally:
        restore(model, saved)
    assert record["ppl_pre"] == pytest.approx(expected_pre, rel=1e-6)
    assert record["ppl_post"] == pytest.approx(expected_post, rel=1e-6) and record["ppl_post"] != record["ppl_pre"]
