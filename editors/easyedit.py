"""EasyEdit as a reference: the editors of the 2023 snapshot `easyeditor==0.0.1.dev0` behind our interface.

`easyedit:rome`, `easyedit:memit`, `easyedit:ft` and `easyedit:kn` call EasyEdit's own
`apply_<method>_to_model` on our Hugging Face model and tokenizer, in place, so `bench run` scores them
exactly like the native editors. The registry (editors/base.py) always lists them; while the package or a
module its editors import is missing they are listed as not installed, and `--editor easyedit:...` says how
to install them.
EasyEdit's IKE (sentence-transformers retrieval over a downloaded zsRE embedding set), LoRA (peft),
MEND and SERAC (trained hypernetworks / classifiers) need downloads or training and are not offered.

Loading without EasyEdit's `__init__`. The package's top-level `__init__` (and `models/__init__`)
import all of EasyEdit: datasets, trainers, BLIP-2 multimodal code, each with 2023 pins. We never
execute them. `importlib.util.find_spec("easyeditor")` locates the package directory without running
it; the directory is mounted under the private name `_kebench_easyeditor`, whose root, `models` and
`util` packages are empty module objects with the real directories as `__path__`. Importing
`_kebench_easyeditor.models.rome` then runs only `models/rome/__init__.py` and what it imports
relatively. A meta-path finder that answers for that private name alone compiles each source with one
textual change: the hard-coded device `f"cuda:{hparams.device}"` becomes `str(hparams.device)`, and
we pass "cpu" or "cuda:0". Its code objects are built in memory (no `__pycache__` writes), and an
ordinary `import easyeditor` elsewhere gets its own unmodified modules.

What we hand to EasyEdit, per call (all undone afterwards):
- hyperparameters: the native method's YAML (`editors/hparams/<method>/...`, the same file as the
  native editor), translated by editors/_easyedit_hparams.py; module templates come from the model
  family. `--hparams` also takes EasyEdit's own YAML files for the method.
- covariance: EasyEdit's `layer_stats` (which would download Hugging Face `wikipedia`) is replaced in
  the ROME and MEMIT modules by our cached C = E[kkᵀ] (editors/keystats.py, float64), so both sides
  use the same C. EasyEdit's module-level caches of C and C⁻¹ are swapped for per-editor dicts.
- context templates: EasyEdit caches them in a module global across models. With
  `context_templates: easyedit` (the default) they are EasyEdit's own sampler's output under a fixed
  seed, computed once per editor; with `native` they are our ROME's prefixes (editors/rome.py), which is
  how the cross-check tests share them.
- `requires_grad` flags are restored (EasyEdit's FT leaves the edited weights trainable); its prints go
  to the `bench` logger at debug level.
- MEMIT's compute_z sees decoder-block outputs as 1-tuples (`tuple_block_nethook`): it was written for
  blocks returning (hidden, ...), and transformers >= 4.54 blocks return the tensor.

Known behaviours of the snapshot that we keep (the reference is run as shipped): its MEMIT always uses C
(it ignores `mom2_adjustment`); its FT matches parameters by substring (the GPT-2 bias is tuned too)
and scores every target token at the last prompt position; its KN tokenizes answers as given, so we
pass them with their leading space, as they follow the prompt.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import io
import logging
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import torch

from editors._easyedit_hparams import to_easyedit
from editors.base import EASYEDIT, EASYEDIT_INSTALL, EditOutcome, Editor, EditorError
from editors.ft import FineTuneLHparams
from editors.keystats import second_moment
from editors.kn import KnHparams
from editors.memit import MemitHparams
from editors.rome import RomeHparams
from editors.settings import Hparams, setting

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

log = logging.getLogger("bench")

INSTALL = EASYEDIT_INSTALL
ALIAS = "_kebench_easyeditor"
STUB_PACKAGES = ("", "models", "util")
DEVICE_LITERAL = re.compile(r"""f(["'])cuda:\{hparams\.device\}\1""")
CONTEXT_SEED = 1234
# third-party modules the offered methods import (beyond torch, transformers, yaml, tqdm, matplotlib)
NEEDS = {method: needs for method, (_cls, needs) in EASYEDIT.items()}


# --- loading --------------------------------------------------------------------------------------------

class _DeviceRewritingLoader(importlib.machinery.SourceFileLoader):
    """Compiles EasyEdit sources with the CUDA-only device literal made generic; never writes bytecode."""

    def get_code(self, fullname: str) -> types.CodeType:
        source = Path(self.path).read_text(encoding="utf-8")
        return compile(DEVICE_LITERAL.sub("str(hparams.device)", source), self.path, "exec", dont_inherit=True)


class _AliasFinder(importlib.abc.MetaPathFinder):
    """Finds submodules of the private alias in the real package directories, with the loader above."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if not fullname.startswith(ALIAS + "."):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and isinstance(spec.loader, importlib.machinery.SourceFileLoader):
            spec.loader = _DeviceRewritingLoader(fullname, spec.origin)
        return spec


def package_dir() -> Path | None:
    """easyeditor's directory, found without importing it; None when not installed."""
    try:
        spec = importlib.util.find_spec("easyeditor")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


def missing_requirements(method: str) -> list[str]:
    names = ["easyeditor"] if package_dir() is None else []
    return names + [m for m in NEEDS[method] if importlib.util.find_spec(m) is None]


def _mount(root: Path) -> None:
    if ALIAS in sys.modules:
        return
    if not any(isinstance(f, _AliasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _AliasFinder())
    for sub in STUB_PACKAGES:
        name = f"{ALIAS}.{sub}" if sub else ALIAS
        module = types.ModuleType(name)
        module.__path__ = [str(root / sub) if sub else str(root)]
        module.__package__ = name
        module.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
        module.__spec__.submodule_search_locations = module.__path__
        sys.modules[name] = module


def load(module: str) -> types.ModuleType:
    """One EasyEdit module by its path inside the package, e.g. 'models.rome.rome_main'."""
    root = package_dir()
    if root is None:
        raise EditorError(f"the EasyEdit reference is not installed; run: {INSTALL}")
    _mount(root)
    try:
        return importlib.import_module(f"{ALIAS}.{module}")
    except ImportError as exc:
        raise EditorError(f"EasyEdit module {module} cannot be imported ({exc}); run: {INSTALL}") from None


# --- shared machinery --------------------------------------------------------------------------------

class _SecondMoment:
    """Stands in for the runningstats object EasyEdit's layer_stats returns: `.mom2.moment()` is C."""

    def __init__(self, c: torch.Tensor):
        self.mom2 = SimpleNamespace(moment=lambda: c)


@contextlib.contextmanager
def _patched(module: types.ModuleType, **values: Any):
    saved = {name: getattr(module, name) for name in values}
    for name, value in values.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


def tuple_block_nethook(nethook: types.ModuleType, block_names: set[str]) -> types.ModuleType:
    """EasyEdit's nethook with a TraceDict that shows decoder-block outputs as 1-tuples.

    MEMIT's compute_z (2023) indexes a block's output as `out[0][row, pos]`, written for blocks that
    returned (hidden, ...). Blocks of transformers >= 4.54 return the hidden tensor itself, where
    `out[0]` silently picks the first row. This TraceDict wraps a tensor block output into (tensor,)
    for the edit function and for the retained `.output`, and unwraps the edited result.
    """

    class TupleBlockTraceDict(nethook.TraceDict):
        def __init__(self, module: Any, layers: Any = None, *args: Any, edit_output: Any = None, **kwargs: Any):
            if edit_output is not None:
                inner = edit_output

                def edit_output(output: Any, layer: str) -> Any:
                    if layer in block_names and isinstance(output, torch.Tensor):
                        return inner((output,), layer)[0]
                    return inner(output, layer)
            super().__init__(module, layers, *args, edit_output=edit_output, **kwargs)

        def __getitem__(self, layer: str) -> Any:
            trace = super().__getitem__(layer)
            output = getattr(trace, "output", None)
            if layer in block_names and isinstance(output, torch.Tensor):
                return SimpleNamespace(output=(output,), input=getattr(trace, "input", None))
            return trace

    proxy = types.ModuleType(nethook.__name__)
    proxy.__dict__.update(nethook.__dict__)
    proxy.TraceDict = TupleBlockTraceDict
    return proxy


@dataclass(frozen=True)
class ReferenceHparams(Hparams):
    """What every reference editor adds to its native method's keys."""

    context_templates: str = setting("easyedit", choices=("easyedit", "native"),
                                     doc="EasyEdit's context-template sampler, or our ROME's prefixes")


def _reference(native: type[Hparams], editor: str) -> type[Hparams]:
    """The native method's dataclass plus `context_templates`, for the reference editor `editor`."""
    bases = (native, ReferenceHparams)
    return dataclass(frozen=True)(type(f"EasyEdit{native.__name__}", bases, {"editor": editor, "__module__": __name__}))


EasyEditRomeHparams = _reference(RomeHparams, "easyedit:rome")
EasyEditMemitHparams = _reference(MemitHparams, "easyedit:memit")
EasyEditFtHparams = _reference(FineTuneLHparams, "easyedit:ft")
EasyEditKnHparams = _reference(KnHparams, "easyedit:kn")


class EasyEditEditor(Editor):
    """Common ground: hparams dataclass, covariance injection, quiet calls, restored grad flags."""

    method: ClassVar[str] = ""
    alg_name: ClassVar[str] = ""
    native_length_params: ClassVar[list[list[int]] | None] = None  # the native editor's default prefixes
    hparams_class: ClassVar[tuple[str, str]] = ("", "")  # (module, class name)

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        module, cls_name = self.hparams_class
        fields = to_easyedit(
            self.alg_name, hparams, family=bundle.arch.family, n_layers=bundle.arch.n_layers,
            parameter_names={n for n, _ in bundle.model.named_parameters()}, model_name=bundle.name,
            device=str(bundle.device if bundle.device.type == "cpu" else torch.device("cuda", bundle.device.index or 0)),
        )
        try:
            self.ee_hparams = getattr(load(module), cls_name)(**fields)
        except TypeError as exc:
            raise EditorError(f"{self.name}: EasyEdit rejected the hyperparameters: {exc}") from None
        self._covariances: dict[int, torch.Tensor] = {}
        self._inverse_cache: dict[Any, torch.Tensor] = {}
        self._cov_cache: dict[Any, torch.Tensor] = {}

    # -- ingredients --
    def layers(self) -> list[int]:
        return [int(x) for x in self.hparams.get("layers", [])]

    def covariance(self, layer: int) -> torch.Tensor:
        """Our C at `layer` in float64, the same matrix the native editors use."""
        if layer not in self._covariances:
            hp = self.hparams
            self._covariances[layer] = second_moment(
                self.bundle, layer, corpus=str(hp.get("mom2_dataset", "wikipedia")),
                n_samples=int(hp.get("mom2_n_samples", 1000)), max_len=int(hp.get("mom2_max_len", 128)),
            ).double()
        return self._covariances[layer]

    def layer_stats(self) -> Callable[..., _SecondMoment]:
        """A replacement for EasyEdit's layer_stats that returns our C for the layer it names."""
        names = {self.ee_hparams.rewrite_module_tmp.format(layer): layer for layer in self.layers()}

        def layer_stats(_model: Any, _tok: Any, layer_name: str, *_args: Any, **_kwargs: Any) -> _SecondMoment:
            if layer_name not in names:
                raise EditorError(f"{self.name}: EasyEdit asked for statistics of unknown module {layer_name}")
            return _SecondMoment(self.covariance(names[layer_name]))

        return layer_stats

    def request(self, case: EditCase, template: bool) -> dict[str, str]:
        """EasyEdit's request dict; `template` keeps '{}' in the prompt (ROME, MEMIT) instead of the subject."""
        return {"prompt": case.prompt if template else case.rewrite_prompt, "subject": case.subject,
                "target_new": case.target_new.strip(), "ground_truth": case.target_true.strip(),
                "case_id": case.case_id}

    def context_prefixes(self, sample: Callable[[], list[str]]) -> list[str]:
        """Context templates ('... {}'): EasyEdit's sampler under a fixed seed, or our ROME's prefixes."""
        if self.hp.context_templates == "native":
            from editors._locate import context_prefixes
            params = self.hparams.get("context_template_length_params", self.native_length_params)
            return [p + "{}" for p in context_prefixes(self.bundle, params)]
        devices = [self.bundle.device.index or 0] if self.bundle.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(CONTEXT_SEED)
            return self.quiet(sample)

    def quiet(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """Calls EasyEdit with its prints sent to the debug log and the model's grad flags restored."""
        flags = [(p, p.requires_grad) for p in self.bundle.model.parameters()]
        out = io.StringIO()
        try:
            with contextlib.redirect_stdout(out):
                return fn(*args, **kwargs)
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)
                p.grad = None
            if out.getvalue():
                log.debug("%s: %s", self.name, out.getvalue().strip()[-2000:])

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.ee_hparams.rewrite_module_tmp.format(layer) + ".weight" for layer in self.layers()]

    def outcome(self, before: dict[str, torch.Tensor], cases: list[EditCase], **stats: Any) -> EditOutcome:
        """The update norm of every touched tensor; `layers` are those of the tensors that changed."""
        params = dict(self.bundle.model.named_parameters())
        norms = torch.stack([(params[n].detach().float() - w).norm() for n, w in before.items()])
        values = norms.tolist()  # the one host sync
        stats.update({f"update_norm.{n}": v for n, v in zip(before, values)}, n_cases=len(cases))
        changed = {name for name, v in zip(before, values) if v != 0}
        layers = [layer for layer in self.layers()
                  if any(name.startswith(self.layer_prefix(layer)) for name in changed)]
        return EditOutcome(layers=layers, stats=stats)

    def layer_prefix(self, layer: int) -> str:
        return self.bundle.arch.mlp_out_weight_name(layer).rsplit(".", 1)[0]

    def snapshot(self, cases: list[EditCase]) -> dict[str, torch.Tensor]:
        params = dict(self.bundle.model.named_parameters())
        return {n: params[n].detach().float().clone() for n in self.parameters_to_touch(cases)}


# --- the editors ---------------------------------------------------------------------------------------

class EasyEditRome(EasyEditEditor, hparams=EasyEditRomeHparams):
    """EasyEdit's ROME, one case after the other (its apply_rome_to_model takes one request)."""

    method, alg_name = "rome", "ROME"
    hparams_class = ("models.rome.rome_hparams", "ROMEHyperParams")

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.main = load("models.rome.rome_main")
        self.compute_u = load("models.rome.compute_u")
        self._templates: list[str] | None = None

    def templates(self) -> list[str]:
        if self._templates is None:
            def sample() -> list[str]:
                # EasyEdit draws n // 5 texts per seed word; an all-empty plan would crash its tokenizer call
                plan = [[length, n] for length, n in self.ee_hparams.context_template_length_params if n // 5]
                if not plan:
                    return ["{}"]
                with _patched(self.main, CONTEXT_TEMPLATES_CACHE=None):
                    return self.main.get_context_templates(self.bundle.model, self.bundle.tokenizer, plan)
            self._templates = self.context_prefixes(sample)
        return self._templates

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        before = self.snapshot(cases)
        with _patched(self.main, CONTEXT_TEMPLATES_CACHE=self.templates()), \
                _patched(self.compute_u, layer_stats=self.layer_stats(), inv_mom2_cache=self._inverse_cache):
            for case in cases:
                self.quiet(self.main.apply_rome_to_model, self.bundle.model, self.bundle.tokenizer,
                           [self.request(case, template=True)], self.ee_hparams)
        return self.outcome(before, cases)


class EasyEditMemit(EasyEditEditor, hparams=EasyEditMemitHparams):
    """EasyEdit's MEMIT, the whole batch in one update."""

    method, alg_name = "memit", "MEMIT"
    batched = True
    native_length_params = [[10, 5]]
    hparams_class = ("models.memit.memit_hparams", "MEMITHyperParams")

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.main = load("models.memit.memit_main")
        self.compute_z = load("models.memit.compute_z")
        blocks = {self.ee_hparams.layer_module_tmp.format(layer) for layer in range(bundle.arch.n_layers)}
        self._nethook = tuple_block_nethook(self.compute_z.nethook, blocks)
        self._templates: list[list[str]] | None = None

    def templates(self) -> list[list[str]]:
        """MEMIT's nested form: [["{}"], [the sampled prefixes]]; its keys average each group, then the groups."""
        if self._templates is None:
            def sample() -> list[str]:
                with _patched(self.main, CONTEXT_TEMPLATES_CACHE=None):
                    nested = self.main.get_context_templates(self.bundle.model, self.bundle.tokenizer)
                return [t for group in nested for t in group]
            sampled = [t for t in self.context_prefixes(sample) if t != "{}"]
            self._templates = [["{}"], sampled] if sampled else [["{}"]]  # an empty group would average to NaN
        return self._templates

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        before = self.snapshot(cases)
        with _patched(self.main, CONTEXT_TEMPLATES_CACHE=self.templates(), layer_stats=self.layer_stats(),
                      COV_CACHE=self._cov_cache), _patched(self.compute_z, nethook=self._nethook):
            self.quiet(self.main.apply_memit_to_model, self.bundle.model, self.bundle.tokenizer,
                       [self.request(case, template=True) for case in cases], self.ee_hparams)
        return self.outcome(before, cases)


class EasyEditFt(EasyEditEditor, hparams=EasyEditFtHparams):
    """EasyEdit's FT (constrained fine-tuning, FT-L): all cases of the batch fitted together.

    It matches parameters by substring: with the default template the MLP output projection's bias is
    fine-tuned too (GPT-2), so it is backed up as well.
    """

    method, alg_name = "ft", "FT"
    batched = True
    hparams_class = ("models.ft.ft_hparams", "FTHyperParams")

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.main = load("models.ft.ft_main")

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        patterns = [self.ee_hparams.rewrite_module_tmp.format(layer) for layer in self.layers()]
        return [n for n, _ in self.bundle.model.named_parameters() if any(p in n for p in patterns)]

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        before = self.snapshot(cases)
        self.quiet(self.main.apply_ft_to_model, self.bundle.model, self.bundle.tokenizer,
                   [self.request(case, template=False) for case in cases], self.ee_hparams)
        return self.outcome(before, cases)


class EasyEditKn(EasyEditEditor, hparams=EasyEditKnHparams):
    """EasyEdit's Knowledge Neurons: attribution on the rewrite prompt, then the value-slot edit."""

    method, alg_name = "kn", "KN"
    hparams_class = ("models.kn.kn_hparams", "KNHyperParams")
    MODEL_TYPES = {"gpt2": "gpt2", "llama": "llama"}

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        super().__init__(bundle, hparams)
        self.main = load("models.kn.kn_main")
        self.model_type = self.MODEL_TYPES[bundle.arch.family]

    def layers(self) -> list[int]:
        return list(range(self.bundle.arch.n_layers))  # KN attributes every layer

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        return [self.bundle.arch.mlp_out_weight_name(layer) for layer in self.layers()]

    def request(self, case: EditCase, template: bool) -> dict[str, str]:
        """EasyEdit's KN tokenizes the answers as given: with the leading space they have after a prompt."""
        return {**super().request(case, template), "target_new": " " + case.target_new.strip(),
                "ground_truth": " " + case.target_true.strip()}

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        before = self.snapshot(cases)
        with _patched(self.main, model_type=lambda _name: self.model_type):
            for case in cases:
                self.quiet(self.main.apply_kn_to_model, self.bundle.model, self.bundle.tokenizer,
                           [self.request(case, template=False)], self.ee_hparams)
        return self.outcome(before, cases)

