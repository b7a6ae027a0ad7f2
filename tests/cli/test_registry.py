"""One `Registry` (lmview/registry.py) behind editors, datasets, models and CLI commands: lazy entries, optional
entries listed as not installed with their install command, and one line naming the valid choices on a miss."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from bench.cli import COMMANDS, main
from bench.data import DATASETS
from editors.base import EDITORS, NATIVE
from lmview.models import MODELS
from lmview.registry import Lazy, Registry, UnknownChoice


def test_lazy_entries_import_on_first_use(monkeypatch):
    monkeypatch.delitem(sys.modules, "colorsys", raising=False)
    reg: Registry = Registry("thing")
    reg.add("hls", Lazy("colorsys:rgb_to_hls"), "a function of a module not yet imported")
    assert reg.names() == ["hls"] and "colorsys" not in sys.modules  # listing imports nothing
    fn = reg.get("hls")
    assert "colorsys" in sys.modules and fn(1.0, 0.0, 0.0) == (0.0, 0.5, 1.0)
    assert reg.get("hls") is fn


def test_a_miss_names_the_valid_choices():
    reg: Registry = Registry("colour")
    for name in ("red", "blue"):
        reg.add(name, name.upper())
    with pytest.raises(UnknownChoice, match=r"^unknown colour 'green'; valid: blue, red$"):
        reg.get("green")


def test_an_optional_entry_without_its_module_is_listed_but_not_installed():
    reg: Registry = Registry("editor")
    reg.add("plain", object())
    reg.add("fancy", Lazy("no_such_module_xyz:Thing"), "needs an extra", requires=("no_such_module_xyz",),
            install="pip install fancy")
    assert reg.names() == ["plain"] and reg.names(installed_only=False) == ["fancy", "plain"]
    fancy = reg.entry("fancy")
    assert not fancy.installed and fancy.missing() == ["no_such_module_xyz"]
    with pytest.raises(UnknownChoice, match=r"^editor 'fancy' is not installed: needs no_such_module_xyz; "
                                            r"install with: pip install fancy$"):
        reg.get("fancy")


def test_discovery_runs_once_before_the_first_lookup():
    calls = []

    def discover(reg):
        calls.append(1)
        reg.add("found", 42)

    reg: Registry = Registry("plugin", discover=discover)
    assert calls == [] and reg.get("found") == 42 and "found" in reg and calls == [1]


def test_each_native_editor_entry_is_its_class():
    for name in NATIVE:
        assert EDITORS.get(name).name == name


# --- the CLI: `bench list` and unknown names, all from the registries ------------------------------------

def test_list_editors_shows_easyedit_as_not_installed_without_the_snapshot(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "easyeditor" else real(name, *a))
    assert main(["list", "editors"]) == 0
    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert set(rows) == set(EDITORS.names(installed_only=False))
    assert "not installed (needs easyeditor" in rows["easyedit:rome"]
    assert "pip install --no-deps easyeditor==0.0.1.dev0" in rows["easyedit:rome"]
    assert rows["rome"].split(None, 1)[1].startswith("ROME (Meng et al. 2022)")


@pytest.mark.parametrize("what, registry", [("datasets", DATASETS), ("models", MODELS)])
def test_list_datasets_and_models(what, registry, capsys):
    assert main(["list", what]) == 0
    listed = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line[:1] not in (" ", "<")]
    assert [n for n in listed if not n.startswith("lre:")] == registry.names()


@pytest.mark.parametrize("option, registry", [("--editor", EDITORS), ("--dataset", DATASETS), ("--model", MODELS)])
def test_an_unknown_name_gets_the_registry_line(option, registry, tmp_path, capsys, cache, one_thread):
    argv = ["run", "--editor", "ft-l", "--model", "tiny-gpt2", "--dataset", "facts", "--no-circuits",
            "--output", str(tmp_path)]
    argv[argv.index(option) + 1] = "nope"
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and err[0].startswith(f"error: unknown {registry.kind} 'nope'; valid: "
                                               f"{', '.join(registry.names())}")


def test_every_command_comes_from_the_one_registry(capsys):
    assert {"run", "leaderboard", "list", "check", "hparams", "tune"} <= set(COMMANDS.names())
    assert main(["list", "models"]) == 0 and "smollm2-135m" in capsys.readouterr().out
    with pytest.raises(SystemExit) as exc:
        main(["nope"])
    assert exc.value.code == 2
    assert "invalid choice: 'nope' (choose from " + ", ".join(repr(n) for n in COMMANDS.names()) in \
        capsys.readouterr().err
