"""One small end-to-end run on the real offline model (SmolLM2-135M-Instruct, Q4_1 GGUF from PyPI)."""

from __future__ import annotations

import json

import pytest
import yaml

from bench.cli import main
from tests.helpers import REPO_ROOT

pytestmark = pytest.mark.slow


def test_rome_on_smollm2_end_to_end(tmp_path, device):
    hparams = yaml.safe_load((REPO_ROOT / "editors" / "hparams" / "rome" / "smollm2-135m.yaml").read_text())
    hparams["mom2_n_samples"] = 100  # a small key-statistics sample keeps the test to minutes
    hp = tmp_path / "rome.yaml"
    hp.write_text(yaml.safe_dump(hparams))
    out = tmp_path / "runs"
    code = main(["run", "--editor", "rome", "--n", "2", "--known-only", "--output", str(out), "--hparams", str(hp),
                 "--device", device])
    assert code == 0
    (run_dir,) = out.iterdir()
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert "Q4_1" in manifest["model"]["quantization"] and "Instruct" in manifest["model"]["variant"]
    assert manifest["model"]["wheel_sha256"].startswith("bcc81830")
    assert manifest["cases"]["kept"] == 2
    cases = [json.loads(line) for line in (run_dir / "cases.jsonl").read_text().splitlines()]
    assert all(c["status"] == "ok" for c in cases)
    # known facts: the model preferred the true answer before the edit, and ROME flips it
    assert all(c["pre"]["efficacy_score"] == 0.0 for c in cases)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["efficacy_score"] == 1.0
    assert 0.0 <= summary["circuit_edge_jaccard"] <= 1.0
    # a 300-edge circuit (pruned) of the 123,211-edge ungrouped graph recovers part of the clean-corrupted gap
    assert 0.0 < summary["circuit_faithfulness_pre"] < 1.5
