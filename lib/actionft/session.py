"""Shared notebook set-up: seeds, display options and the run folder, so every notebook starts the same way."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

import numpy as np


def start(seed: int = 0, run_name: str = "run", output_root: str = "outputs") -> Path:
    """Seed Python, NumPy and torch, quiet the libraries, set plot defaults; return outputs/<run_name>/."""
    import torch

    from actionft import quiet
    from actionft.paths import resolve_path

    quiet.install()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        import transformers

        transformers.logging.set_verbosity_error()
    except ImportError:
        pass
    import matplotlib

    matplotlib.rcParams.update({"figure.dpi": 90, "figure.figsize": (8, 3.5), "axes.grid": True, "grid.alpha": 0.3})
    run = resolve_path(output_root) / run_name
    run.mkdir(parents=True, exist_ok=True)
    return run


def save_summary(run: Path, name: str, summary: dict[str, Any]) -> Path:
    """Write a notebook's machine-readable summary to outputs/<run>/<name>.json and return the path."""
    path = Path(run) / f"{name}.json"
    path.write_text(json.dumps(summary, indent=1, default=str))
    return path
