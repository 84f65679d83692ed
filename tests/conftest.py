"""Shared fixtures: a small generated dataset (rendered once per session) and the tiny model's processor."""

from __future__ import annotations

from pathlib import Path

import pytest

# 9 classes x 4 clips: 2 train, 1 val, 1 test per class. Small enough to render in about a second.
SYNTH_SETTINGS = {"clips_per_class": 4, "val_per_class": 1, "test_per_class": 1, "seed": 0}


@pytest.fixture(scope="session")
def synth_dataset(tmp_path_factory) -> Path:
    """Folder holding `data.json`, `data_video.json`, `metadata.csv`, `frames/` and `videos/` (do not modify)."""
    from actionft.synth import ensure_dataset

    return ensure_dataset(tmp_path_factory.mktemp("synth") / "ds", progress=False, **SYNTH_SETTINGS)


@pytest.fixture(scope="session")
def synth_no_val(tmp_path_factory) -> Path:
    """9 train + 9 test clips, no val split (training runs without evaluation), with mp4 videos (do not modify)."""
    from actionft.synth import generate_dataset

    out = tmp_path_factory.mktemp("synth") / "data"
    generate_dataset(out, clips_per_class=2, val_per_class=0, test_per_class=1, num_frames=4, progress=False)
    return out


@pytest.fixture(scope="session")
def synth_samples(synth_dataset):
    """The generated dataset loaded with its metadata (labels and splits)."""
    from actionft.data import load_dataset

    return load_dataset(synth_dataset / "data.json", synth_dataset, synth_dataset / "metadata.csv", progress=False)


@pytest.fixture(scope="session")
def processor():
    """Processor of the packaged tiny Gemma 4 (tokenizer, chat template, image and video processors)."""
    from actionft.modeling import load_processor

    return load_processor("tiny")


@pytest.fixture(scope="session")
def bench():
    """bench/bench_train.py as a module (a script, not part of the package), loaded once for the bench tests."""
    import importlib.util
    import sys

    script = Path(__file__).resolve().parents[1] / "bench" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", script)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_train"] = module
    spec.loader.exec_module(module)
    return module
