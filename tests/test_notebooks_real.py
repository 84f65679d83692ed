"""Notebooks 01-03 run on the real 200-clip Kinetics-3K sample (params/kinetics3k_sample.yaml) through the same
papermill runner as `actionft run`. Skipped when ../shared/data/kinetics3k_sample is absent."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actionft.notebooks import run_notebooks
from actionft.params import load_params

ROOT = Path(__file__).parents[1]
SAMPLE_JSON = (ROOT / "../shared/data/kinetics3k_sample/kinetic_3K_sample.json").resolve()


@pytest.mark.slow
def test_notebooks_01_03_on_the_real_sample(tmp_path):
    if not SAMPLE_JSON.is_file():
        pytest.skip(f"{SAMPLE_JSON.parent} is absent (the shared Kinetics-3K sample is not on this machine)")
    params = load_params(ROOT / "params" / "kinetics3k_sample.yaml", [f"output_root={tmp_path}"])
    results = run_notebooks(params, ["01", "02", "03"], progress=False)
    assert [r["notebook"] for r in results] == ["01_explore_dataset.ipynb", "02_visualize_frames.ipynb",
                                                "03_check_collator.ipynb"], results
    run = tmp_path / params["run_name"]
    assert len(list((run / "notebooks").glob("0[123]_*.ipynb"))) == 3  # executed copies, sources untouched

    dataset = json.loads((run / "01_dataset_summary.json").read_text())
    assert dataset["samples"] == 200
    assert sum(dataset["splits"].values()) == 200 and dataset["splits"]["test"] > 0
    assert dataset["frame_sizes"] == {"336x336": 800}
    frames = json.loads((run / "02_frames_summary.json").read_text())
    assert frames["stored_size"] == [336, 336]
    collator = json.loads((run / "03_collator_summary.json").read_text())
    assert collator["max_soft_tokens"] == 70 and collator["checked"] > 0
    assert all(n > 0 for n in collator["soft_tokens_per_frame"])
