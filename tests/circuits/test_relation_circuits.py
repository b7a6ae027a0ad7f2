"""Relation-level circuits: curve areas, Hit@10 through the patching path, random circuits, logit lens,
circuit.json round trips, drawing, LRE splits and the two commands, on the tiny models."""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch

from bench.cli import main
from bench.lre import load_relation
from bench.relation_circuits import (Fact, build_relation_circuit, pair_rows, prepare_split, relation_facts,
                                     split_by_subject)
from circuits.circuit import Circuit
from circuits.curve import EDGE_PERCENTAGES, curve_areas, edges_at, faithfulness_curve, normalized_faithfulness
from circuits.draw import diff_edges, draw_circuit, draw_diff, split_edge
from circuits.layers import collect, lens_inputs, logit_lens, token_roles
from circuits.relation import ScoringSet, batches, graph_of, hits, random_edges
from tests.helpers import SHARED_DATA

LRE_CAPITALS = SHARED_DATA / "lre" / "factual" / "country_capital_city.json"
CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Spain", "Madrid"), ("Italy", "Rome"),
            ("Japan", "Tokyo"), ("Egypt", "Cairo"), ("Peru", "Lima"), ("Chile", "Santiago")]


def write_relation(folder: Path) -> Path:
    """A small relation file in the LRE format (the project's own test data, not the shared files)."""
    path = folder / "capitals_test.json"
    path.write_text(json.dumps({
        "name": "capitals (test)", "prompt_templates": ["The capital of {} is", "The capital city of {} is"],
        "prompt_templates_zs": [], "properties": {"relation_type": "factual"},
        "samples": [{"subject": s, "object": o} for s, o in CAPITALS]}))
    return path


# --- curve -------------------------------------------------------------------------------------

def test_curve_areas_match_hand_computation():
    # three points by hand: CPR = 0.5 * (0 + 2) / 2 + 0.5 * (2 + 1) / 2; CMD = 0.5 * (1 + 1) / 2 + 0.5 * (1 + 0) / 2
    assert curve_areas([0.0, 0.5, 1.0], [0.0, 2.0, 1.0]) == pytest.approx({"cpr": 1.25, "cmd": 0.75})
    # f(x) = x on MIB's x values: the trapezoid rule is exact, the integrals of x and 1 - x from 0.001 to 1
    xs = [p / 100 for p in EDGE_PERCENTAGES]
    areas = curve_areas(xs, xs)
    assert areas["cpr"] == pytest.approx((1 - 0.001**2) / 2)
    assert areas["cmd"] == pytest.approx((1 - 0.5) - (0.001 - 0.001**2 / 2))
    with pytest.raises(ValueError):
        curve_areas([0.5, 0.1], [1.0, 1.0])


def test_faithfulness_curve_points_and_normalisation():
    n_edges = 12345
    curve = faithfulness_curve(lambda k: k / n_edges, n_edges)
    assert [p["n_edges"] for p in curve["points"]] == [math.floor(p / 100 * n_edges) for p in EDGE_PERCENTAGES]
    assert curve["points"][-1]["faithfulness"] == 1.0 and edges_at(0.1, 999) == 0
    assert normalized_faithfulness(-1.0, clean=-1.0, corrupted=-5.0) == 1.0
    assert normalized_faithfulness(-4.0, clean=-2.0, corrupted=-6.0) == pytest.approx(0.5)
    assert math.isnan(normalized_faithfulness(1.0, 2.0, 2.0))


# --- evaluation path -------------------------------------------------------------------------------

def capital_facts() -> list[Fact]:
    return [Fact(s, o, f"The capital of {s} is") for s, o in CAPITALS]


def test_hit_at_10_with_all_edges_equals_plain_hit_at_10(tiny_model):
    bundle = tiny_model
    rows, facts = pair_rows(bundle.tokenizer, capital_facts(), CAPITALS, seed=0)
    assert len(rows) >= 2
    graph = graph_of(bundle.arch)
    test = ScoringSet(bundle, graph, batches(rows, bundle.tokenizer, bundle.device, chunk=3))
    full = test.with_edges(graph.edge_mask.clone())
    # independent: the plain Hugging Face model, one prompt at a time, with torch.topk
    expected = []
    for row in rows:
        with torch.no_grad():
            logits = bundle.model(input_ids=torch.tensor([row.clean], device=bundle.device)).logits[0, -1]
        expected.append(row.answer in logits.topk(10).indices.tolist())
    assert full.hit.tolist() == expected == test.clean.hit.tolist()
    assert full.value.cpu() == pytest.approx(test.clean.value.cpu(), abs=1e-4)
    assert test.faithfulness(full) == pytest.approx(1.0, abs=1e-4)
    empty = test.with_edges(torch.zeros_like(graph.edge_mask))  # every edge corrupted: the corrupted run
    assert empty.value.cpu() == pytest.approx(test.corrupted.value.cpu(), abs=1e-4)
    assert empty.hit.tolist() == test.corrupted.hit.tolist()


def test_hits_counts_rank_below_k():
    logits = torch.zeros(2, 3, 20)
    logits[0, 2] = torch.arange(20.0)  # answer 5 has 14 larger logits: rank 15
    logits[1, 1] = -torch.arange(20.0)  # answer 5 has 5 larger logits: rank 6
    batch = type("B", (), {"answer_pos": torch.tensor([2, 1]), "answer_ids": torch.tensor([5, 5])})
    assert hits(logits, batch).tolist() == [False, True]
    assert hits(logits, batch, k=15).tolist() == [True, True]
    assert hits(torch.zeros(2, 3, 20), batch).tolist() == [False, False]  # all tied: not a hit
    one = type("B", (), {"answer_pos": torch.tensor([0]), "answer_ids": torch.tensor([5])})
    tied = torch.zeros(1, 1, 20)
    tied[0, 0, :10] = 1.0  # the answer (5) tied with 9 others at the top: still within 10
    assert hits(tied, one).tolist() == [True]
    tied[0, 0, :11] = 1.0  # tied with 10 others: not
    assert hits(tied, one).tolist() == [False]


def test_random_circuit_has_the_requested_edge_count(tiny_model):
    graph = graph_of(tiny_model.arch)
    for n in (1, 37, graph.n_edges):
        keep = random_edges(graph, n, seed=3)
        assert int(keep.sum()) == n and not (keep & ~graph.edge_mask).any()
    assert torch.equal(random_edges(graph, 37, seed=3), random_edges(graph, 37, seed=3))
    assert not torch.equal(random_edges(graph, 37, seed=3), random_edges(graph, 37, seed=4))


# --- per-layer view ------------------------------------------------------------------------------

def test_logit_lens_at_the_last_layer_is_the_models_output(tiny_model):
    bundle = tiny_model
    prompts = ["The capital of France is", "The official language of Germany is the"]
    inputs = lens_inputs(bundle.tokenizer, prompts, ["France", "Germany"], ["Paris", "German"], bundle.device)
    store = collect(bundle, inputs)
    lens = logit_lens(bundle, store[f"post{bundle.arch.n_layers - 1}"])
    with torch.no_grad():
        logits = bundle.model(input_ids=inputs.ids, attention_mask=inputs.mask).logits
    own = logits[torch.arange(2), inputs.last]
    assert torch.allclose(lens, own, atol=1e-4)
    # earlier layers are not the output
    assert not torch.allclose(logit_lens(bundle, store["post0"]), own, atol=1e-2)


def test_token_roles_mark_subject_and_relation(tiny_model):
    tok = tiny_model.tokenizer
    ids, subject, relation = token_roles(tok, "The capital city of Buenos Aires is", "Buenos Aires")
    text = lambda flags: "".join(tok.decode([i]) for i, f in zip(ids, flags) if f)  # noqa: E731
    assert text(subject).strip() == "Buenos Aires"
    # position 0 is a real token on these tokenizers (no BOS): it counts; the last token does not
    assert text(relation).strip() == "The capital city of"
    assert not any(s and r for s, r in zip(subject, relation))


# --- circuit.json and drawing -----------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_relation_result(tmp_path_factory):
    from lmview.models import load_model

    bundle = load_model("tiny-gpt2", "cpu")
    relation = load_relation(str(write_relation(tmp_path_factory.mktemp("rel"))))
    split = prepare_split(bundle, relation.name, relation_facts(relation), relation.samples, known_top_k=None)
    return build_relation_circuit(bundle, split, relation.samples, top_n=25, random_draws=2, curve=True,
                                  progress=lambda msg: None)


def test_relation_circuit_report_and_round_trip(tiny_relation_result, tmp_path):
    result = tiny_relation_result
    report = result.report
    for split in ("validation", "test"):
        assert report["hit_at_10"][split]["n_edges"] == len(result.circuit.edges) == 25
        assert len(report["hit_at_10"][split]["random_circuit_draws"]) == 2
    assert report["setting"]["size_rule"] == "fixed: --top-n 25"
    curve = report["faithfulness_curve"]
    for area in ("cpr", "cmd"):  # MIB's two selections (circuits.curve.mib_curves)
        points = curve[f"{area}_points"]
        assert [p["percent"] for p in points] == list(EDGE_PERCENTAGES)
        assert points[-1]["faithfulness"] == pytest.approx(1.0, abs=1e-4)  # 100% of edges is the clean model
        x = [p["percent"] / 100 for p in points]
        assert curve[area] == pytest.approx(curve_areas(x, [p["faithfulness"] for p in points])[area])
    assert report["facts"]["prompts_total"] == 2 * len(CAPITALS)
    path = tmp_path / "circuit.json"
    result.circuit.save(path)
    back = Circuit.from_json(json.loads(path.read_text()))
    assert back == result.circuit
    # nodes count as EAP-IG counts them: senders of the circuit's edges that lie on an input -> logits path
    assert set(back.nodes) <= {split_edge(e).sender for e in back.edges} and back.nodes


def test_split_has_disjoint_subjects_and_caps():
    facts = [Fact(s, o, t.format(s)) for s, o in CAPITALS for t in ("The capital of {} is", "{} has its capital in")]
    val, test = split_by_subject(facts, 0.5, seed=1)
    assert {f.subject for f in val}.isdisjoint({f.subject for f in test})
    assert len(val) == len(test) == len(CAPITALS)
    val, test = split_by_subject(facts, 0.5, seed=1, max_validation=3, max_test=2)
    assert (len(val), len(test)) == (3, 2)


def test_corrupted_prompts_swap_the_subject_at_equal_length(tiny_model):
    tok = tiny_model.tokenizer
    rows, facts = pair_rows(tok, capital_facts(), CAPITALS, seed=0)
    for row, fact in zip(rows, facts):
        assert len(row.clean) == len(row.corrupt) and row.clean != row.corrupt
        assert fact.subject not in tok.decode(row.corrupt) and row.answer == tok(" " + fact.object).input_ids[0]
        assert row.corrupt_answer != row.answer


def test_drawing_writes_svg_and_png_without_graphviz(tmp_path, monkeypatch):
    import shutil

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))  # no `dot` (nor anything else) on PATH
    assert shutil.which("dot") is None
    edges = {"input->a0.h1<q>": 0.5, "a0.h1->m0": -1.0, "m0->a1.kv0<k>": 0.2, "a0.h1->a1.kv0<v>": 0.1,
             "m0->logits": 2.0}
    draw_circuit(edges, [tmp_path / "c.svg", tmp_path / "c.png"], "test")
    root = ET.parse(tmp_path / "c.svg").getroot()
    assert root.tag.endswith("svg") and (tmp_path / "c.svg").stat().st_size > 1000
    assert (tmp_path / "c.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    other = {"a0.h1->m0": 1.0, "input->logits": 0.3}
    assert diff_edges(edges, other) == {"kept": ["a0.h1->m0"], "lost": sorted(set(edges) - {"a0.h1->m0"}),
                                        "new": ["input->logits"]}
    draw_diff(edges, other, [tmp_path / "d.svg"])
    ET.parse(tmp_path / "d.svg")


def test_node_positions_put_layers_in_order():
    from circuits.draw import node_positions

    pos = node_positions({"input", "a0.h0", "a0.h1", "m0", "a1.h0", "m1", "logits"})
    order = ["input", "a0.h0", "m0", "a1.h0", "m1", "logits"]
    ys = [pos[n][1] for n in order]
    assert ys == sorted(ys, reverse=True) and len(set(ys)) == len(ys)  # one row each, top to bottom
    assert pos["a0.h0"][1] == pos["a0.h1"][1] and pos["a0.h0"][0] < pos["a0.h1"][0]


def test_edge_names_parse():
    assert split_edge("a3.h1->a5.kv0<k>") == split_edge("a3.h1->a5.kv0<k>")
    parts = split_edge("a3.h1->a5.kv0<k>")
    assert (parts.sender, parts.receiver, parts.port) == ("a3.h1", "a5.kv0", "k")
    assert split_edge("m2->logits").port == ""
    with pytest.raises(ValueError):
        split_edge("m2")


# --- commands ---------------------------------------------------------------------------------

def test_circuit_command_writes_its_files_and_diff(tmp_path, capsys):
    relation = write_relation(tmp_path)
    out = tmp_path / "out"
    code = main(["circuit", "--model", "tiny-gpt2", "--relation", str(relation), "--known-top-k", "0",
                 "--top-n", "20", "--output", str(out), "--device", "cpu", "--no-curve", "--random-draws", "1"])
    assert code == 0
    names = {"circuit.json", "report.json", "layers.png", "circuit.svg", "circuit.png", "circuit.dot"}
    assert names <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    for split in ("validation", "test"):
        assert {"full_model", "circuit", "random_circuit", "n_edges"} <= set(report["hit_at_10"][split])
    assert report["setting"] == {"method": "eap", "ablation": "corrupted", "metric": "logprob", "graph": report["setting"]["graph"],
                                 "split": report["setting"]["split"], "shots": 0, "size_rule": "fixed: --top-n 20",
                                 "known": "all facts (no filter)", "hit_k": 10, "circuit_read_at": "all positions",
                                 "name": "default"}
    assert report["setting"]["graph"] in ("ungrouped", "grouped") and report["setting"]["split"].startswith("by subject")
    assert len(report["layers"]["logit_lens"]) == 4 and report["source"]["kind"] == "lre"
    one = tmp_path / "one"
    assert main(["circuit", "--model", "tiny-gpt2", "--prompt", "The capital of France is", "--answer", "Paris",
                 "--top-n", "30", "--output", str(one), "--device", "cpu", "--no-curve", "--random-draws", "1"]) == 0
    assert json.loads((one / "report.json").read_text())["source"]["subject"] == "France"
    diff = tmp_path / "diff.svg"
    assert main(["circuit-diff", str(out / "circuit.json"), str(one / "circuit.json"), "--output", str(diff)]) == 0
    summary = json.loads(diff.with_suffix(".json").read_text())
    assert set(summary) >= {"kept", "lost", "new"}
    ET.parse(diff)


def test_circuit_command_rejects_bad_input(tmp_path, capsys):
    assert main(["circuit", "--model", "tiny-gpt2"]) == 2
    assert main(["circuit", "--model", "tiny-gpt2", "--relation", str(tmp_path / "missing.json")]) == 2
    assert main(["circuit", "--model", "tiny-gpt2", "--prompt", "The capital of France is"]) == 2
    assert main(["circuit-diff", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.skipif(not LRE_CAPITALS.exists(), reason="../shared/data/lre is absent (third-party sample data)")
def test_lre_relation_split_on_shared_data(tiny_model):
    relation = load_relation("country_capital_city")
    split = prepare_split(tiny_model, relation.name, relation_facts(relation), relation.samples,
                          known_top_k=None, max_validation=None, max_test=None)
    assert split.counts["prompts_total"] == len(relation.samples) * len(relation.prompt_templates)
    assert len(split.validation) + len(split.test) == split.counts["prompts_known"]
    assert {f.subject for f in split.validation}.isdisjoint({f.subject for f in split.test})


# --- bench run --relation-circuits ---------------------------------------------------------------------

def test_relation_source_mapping(tmp_path):
    from bench.relation_circuits import relation_source

    assert relation_source("no_such_relation") is None
    fallback = relation_source("element_symbol", lre_root=tmp_path)  # no LRE file: the built-in facts
    assert fallback.name == "facts:element_symbol" and len(fallback.facts) >= 4
    assert all(f.subject in f.prompt for f in fallback.facts)
    (tmp_path / "factual").mkdir()
    write_relation(tmp_path / "factual")
    assert relation_source("capitals_test", lre_root=tmp_path).name == "lre:capitals_test"
    if LRE_CAPITALS.exists():
        assert relation_source("country_capital").name == relation_source("P36").name == "lre:country_capital_city"


def test_run_case_reports_relation_circuit_change(tiny_model, tmp_path):
    """A no-op edit: the rediscovered relation circuit equals the pre-edit one and Hit@10 does not move."""
    from bench.relation_circuits import relation_circuits_for
    from bench.run import RunConfig, run_case
    from editors.base import EditOutcome, Editor
    from lmview.case import EditCase

    class NoOpEditor(Editor):
        def parameters_to_touch(self, cases):
            return [self.bundle.arch.mlp_out_weight_name(0)]

        def apply(self, cases):
            return EditOutcome(layers=[0])

    tiny_model.bridge()
    cfg = RunConfig(editor="noop", circuits=False, only_known=False, relation_circuits=True, top_n=40, ppl_texts=0)
    cases = [EditCase(case_id=f"t-{s}", relation="element_symbol", subject=s, prompt="The chemical symbol for {} is",
                      target_true=t, target_new="Xx", paraphrases=(f"{s} has the symbol",),
                      neighborhood=(("The chemical symbol for Iron is", "Fe"),)) for s, t in (("Gold", "Au"), ("Silver", "Ag"))]
    relation_circuits_for(tiny_model, cfg).top_n = 40  # a strict subset of the tiny graph's edges
    records = [run_case(tiny_model, NoOpEditor(tiny_model, {}), case, ["Gold", "Silver"], cfg, tmp_path) for case in cases]
    for record in records:
        assert record["status"] == "ok", record
        assert record["relation_circuit_source"] == "facts:element_symbol"
        assert record["relation_circuit_edge_jaccard"] == 1.0 and record["relation_circuit_node_jaccard"] == 1.0
        assert record["relation_hit10_full_delta"] == 0.0 and record["relation_hit10_circuit_delta"] == 0.0
    state = relation_circuits_for(tiny_model, cfg)
    assert list(state.pre) == ["element_symbol"]  # measured once for the two cases
    assert (tmp_path / "relation-element_symbol.pre.json").exists()
    post = Circuit.from_json(json.loads((tmp_path / "t-Gold.relation.post.json").read_text()))
    assert len(post.edges) == 40 < post.n_graph_edges
