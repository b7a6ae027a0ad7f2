"""Knowledge editors: one module each, registered by name (see editors/base.py)."""

from editors.base import EditOutcome, Editor, EditorError, get_editor, load_hparams, register, registry

__all__ = ["EditOutcome", "Editor", "EditorError", "get_editor", "load_hparams", "register", "registry"]
