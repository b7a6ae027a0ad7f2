"""Side-by-side run of the harness's EAP and EAP-IG against the reference EAP-IG code (Hanna et al.).

Both implementations score the same model (SmolLM2-135M, the same fp32 weights), the same clean/corrupted
token ids and the same metric (log-probability of the answer's first token at the last real position, summed
over the batch), with corrupted-input patching. The script reports, per method, the Spearman rank correlation
of the edge scores, the overlap of the top-100 and top-1000 edges by |score|, the largest score difference, and
the wall time of each implementation on the same batch with the same thread count.

The reference runs in its own virtual environment (it needs TransformerLens 2's `HookedTransformer`), as a
subprocess: this file, run there with `worker` as its first argument. The worker imports only torch,
transformers, TransformerLens and the reference package (from `--ref-src`); nothing of the reference is
copied here. It builds a `HookedTransformerConfig` by hand from the cached Hugging Face `config.json` (no hub),
converts the Hugging Face weights with TransformerLens's own `convert_llama_weights`, loads them with
`load_and_process_state_dict`, and checks its logits against the harness's Hugging Face model.

Reproduce (CPU, 2 threads):

    # the reference venv: CPU torch and TransformerLens 2 (the reference's own dependencies)
    python3 -m venv /tmp/refvenv
    /tmp/refvenv/bin/pip install torch==2.13.0 "transformer_lens<3" matplotlib "pyarrow>=21,<22"
    # (pyarrow pinned: TransformerLens 2 keeps numpy < 2, and the newest pyarrow needs numpy 2)
    # the reference source (https://github.com/hannamw/EAP-IG, commit 795f560); the package is src/eap
    git clone https://github.com/hannamw/EAP-IG /tmp/ref/EAP-IG
    # the run, from the project venv
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/reference_eapig.py \
        --ref-python /tmp/refvenv/bin/python --ref-src /tmp/ref/EAP-IG/src \
        --json benchmarks/results/reference-eapig-cpu.json
    # a tiny grouped-query model (random weights, so no known-fact filter), ungrouped graph
    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/reference_eapig.py --ref-python /tmp/refvenv/bin/python \
        --ref-src /tmp/ref/EAP-IG/src --model tiny-llama --all-facts --n 8 --repeats 1 --threads 1 \
        --json benchmarks/results/reference-eapig-tiny-llama.json

Graph mapping. Senders (input, a{l}.h{h}, m{l}) are in the same order in both graphs. The reference
ungroups grouped-query attention (one k and one v receiver per query head, `ungroup_grouped_query_attention`).
With `--graph ungrouped` (the default) the harness's graph is the same one, receiver for receiver, and every
edge is compared as it is. With `--graph grouped` the harness has one k and one v receiver per key/value
group, whose score is the sum of the reference's per-query-head scores over the group; the comparison sums
them, and the statistics are also given on the q, MLP-input and logits edges alone (1:1). The committed
benchmarks/results/reference-eapig-cpu.json was measured on the grouped graph.

Known differences that are not bugs of either side:
- EAP-IG step points: the reference interpolates the input embeddings at k/m for k = 0..m-1 (from the
  corrupted input, without the clean one), the harness at k = 1..m (ending at the clean input). At m = 5
  the two sums are different estimates of the same integral, so EAP-IG scores agree only approximately.
  The reference is therefore also run once (untimed) with the clean and corrupted prompts swapped and its
  scores negated: its points k/m (k = 0..m-1) from the clean input are then the harness's points k/m
  (k = 1..m) from the corrupted input, so that comparison (`eap_ig_same_points`) should agree to rounding.
- Scale: the reference divides by the number of prompts; its scores are multiplied back here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

REPO = Path(__file__).resolve().parent.parent
METHODS = ("eap", "eap_ig")


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float, float]:
    """(result, wall seconds, this process's CPU seconds)."""
    wall, cpu = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - wall, time.process_time() - cpu


def repeat_timings(runs: dict[str, Callable[[], torch.Tensor]], repeats: int
                   ) -> tuple[dict[str, torch.Tensor], dict[str, list[float]], dict[str, list[float]]]:
    """One warm-up per method, then `repeats` interleaved timed runs. Returns the last scores and the times."""
    for fn in runs.values():
        fn()
    scores: dict[str, torch.Tensor] = {}
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, fn in runs.items():
            scores[name], w, c = timed(fn)
            wall[name].append(w)
            cpu[name].append(c)
    return scores, wall, cpu


# ---------------------------------------------------------------------------------------------------------
# worker: runs in the reference venv (torch, transformers, TransformerLens 2, the reference package)
# ---------------------------------------------------------------------------------------------------------

def hooked_config(hf: dict[str, Any], n_ctx: int) -> Any:
    """A HookedTransformerConfig for a Llama-family Hugging Face config.json, set up as the reference requires."""
    from transformer_lens import HookedTransformerConfig

    rope = hf.get("rope_parameters") or {}
    n_kv = hf.get("num_key_value_heads", hf["num_attention_heads"])
    d_head = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    return HookedTransformerConfig(
        d_model=hf["hidden_size"], d_head=d_head, n_heads=hf["num_attention_heads"], d_mlp=hf["intermediate_size"],
        n_layers=hf["num_hidden_layers"], n_ctx=n_ctx, eps=hf["rms_norm_eps"], d_vocab=hf["vocab_size"],
        act_fn=hf["hidden_act"], n_key_value_heads=n_kv if n_kv != hf["num_attention_heads"] else None,
        normalization_type="RMS", positional_embedding_type="rotary", rotary_adjacent_pairs=False,
        rotary_dim=d_head, rotary_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)), final_rms=True,
        gated_mlp=True, original_architecture="LlamaForCausalLM", dtype=torch.float32, device="cpu",
        use_split_qkv_input=True, use_attn_result=True, use_hook_mlp_in=True,
        ungroup_grouped_query_attention=n_kv != hf["num_attention_heads"],
    )


def hf_llama(hf: dict[str, Any], hf_dir: Path) -> torch.nn.Module:
    """The Hugging Face Llama model from the cached safetensors, with the config fields set explicitly
    (this venv's transformers may predate the `rope_parameters` field)."""
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    rope = hf.get("rope_parameters") or {}
    keys = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "hidden_act", "rms_norm_eps", "tie_word_embeddings", "attention_bias",
            "mlp_bias", "head_dim", "max_position_embeddings")
    config = LlamaConfig(**{k: hf[k] for k in keys if k in hf},
                         rope_theta=rope.get("rope_theta", hf.get("rope_theta", 10000.0)))
    model = LlamaForCausalLM(config)
    missing, unexpected = model.load_state_dict(load_file(str(hf_dir / "model.safetensors")), strict=False)
    if config.tie_word_embeddings:
        model.tie_weights()
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise SystemExit(f"worker: weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.eval()


class _CpuZerosTorch:
    """torch, except that zeros(..., device='cuda') is made on the CPU (the reference allocates its score
    matrix on 'cuda'). Installed as the reference attribution module's `torch` name."""

    def __getattr__(self, name: str) -> Any:
        return getattr(torch, name)

    @staticmethod
    def zeros(*size: Any, device: Any = None, **kwargs: Any) -> torch.Tensor:
        return torch.zeros(*size, device="cpu" if device == "cuda" else device, **kwargs)


def worker(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="reference_eapig.py worker")
    parser.add_argument("--ref-src", required=True, help="folder that holds the reference package `eap`")
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--batch", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(Path(args.ref_src).resolve()))
    from importlib.metadata import version

    from eap import attribute as ref_attribute
    from eap.graph import Graph as RefGraph
    from transformer_lens import HookedTransformer
    from transformer_lens.pretrained.weight_conversions.llama import convert_llama_weights

    data = torch.load(args.batch)
    clean, corrupt, mask = data["clean_ids"], data["corrupt_ids"], data["attention_mask"]
    answers, pos = data["answer_ids"], data["answer_pos"]
    hf_dir = Path(args.hf_dir)
    hf = json.loads((hf_dir / "config.json").read_text())

    cfg = hooked_config(hf, n_ctx=max(64, clean.shape[1]))
    hf_model = hf_llama(hf, hf_dir)
    model = HookedTransformer(cfg)
    # from_pretrained's processing, except center_unembed, so that raw logits can be compared with the HF model
    # (it shifts each position's logits by a constant, which leaves the log-prob metric unchanged)
    model.load_and_process_state_dict(convert_llama_weights(hf_model, cfg), fold_ln=True,
                                      center_writing_weights=True, center_unembed=False, fold_value_biases=True)
    model.eval()
    rows = torch.arange(clean.shape[0])
    with torch.no_grad():
        tl_logits = model(clean, attention_mask=mask)
        hf_venv_logits = hf_model(input_ids=clean, attention_mask=mask).logits
    real = mask.bool()
    logit_check = {
        "max_abs_diff_answer_pos_vs_harness_hf": float((tl_logits[rows, pos] - data["hf_logits"]).abs().max()),
        "max_abs_logit_answer_pos": float(data["hf_logits"].abs().max()),
        "max_abs_diff_logprob_answer_pos_vs_harness_hf": float(
            (tl_logits[rows, pos].log_softmax(-1) - data["hf_logits"].log_softmax(-1)).abs().max()),
        "max_abs_diff_all_real_pos_vs_ref_venv_hf": float((tl_logits[real] - hf_venv_logits[real]).abs().max()),
        "top1_agree_answer_pos": float((tl_logits[rows, pos].argmax(-1) == data["hf_logits"].argmax(-1)).float().mean()),
    }
    del hf_model, hf_venv_logits

    # the exact token ids of the harness, fed in place of the reference's string tokenizer
    lengths = mask.sum(1)

    def given_tokens(_model: Any, tokens: torch.Tensor, max_length: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        return tokens, mask, lengths, tokens.shape[1]

    ref_attribute.tokenize_plus = given_tokens
    ref_attribute.torch = _CpuZerosTorch()

    def answer_logprob_sum(logits: torch.Tensor, _clean_logits: torch.Tensor, input_lengths: torch.Tensor,
                           labels: torch.Tensor) -> torch.Tensor:
        r = torch.arange(logits.shape[0])
        return logits[r, input_lengths - 1].log_softmax(-1)[r, labels].sum()

    graph = RefGraph.from_model(model)
    loader = [(clean, corrupt, answers)]
    n_items = clean.shape[0]

    def run(method: str, steps: int | None) -> torch.Tensor:
        ref_attribute.attribute(model, graph, loader, answer_logprob_sum, method=method, ig_steps=steps, quiet=True)
        return graph.scores.clone() * n_items  # the reference averages over prompts; the harness sums

    runs = {"eap": lambda: run("EAP", None), "eap_ig": lambda: run("EAP-IG-inputs", args.steps)}
    scores, wall, cpu = repeat_timings(runs, args.repeats)
    # The same integral on the harness's step points: with the two prompts' roles swapped, the reference's
    # points k/m (k = 0..m-1) from the clean input towards the corrupted one are the points k/m (k = 1..m)
    # from the corrupted input towards the clean one, and its activation difference changes sign.
    loader[:] = [(corrupt, clean, answers)]
    scores["eap_ig_same_points"] = -run("EAP-IG-inputs", args.steps)
    torch.save({
        "scores": scores, "real_edge_mask": graph.real_edge_mask.clone(), "wall": wall, "cpu": cpu,
        "logit_check": logit_check, "threads": torch.get_num_threads(), "n_edges": len(graph.edges),
        "versions": {"torch": str(torch.__version__), "transformer_lens": version("transformer_lens"),
                     "transformers": version("transformers"), "python": sys.version.split()[0]},
    }, args.out)


# ---------------------------------------------------------------------------------------------------------
# main: runs in the project venv
# ---------------------------------------------------------------------------------------------------------

def reference_to_harness(ref: torch.Tensor, n_layers: int, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """Reference scores [senders, L (3H + 1) + 1] on the harness's receivers [senders, L (H + 2G + 1) + 1]:
    q, MLP and logits columns copied; the per-query-head k and v columns summed within each key/value group."""
    per_group = n_heads // n_kv_heads
    cols: list[torch.Tensor] = []
    for layer in range(n_layers):
        base = layer * (3 * n_heads + 1)
        q, k, v = (ref[:, base + i * n_heads: base + (i + 1) * n_heads] for i in range(3))
        cols += [q, k.reshape(ref.shape[0], n_kv_heads, per_group).sum(-1),
                 v.reshape(ref.shape[0], n_kv_heads, per_group).sum(-1), ref[:, base + 3 * n_heads, None]]
    cols.append(ref[:, -1:])
    return torch.cat(cols, dim=1)


def one_to_one_receivers(n_layers: int, n_heads: int, n_kv_heads: int) -> torch.Tensor:
    """[n_receivers] bool: receivers with one counterpart in the reference (q, MLP input, logits)."""
    per_layer = n_heads + 2 * n_kv_heads + 1
    keep = torch.zeros(n_layers * per_layer + 1, dtype=torch.bool)
    if n_kv_heads == n_heads:  # the ungrouped graph: every receiver is the reference's own
        return ~keep
    for layer in range(n_layers):
        keep[layer * per_layer: layer * per_layer + n_heads] = True
        keep[layer * per_layer + per_layer - 1] = True
    keep[-1] = True
    return keep


def compare(ours: torch.Tensor, ref: torch.Tensor, top: tuple[int, ...] = (100, 1000)) -> dict[str, Any]:
    """Agreement of two score vectors over the same edges."""
    from scipy.stats import pearsonr, spearmanr

    a, b = ours.double().numpy(), ref.double().numpy()
    result: dict[str, Any] = {
        "n_edges": int(a.size),
        "spearman": float(spearmanr(a, b).statistic),
        "spearman_abs": float(spearmanr(abs(a), abs(b)).statistic),
        "pearson": float(pearsonr(a, b).statistic),
        "max_abs_diff": float((ours - ref).abs().max()),
        "max_abs_score": float(ref.abs().max()),
        "sign_agreement": float(((ours > 0) == (ref > 0)).double().mean()),
    }
    for k in (k for k in top if k < a.size):  # a tiny model's graph may have fewer edges
        mine = set(ours.abs().topk(k).indices.tolist())
        theirs = set(ref.abs().topk(k).indices.tolist())
        result[f"top{k}_overlap"] = len(mine & theirs) / k
    return result


def load_relation_batch() -> Callable[..., Any]:
    """benchmarks/circuits.py's relation_batch (the same batch as the circuit benchmark)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_circuits_benchmark", REPO / "benchmarks" / "circuits.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.relation_batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ref-python", required=True, help="python of the reference venv")
    parser.add_argument("--ref-src", required=True, help="folder holding the reference package `eap` (EAP-IG/src)")
    parser.add_argument("--ref-label", default="hannamw/EAP-IG@795f560")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--relation", default="country_capital_city")
    parser.add_argument("--n", type=int, default=32)
    parser.add_argument("--all-facts", action="store_true",
                        help="use facts the model does not know (a tiny random model knows none)")
    parser.add_argument("--steps", type=int, default=5, help="EAP-IG steps m")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default="/tmp/reference_eapig")
    parser.add_argument("--json", default=None)
    parser.add_argument("--graph", choices=["ungrouped", "grouped"], default="ungrouped",
                        help="the harness's graph: ungrouped maps 1:1 onto the reference's; grouped sums its k/v")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(REPO))
    from circuits.attribute import eap_ig_scores, eap_scores
    from circuits.graph import Graph
    from lmview.io import write_json
    from lmview.models import load_model

    bundle = load_model(args.model, "cpu")
    batch, info = load_relation_batch()(bundle, args.relation, args.n, args.seed, not args.all_facts)
    arch, bridge = bundle.arch, bundle.bridge()
    graph = Graph.of(arch, args.graph)
    kv = graph.n_kv_heads  # k/v receivers per layer: n_heads (ungrouped, as the reference) or the model's groups
    rows = torch.arange(batch.clean_ids.shape[0])
    with torch.no_grad():
        logits = bundle.model(input_ids=batch.clean_ids, attention_mask=batch.attention_mask).logits
        hf_logits = logits[rows, batch.answer_pos]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    torch.save({"clean_ids": batch.clean_ids, "corrupt_ids": batch.corrupt_ids, "attention_mask": batch.attention_mask,
                "answer_ids": batch.answer_ids, "answer_pos": batch.answer_pos, "hf_logits": hf_logits.float()},
               work / "batch.pt")
    (work / "batch.json").write_text(json.dumps({
        "clean_ids": batch.clean_ids.tolist(), "corrupt_ids": batch.corrupt_ids.tolist(),
        "attention_mask": batch.attention_mask.tolist(), "answer_ids": batch.answer_ids.tolist(),
        "answer_pos": batch.answer_pos.tolist(), "info": info}) + "\n")

    runs = {"eap": lambda: eap_scores(bridge, bundle.model, arch, graph, batch),
            "eap_ig": lambda: eap_ig_scores(bridge, bundle.model, arch, graph, batch, steps=args.steps)}
    ours, ours_wall, ours_cpu = repeat_timings(runs, args.repeats)
    load_before = os.getloadavg()

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
    cmd = [args.ref_python, str(Path(__file__).resolve()), "worker", "--ref-src", args.ref_src,
           "--hf-dir", str(bundle.path), "--batch", str(work / "batch.pt"), "--out", str(work / "reference.pt"),
           "--steps", str(args.steps), "--repeats", str(args.repeats), "--threads", str(args.threads)]
    subprocess.run(cmd, check=True, env=env)
    ref = torch.load(work / "reference.pt")

    edges = graph.edge_mask
    one = edges & one_to_one_receivers(arch.n_layers, arch.n_heads, kv)[None, :]
    ref_edges = reference_to_harness(ref["real_edge_mask"].float(), arch.n_layers, arch.n_heads, kv) > 0
    comparison: dict[str, Any] = {}
    for name, ours_name in (*((m, m) for m in METHODS), ("eap_ig_same_points", "eap_ig")):
        mapped = reference_to_harness(ref["scores"][name], arch.n_layers, arch.n_heads, kv)
        comparison[name] = {"all_edges" if kv == arch.n_heads else "all_edges_kv_summed":
                            compare(ours[ours_name][edges], mapped[edges]),
                            "one_to_one_edges": compare(ours[ours_name][one], mapped[one])}

    def summary(times: dict[str, list[float]]) -> dict[str, Any]:
        return {name: {"median": statistics.median(t), "all": t} for name, t in times.items()}

    results = {
        "command": f"OMP_NUM_THREADS={args.threads} .venv/bin/python " + " ".join(
            [Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "reference": args.ref_label, "model": args.model, "device": "cpu", "data": info,
        "batch_shape": list(batch.clean_ids.shape), "ig_steps": args.steps, "repeats": args.repeats,
        "metric": "log p(answer's first token) at the last real position, summed over prompts",
        "ablation": "corrupted input (activation patching)",
        "graph": {"kind": graph.kind, "harness_edges": graph.n_edges, "reference_edges": ref["n_edges"],
                  "one_to_one_edges": int(one.sum()),
                  "edge_sets_match_after_kv_grouping": bool(torch.equal(ref_edges, edges)),
                  "kv_mapping": ("none: the same receivers (one k and one v per query head)" if kv == arch.n_heads
                                 else "reference k/v scores of the query heads of one key/value group summed")},
        "logit_check": ref["logit_check"],
        "comparison": comparison,
        "wall_seconds": {"harness": summary(ours_wall), "reference": summary(ref["wall"])},
        "cpu_seconds": {"harness": summary(ours_cpu), "reference": summary(ref["cpu"])},
        "speedup_wall_median": {name: statistics.median(ref["wall"][name]) / statistics.median(ours_wall[name])
                                for name in METHODS},
        "threads": {"harness": torch.get_num_threads(), "reference": ref["threads"]},
        "versions": {"harness": {"torch": torch.__version__, "python": sys.version.split()[0]},
                     "reference": ref["versions"]},
        "loadavg_after_harness_runs": list(load_before), "loadavg_at_end": list(os.getloadavg()),
        "cpu_count": os.cpu_count(),
        "notes": [
            "EAP-IG: the reference interpolates the input at k/m for k = 0..m-1, the harness at k = 1..m. "
            "comparison.eap_ig_same_points is the reference run once more (untimed) with the clean and corrupted "
            "prompts swapped and its scores negated, which puts its step points at k = 1..m.",
            "The reference's scores are multiplied by the number of prompts (it averages, the harness sums).",
            "Timings: harness first (warm-up + interleaved repeats), then the reference in its own process.",
        ],
    }
    print(json.dumps(results, indent=2))
    if args.json:
        write_json(args.json, results)


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "worker":
        worker(sys.argv[2:])
    else:
        main()
