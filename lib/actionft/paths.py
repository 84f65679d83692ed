"""Where things are: the repository root, and how a relative path from a params file or notebook is read."""

from __future__ import annotations

import os
from pathlib import Path


def repo_root() -> Path:
    """The checkout this package was installed from (editable install), else the current directory."""
    here = Path(__file__).resolve().parents[2]
    return here if (here / "pyproject.toml").is_file() else Path.cwd()


def resolve_path(path: str | Path | None) -> Path | None:
    """Relative paths in params files are relative to the repository root, wherever a notebook runs."""
    if path is None or path == "":
        return None
    path = Path(os.path.expanduser(str(path)))
    return path if path.is_absolute() else repo_root() / path


def relative(path: str | Path) -> str:
    """`path` relative to the repository root when it lies inside it (printed output stays the same everywhere)."""
    try:
        return str(Path(path).resolve().relative_to(repo_root().resolve()))
    except ValueError:
        return str(path)
