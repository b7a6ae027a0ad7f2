"""Where the repository and the shared third-party data live."""

from __future__ import annotations

from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DATASETS_DIR = REPO_ROOT / "datasets"  # data files shipped with the repository
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"  # third-party samples kept next to the checkout
