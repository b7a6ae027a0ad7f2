"""Relation circuits under each setting: ablation, metric, few-shot prompts, KC's split, the size chosen on the
validation split alone, and the corrupting subjects, on the tiny models."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.lre import load_relation
from bench.relation_circuits import (Fact, RelationSplit, build_relation_circuit, demonstrations, kc_order, make_fact,
                                     pair_rows, query_start, relation_facts, relation_setting, split_by_subject)
from circuits.activations import run_capture
from circuits.evaluate import patched_logits
from circuits.relation import KC_SETTING, CircuitSetting, ScoringSet, batches, graph_of

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago"),
            ("Kenya", "Nairobi"), ("Cuba", "Havana")]
TEMPLATE = "The capital of {} is"


def write_relation(folder: Path, samples=CAPITALS) -> Path:
    path = folder / "capitals_settings.json"
    path.write_text(json.dumps({
        "name": "capitals", "prompt_templates": [TEMPLATE], "prompt_templates_zs": ["The capital of {} is the city of"],
        "properties": {}, "samples": [{"subject": s, "object": o} for s, o in samples]}))
    return path


def facts(shots: int = 0) -> list[Fact]:
    return [make_fact(TEMPLATE, s, o, CAPITALS, shots, seed=0) for s, o in CAPITALS]


def split_of(shots: int = 0) -> RelationSplit:
    val, test = split_by_subject(facts(shots), 0.5, seed=0)
    return RelationSplit("capitals", val, test, {"known_criterion": "all facts (no filter)"})


def quiet(msg: str) -> None:
    pass


# --- settings ------------------------------------------------------------------------------------

def test_eap_ig_over_inputs_is_rejected_with_zero_or_mean_ablation(tiny_model):
    from circuits.attribute import attribute

    for ablation in ("zero", "mean"):
        with pytest.raises(ValueError, match="needs --ablation corrupted"):
            CircuitSetting(method="eap-ig", ablation=ablation)
        rows, _ = pair_rows(tiny_model.tokenizer, facts()[:2], CAPITALS, seed=0)
        batch = batches(rows, tiny_model.tokenizer, tiny_model.device)[0]
        with pytest.raises(ValueError, match="needs --ablation corrupted"):
            attribute(tiny_model.bridge(), tiny_model.model, tiny_model.arch, graph_of(tiny_model.arch), batch,
                      "eap-ig", ablation=ablation)
    CircuitSetting(method="eap-ig", ablation="corrupted")
    CircuitSetting(method="eap-ig-activations", ablation="zero")
    with pytest.raises(ValueError):
        CircuitSetting(metric="nll")


@pytest.mark.parametrize("ablation", ["corrupted", "zero", "mean"])
@pytest.mark.parametrize("metric", ["logprob", "logit-diff", "match-nll"])
def test_every_setting_builds_and_bounds_the_circuit(tiny_model, ablation, metric):
    """All edges kept is the clean model; none kept is the ablated model; the report states the setting."""
    setting = CircuitSetting(ablation=ablation, metric=metric)
    result = build_relation_circuit(tiny_model, split_of(), CAPITALS, setting=setting, top_n=30, random_draws=1,
                                    curve=False, progress=quiet)
    s = result.report["setting"]
    assert (s["ablation"], s["metric"], s["method"], s["shots"]) == (ablation, metric, "eap", 0)
    assert result.circuit.settings["ablation"] == ablation and result.circuit.settings["metric"] == metric
    test = result.test
    full = test.with_edges(test.graph.edge_mask.clone())
    assert full.value.cpu() == pytest.approx(test.clean.value.cpu(), abs=1e-4)
    assert full.hit.tolist() == test.clean.hit.tolist()
    empty = test.with_edges(torch.zeros_like(test.graph.edge_mask))
    assert empty.value.cpu() == pytest.approx(test.corrupted.value.cpu(), abs=1e-4)
    if metric == "match-nll":  # KC's match_nll: NLL of the answer minus the full model's, 0 on the clean run
        assert test.clean.value.abs().max() < 1e-5


def test_zero_ablation_of_every_edge_feeds_the_logits_nothing(tiny_model):
    """Independent: with every edge zero-ablated the final norm reads 0, so the logits are unembed(norm(0))."""
    bundle = tiny_model
    rows, _ = pair_rows(bundle.tokenizer, facts()[:3], CAPITALS, seed=0, need_partner=False)
    scoring = ScoringSet(bundle, graph_of(bundle.arch), batches(rows, bundle.tokenizer, bundle.device),
                         CircuitSetting(ablation="zero"))
    with torch.no_grad():
        norm = bundle.arch.ln_final(bundle.model)
        zero = torch.zeros(1, bundle.arch.d_model, device=bundle.device)
        logits = bundle.model.get_output_embeddings()(norm(zero))[0].float()
    expected = logits.log_softmax(-1)[[r.answer for r in rows]].cpu()  # pytest.approx reads it through numpy
    assert scoring.corrupted.value.cpu() == pytest.approx(expected, abs=1e-4)


def test_logit_diff_uses_the_corrupting_subjects_answer(tiny_model):
    bundle = tiny_model
    rows, _ = pair_rows(bundle.tokenizer, facts()[:4], CAPITALS, seed=0)
    scoring = ScoringSet(bundle, graph_of(bundle.arch), batches(rows, bundle.tokenizer, bundle.device),
                         CircuitSetting(metric="logit-diff"))
    expected = []
    for row in rows:
        with torch.no_grad():
            logits = bundle.model(input_ids=torch.tensor([row.clean], device=bundle.device)).logits[0, -1]
        expected.append(float(logits[row.answer] - logits[row.corrupt_answer]))
    assert scoring.clean.value.cpu() == pytest.approx(torch.tensor(expected), abs=1e-4)


def test_run_config_carries_the_setting():
    from types import SimpleNamespace

    cfg = SimpleNamespace(ablation="zero", metric="match-nll", shots=2, graph=None, seed=0)
    assert relation_setting(cfg) == CircuitSetting(ablation="zero", metric="match-nll", shots=2)
    assert relation_setting(SimpleNamespace(seed=0)) == CircuitSetting()


# --- corrupting subjects ---------------------------------------------------------------------------

def test_corrupting_subject_never_shares_the_answer(tiny_model):
    tok = tiny_model.tokenizer
    # one-to-many: Chile also has the answer "Paris" (a made-up second object), and "New Delhi"/"New York"
    # share their first token
    samples = CAPITALS + [("Chile", "Paris"), ("India", "New Delhi"), ("Usa", "New York")]
    pool = [Fact(s, o, TEMPLATE.replace("{}", s)) for s, o in samples]
    for seed in range(5):
        rows, kept = pair_rows(tok, pool, samples, seed)
        for row, fact in zip(rows, kept):
            swapped = tok.decode(row.corrupt)
            other = next(s for s, _ in samples if s != fact.subject and f" {s} " in f" {swapped} ")
            firsts = {tok(" " + o, add_special_tokens=False).input_ids[0] for s, o in samples if s == other}
            assert row.answer not in firsts and row.corrupt_answer in firsts
            if fact.subject == "France":
                assert other != "Chile"
            if fact.subject == "India":
                assert other != "Usa"


# --- few-shot prompts --------------------------------------------------------------------------------

def test_demonstrations_never_hold_the_query_subject_or_answer():
    samples = CAPITALS + [("France", "Lyon"), ("Northern France", "Lille")]
    for seed in range(20):
        demos = demonstrations(samples, "France", "Paris", 4, random.Random(seed))
        assert len(demos) == len({s for s, _ in demos}) == 4
        assert all("France" not in s and "France" not in o and o != "Paris" for s, o in demos)
    fact = make_fact(TEMPLATE, "France", "Paris", samples, 3, seed=1)
    lines = fact.prompt.split("\n")
    assert len(lines) == 4 and lines[-1] == "The capital of France is" == fact.query
    assert fact.prompt.count("France") == 1 and fact.context == "\n".join(lines[:3]) + "\n"
    assert all(line.startswith("The capital of ") and not line.endswith(" is") for line in lines[:3])
    assert make_fact(TEMPLATE, "France", "Paris", samples, 3, seed=1) == fact  # deterministic
    with pytest.raises(ValueError, match="demonstrations"):
        demonstrations(CAPITALS[:3], "France", "Paris", 3, random.Random(0))


def test_relation_facts_with_shots(tmp_path):
    relation = load_relation(str(write_relation(tmp_path)))
    shot = relation_facts(relation, shots=2)
    assert [f.query for f in shot] == [f.prompt for f in relation_facts(relation)]
    assert all(f.prompt.count(f.subject) == 1 and f.prompt.count("\n") == 2 for f in shot)


def test_query_start_and_demonstrations_run_clean(tiny_model):
    """The query's first token is where ablation starts; with every edge ablated the demonstrations'
    positions still give the clean model's logits."""
    bundle, tok = tiny_model, tiny_model.tokenizer
    shot_facts = facts(shots=2)[:3]
    for fact in shot_facts:
        ids = tok(fact.prompt).input_ids
        start = query_start(tok, fact)
        assert tok.decode(ids[start:]).strip() == fact.query and start > 0
    rows, _ = pair_rows(tok, shot_facts, CAPITALS, seed=0, need_partner=False)
    graph = graph_of(bundle.arch)
    for ablation in ("zero", "mean"):
        scoring = ScoringSet(bundle, graph, batches(rows, tok, bundle.device), CircuitSetting(ablation=ablation))
        batch, ablated = scoring.chunks[0], scoring.ablated[0]
        with torch.no_grad():
            clean_logits, clean_out = run_capture(bundle.bridge(), graph, bundle.arch, bundle.model,
                                                  batch.clean_ids, batch.attention_mask)
            logits = patched_logits(bundle.bridge(), bundle.model, bundle.arch, graph, batch,
                                    torch.zeros_like(graph.edge_mask), ablated)
        for i, row in enumerate(rows):
            before = slice(0, row.query_start)
            assert torch.allclose(logits[i, before], clean_logits[i, before], atol=1e-4)
            assert not torch.allclose(logits[i, len(row.clean) - 1], clean_logits[i, len(row.clean) - 1], atol=1e-3)
            assert torch.equal(ablated[:, i, before], clean_out[:, i, before])
            if ablation == "zero":
                assert ablated[:, i, row.query_start: len(row.clean)].abs().max() == 0


def test_shots_report_states_k(tiny_model):
    result = build_relation_circuit(tiny_model, split_of(shots=2), CAPITALS, setting=KC_SETTING.__class__(
        ablation="zero", metric="match-nll", shots=2), top_n=20, random_draws=1, curve=False, progress=quiet)
    assert result.report["setting"]["shots"] == 2
    assert result.report["setting"]["circuit_read_at"] == "the query's positions"


# --- KC's split and the size chosen on validation ---------------------------------------------------------

def test_kc_order_is_random_seed_0_shuffle():
    items = [Fact(f"s{i}", f"o{i}", f"p{i}") for i in range(50)]
    state = random.getstate()
    try:
        reference = list(items)
        random.seed(0)
        random.shuffle(reference)  # what acdc/knowledge/knowledge_dataset.py does to the samples
    finally:
        random.setstate(state)
    val, test = kc_order(items)
    assert val == reference[:20] and test == reference[20:40]
    val, test = kc_order(items[:13])
    assert len(val) == len(test) == 6


def test_size_is_chosen_without_reading_the_test_split(tiny_model, monkeypatch):
    """The chosen size and circuit do not depend on the test split, and no test prompt is scored before
    the size is fixed."""
    import circuits.relation as relation

    split = split_of()
    events: list[tuple[str, object]] = []
    real_select, real_init = relation.select_size, relation.ScoringSet.__init__

    def select(*args, **kwargs):
        chosen = real_select(*args, **kwargs)
        events.append(("size", chosen["chosen"]))
        return chosen

    def init(self, bundle, graph, chunks, *args, **kwargs):
        events.append(("scoring", {tuple(row.tolist()) for b in chunks for row in b.clean_ids}))
        real_init(self, bundle, graph, chunks, *args, **kwargs)

    monkeypatch.setattr(relation, "select_size", select)
    monkeypatch.setattr(relation.ScoringSet, "__init__", init)
    grid = (5, 10, 20, 40, 80, 160)
    first = build_relation_circuit(tiny_model, split, CAPITALS, size_grid=grid, random_draws=1, curve=False,
                                   progress=quiet)
    test_ids = {tuple(b.clean_ids[i].tolist()) for b in first.test.chunks for i in range(b.clean_ids.shape[0])}
    size_at = next(i for i, e in enumerate(events) if e[0] == "size")
    assert all(not (e[1] & test_ids) for e in events[:size_at] if e[0] == "scoring")
    assert any(e[1] & test_ids for e in events[size_at:] if e[0] == "scoring")
    assert first.report["size_selection"]["chosen"] == len(first.circuit.edges)
    assert first.report["setting"]["size_rule"].startswith("the smallest size")
    # another test split (other prompts, wrong answers): the same size and the same circuit
    other = RelationSplit("capitals", split.validation,
                          [Fact(f.subject, "Zzz", f"The capital city of {f.subject} is") for f in split.test],
                          split.counts)
    second = build_relation_circuit(tiny_model, other, CAPITALS + [(f.subject, "Zzz") for f in split.test],
                                    size_grid=grid, random_draws=1, curve=False, progress=quiet)
    assert second.circuit.edges == first.circuit.edges
    assert second.report["size_selection"] == first.report["size_selection"]


def test_select_size_takes_the_smallest_size_reaching_the_full_model(tiny_model):
    from circuits.relation import select_size

    bundle = tiny_model
    rows, _ = pair_rows(bundle.tokenizer, facts()[:4], CAPITALS, seed=0)
    graph = graph_of(bundle.arch)
    scoring = ScoringSet(bundle, graph, batches(rows, bundle.tokenizer, bundle.device))
    scores = torch.rand(graph.n_upstream, graph.n_receivers, generator=torch.Generator().manual_seed(0))
    grid = (3, 30, graph.n_edges)
    picked = select_size(scoring, scores, grid, quiet)
    target = float(scoring.clean.hit.float().mean())
    from circuits.circuit import top_edges

    by_hand = [float(scoring.with_edges(top_edges(scores, graph, n)).hit.float().mean()) for n in grid]
    expected = next(n for n, h in zip(grid, by_hand) if h >= target)  # the full graph always reaches it
    assert picked["chosen"] == expected and picked["reached_full_model"]
    assert [t["validation_hit_at_10"] for t in picked["tried"]] == by_hand[: len(picked["tried"])]


# --- the command ----------------------------------------------------------------------------------------

def test_circuit_command_kc_setting(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "nothing"))  # no graphviz: the figure is still written
    relation = write_relation(tmp_path)
    out = tmp_path / "kc"
    assert main(["circuit", "--model", "tiny-gpt2", "--relation", str(relation), "--setting", "kc", "--method", "eap",
                 "--known-top-k", "0", "--shots", "1", "--output", str(out), "--device", "cpu", "--no-curve",
                 "--random-draws", "1"]) == 0
    report = json.loads((out / "report.json").read_text())
    s = report["setting"]
    assert (s["name"], s["method"], s["ablation"], s["metric"], s["shots"]) == (
        "kc (variant: method=eap)", "eap", "zero", "match-nll", 1)
    assert s["split"].startswith("KC:") and s["size_rule"].startswith("the smallest size")
    assert report["source"]["templates"] == ["The capital of {} is the city of"]
    assert all(f["prompt"].endswith("is the city of") and f["prompt"].count("\n") == 1 for f in report["test_facts"])
    assert set(report["hit_at_10"]) == {"validation", "test"}
    assert report["hit_at_10"]["validation"]["n_prompts"] == report["hit_at_10"]["test"]["n_prompts"] == 5
    assert (out / "circuit.svg").stat().st_size > 0 and (out / "circuit.png").read_bytes()[:4] == b"\x89PNG"
    variant = tmp_path / "kc-mean"
    assert main(["circuit", "--model", "tiny-gpt2", "--relation", str(relation), "--setting", "kc", "--method", "eap",
                 "--ablation", "mean", "--known-top-k", "0", "--top-n", "20", "--output", str(variant), "--device", "cpu",
                 "--no-curve", "--random-draws", "1"]) == 0
    s = json.loads((variant / "report.json").read_text())["setting"]
    assert s["name"] == "kc (variant: method=eap, ablation=mean)" and s["ablation"] == "mean"
    assert s["split"].startswith("KC:")


def test_circuit_command_rejects_conflicting_settings(tmp_path, capsys):
    relation = str(write_relation(tmp_path))
    base = ["circuit", "--model", "tiny-gpt2", "--relation", relation, "--device", "cpu"]
    assert main(base + ["--setting", "kc", "--method", "eap-ig"]) == 2  # eap-ig with KC's zero ablation
    assert main(base + ["--method", "eap-ig", "--ablation", "zero"]) == 2
    assert main(base + ["--shots", "-1"]) == 2
    assert main(["circuit", "--model", "tiny-gpt2", "--prompt", "The capital of France is", "--answer", "Paris",
                 "--shots", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 4 and "Traceback" not in err
