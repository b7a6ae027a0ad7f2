"""The editor interface, the registry, and hyperparameter lookup.

An editor is one module in `editors/` that defines a subclass of `Editor` with its `name` and its
hyperparameter dataclass (`HPARAMS`), one line in `NATIVE` below, and YAML hyperparameters in
`editors/hparams/<name>/<model-or-family>.yaml`. The registry imports an editor's module on first use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from editors.errors import EditorError
from editors.settings import Hparams
from lmview.io import read_yaml_mapping
from lmview.paths import REPO_ROOT
from lmview.registry import Lazy, Registry, UnknownChoice

if TYPE_CHECKING:
    from lmview.case import EditCase
    from lmview.models import ModelBundle

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams"
HPARAMS_FOLDERS = {"ft": "ft-l"}  # `easyedit:ft` (EasyEdit's FT, prompt_last objective) reads FT-L's files


@dataclass
class EditOutcome:
    """What an editor reports about one application."""

    layers: list[int]  # the layers whose MLP it rewrote
    stats: dict[str, Any] = field(default_factory=dict)


def per_case_outcome(layer: int, per_case: list[dict[str, float]], **extra: Any) -> EditOutcome:
    """The outcome of cases edited one at a time at one layer: each statistic's mean over the cases, then
    `extra`."""
    means = {k: sum(s[k] for s in per_case) / len(per_case) for k in per_case[0]} if per_case else {}
    return EditOutcome(layers=[layer], stats={**means, **extra})


class Editor:
    """Changes the HF model's weights in place so that the cases' prompts yield target_new."""

    name: ClassVar[str] = ""
    batched: ClassVar[bool] = False  # True: apply() takes a whole --batch-size batch in one update
    HPARAMS: ClassVar[type[Hparams]] = Hparams  # the editor's hyperparameters: keys, types, defaults, units
    hp: Hparams

    def __init_subclass__(cls, hparams: type[Hparams] | None = None, **kwargs: Any) -> None:
        """`class Rome(Editor, hparams=RomeHparams)`: the dataclass, and the editor's name from it."""
        super().__init_subclass__(**kwargs)
        if hparams is not None:
            cls.HPARAMS, cls.name = hparams, hparams.editor

    def __init__(self, bundle: ModelBundle, hparams: dict[str, Any]):
        """`hparams` as given (a file's mapping) is checked into `self.hp`; `self.hparams`, a copy of it plus what
        the editor records about itself (the key-statistics sample), is what the run manifest writes."""
        self.bundle = bundle
        self.hp = self.HPARAMS.from_mapping(hparams, n_layers=bundle.arch.n_layers)
        self.hparams = dict(hparams)

    def parameters_to_touch(self, cases: list[EditCase]) -> list[str]:
        """Names (as in model.named_parameters) of every tensor `apply` may modify, for backup and restore."""
        raise NotImplementedError

    def apply(self, cases: list[EditCase]) -> EditOutcome:
        raise NotImplementedError

    def observe_dataset(self, cases: list[EditCase]) -> None:
        """Sees every loaded case of the run's dataset once, before any edit (IKE's demonstration pool)."""

    def evaluation_case(self, case: EditCase) -> EditCase:
        """The case as the edited model is scored on it; in-context editors prepend their demonstrations."""
        return case

    def undo(self) -> None:
        """Removes state outside the backed-up parameters (hooks, codebooks); called after the weights are restored."""


EDITORS: Registry[type[Editor]] = Registry("editor")
NATIVE = {  # name -> where its class lives
    "rome": "editors.rome:Rome", "r-rome": "editors.r_rome:RRome", "memit": "editors.memit:Memit",
    "encore": "editors.encore:Encore", "ultraedit": "editors.ultraedit:UltraEdit",
    "emmet": "editors.emmet:Emmet", "alphaedit": "editors.alphaedit:AlphaEdit", "ft-l": "editors.ft:FineTuneL",
    "ft-m": "editors.ft_m:FineTuneM", "grace": "editors.grace:Grace", "kn": "editors.kn:KnowledgeNeurons",
    "ike": "editors.ike:InContextEditor", "wise": "editors.wise:Wise",
}
# the EasyEdit reference editors (editors/easyedit.py): optional, with what each needs beyond the harness
EASYEDIT_INSTALL = "pip install --no-deps easyeditor==0.0.1.dev0 && pip install -e '.[easyedit]'"
EASYEDIT = {"rome": ("EasyEditRome", ("numpy", "datasets")), "memit": ("EasyEditMemit", ("numpy", "datasets")),
            "ft": ("EasyEditFt", ()), "kn": ("EasyEditKn", ("numpy", "einops"))}
for _name, _path in NATIVE.items():
    EDITORS.add(_name, Lazy(_path))
for _method, (_cls, _needs) in EASYEDIT.items():
    EDITORS.add(f"easyedit:{_method}", Lazy(f"editors.easyedit:{_cls}"), f"EasyEdit's {_method} (reference)",
                requires=("easyeditor", *_needs), install=EASYEDIT_INSTALL)


def register(name: str):
    """Registers an editor class defined elsewhere (tests, plugins) under `name`."""
    def wrap(cls: type[Editor]) -> type[Editor]:
        cls.name = name
        EDITORS.add(name, cls)
        return cls

    return wrap


def registry() -> dict[str, type[Editor]]:
    """Every installed editor by name, imported."""
    return {name: EDITORS.get(name) for name in EDITORS.names()}


def get_editor(name: str) -> type[Editor]:
    try:
        return EDITORS.get(name)
    except UnknownChoice as exc:
        raise EditorError(str(exc)) from None


def hparams_candidates(editor: str, model_name: str, family: str) -> list[Path]:
    """Lookup order: exact model name (last path part, lower case), then the architecture family.

    A namespaced editor 'easyedit:rome' reads the files of the method after the colon ('rome').
    """
    stem = model_name.rstrip("/").split("/")[-1].lower()
    method = editor.split(":")[-1]
    folder = HPARAMS_DIR / HPARAMS_FOLDERS.get(method, method)
    return [folder / f"{stem}.yaml", folder / f"{family}.yaml"]


def load_hparams(editor: str, model_name: str, family: str, override: str | None = None,
                 n_layers: int | None = None) -> tuple[dict[str, Any], str]:
    """Returns (hparams, the file they came from), checked against the editor's hyperparameter dataclass
    (unknown keys, types, ranges; layers against `n_layers` when given)."""
    if override:
        path = Path(override)
        if not path.exists():
            raise EditorError(f"hparams file '{override}' does not exist")
    else:
        found = [p for p in hparams_candidates(editor, model_name, family) if p.exists()]
        if not found:
            tried = ", ".join(str(p.relative_to(HPARAMS_DIR.parent.parent)) for p in hparams_candidates(editor, model_name, family))
            raise EditorError(f"no hyperparameters for editor '{editor}' on '{model_name}'; tried {tried}")
        path = found[0]
    data = read_yaml_mapping(path, EditorError, "a mapping of hyperparameters")
    if "alg_name" in data:  # an EasyEdit hyperparameter file
        from editors._easyedit_hparams import from_easyedit
        data = from_easyedit(data, editor, family, str(path))
    get_editor(editor).HPARAMS.from_mapping(data, source=shown_path(path), n_layers=n_layers)
    return data, str(path)


def shown_path(path: str | Path) -> str:
    """A path relative to the repository when it lies inside it."""
    resolved = Path(path).resolve()
    return str(resolved.relative_to(REPO_ROOT)) if resolved.is_relative_to(REPO_ROOT) else str(path)
