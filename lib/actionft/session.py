"""Shared notebook set-up: one call turns a notebook's parameters into the checked configuration, seeds everything,
sets display options and makes the run folder, so every notebook starts the same way."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any, Mapping

import numpy as np


def configure(namespace: Mapping[str, Any]) -> tuple[dict[str, Any], Path]:
    """`cfg, run = session.configure(globals())` after a notebook's `parameters` cell.

    Takes the names in `namespace` that are parameters of `actionft.config`, checks them as `actionft train` does
    (names, types, ranges, then the checks across keys; one `ActionftError` line per problem), seeds Python, NumPy
    and torch with `seed` and makes outputs/<run_name>/. Returns (every parameter, defaults filled in, flat; the run
    folder). Later cells must not re-bind a parameter's name: a re-run of this cell would read the new value."""
    from actionft import config, train

    params = {k: v for k, v in namespace.items() if k in config.SECTION_OF}
    # a near miss goes in too, so that validate refuses it as it refuses an unknown key anywhere
    cfg = config.validate({**params, **{k: namespace[k] for k in _near_misses(namespace)}})
    # a notebook that reads a reference-format dataset declares data_path; notebook 00 writes one and needs none
    train.check_across(cfg, needs_data="data_path" in params)
    # `seed` is the run's seed (training's, TrainingArguments.seed); split_seed and synth_seed pick data, not RNG state
    run = start(seed=cfg["seed"], run_name=cfg["run_name"], output_root=cfg["output_root"])
    return cfg, run


def _near_misses(namespace: Mapping[str, Any]) -> list[str]:
    """Names that look like a mistyped parameter (`lora_rr = 8`): a plain value under a name that is not a parameter
    but nearly spells one. Other names in a notebook (imports, results of later cells) are not parameters."""
    import difflib

    from actionft import config

    plain = lambda v: v is None or isinstance(v, (bool, int, float, str))  # noqa: E731
    return [k for k, v in namespace.items() if not k.startswith("_") and k not in config.SECTION_OF and plain(v)
            and difflib.get_close_matches(k, config.KNOWN, 1, cutoff=0.85)]


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
