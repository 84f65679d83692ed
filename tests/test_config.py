"""actionft.config: one typed configuration; every entry point refuses a bad parameter in one line, before any work."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from actionft import config
from actionft.errors import ActionftError
from actionft.params import load_params

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "params" / "tiny.yaml"


@pytest.mark.parametrize(("override", "named"), [
    ("padding_sied=right", "unknown parameter 'padding_sied' (did you mean padding_side?)"),
    ("learning_rate=abc", "learning_rate='abc'"),
    ("num_train_epochs=-1", "num_train_epochs=-1: input should be greater than 0"),
    ("max_steps=abc", "max_steps='abc'"),
    ("per_device_train_batch_size=abc", "per_device_train_batch_size='abc'"),
    ("lora_r=0", "lora_r=0: input should be greater than or equal to 1"),
    ("val_fraction=1.5", "val_fraction=1.5: input should be less than 1"),
    ("max_soft_tokens=100", "max_soft_tokens=100"),
    ("optim=adamw8bit", "closest: adamw_8bit"),
    ("lr_scheduler_type=cosin", "closest: cosine"),
    ("save_strategy=sometimes", "save_strategy='sometimes'"),
    ("eval_split=bogus", "eval_split='bogus'"),
    ("jpeg_quality=101", "jpeg_quality=101"),
])
def test_bad_parameter_is_one_line_naming_it(override, named):
    from actionft.train import resolve_config

    with pytest.raises(ActionftError) as err:
        resolve_config(load_params(TINY, [override]))
    message = str(err.value)
    assert named in message and "\n" not in message, message


def test_fractions_that_leave_no_training_clips_are_refused():
    with pytest.raises(ActionftError, match="leaves no clips for training"):
        config.validate(load_params(TINY, ["val_fraction=0.5", "test_fraction=0.5"]))


def test_every_params_file_and_notebook_default_validates():
    from actionft.notebooks import list_notebooks, notebook_parameters

    for path in sorted((REPO / "params").glob("*.yaml")):
        config.validate(load_params(path))
    for nb in list_notebooks():
        # papermill reports defaults as source text; the literals evaluate to the values a run passes
        defaults = {k: eval(v) for k, v in notebook_parameters(nb).items()}  # noqa: S307 (our own notebooks)
        config.validate(defaults)


def test_defaults_are_typed_and_complete():
    from actionft.train import DEFAULTS, OTHER_KEYS

    assert set(DEFAULTS) | OTHER_KEYS == set(config.KNOWN) and not set(DEFAULTS) & OTHER_KEYS
    assert config.validate({}, config.TRAIN_SECTIONS) == DEFAULTS


def cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "actionft.cli", *args], capture_output=True, text=True, env=env,
                          cwd=REPO, timeout=300)


@pytest.mark.parametrize("command", [["run", "--params", str(TINY)], ["train", "--params", str(TINY), "--dry-run"],
                                     ["evaluate", "--params", str(TINY), "--adapter", "x", "--out", "y"],
                                     ["prepare", "--params", str(TINY), "videos", "annotations.csv", "--out", "OUT"]])
def test_entry_points_refuse_a_typo_the_same_way_before_any_work(command, tmp_path):
    command = [str(tmp_path / "prepared") if arg == "OUT" else arg for arg in command]
    proc = cli(*command, "--set", "padding_sied=right", "--set", f"output_root={tmp_path}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown parameter 'padding_sied' (did you mean padding_side?)" in lines[0], proc.stderr
    assert not any(tmp_path.iterdir()), "work started before the parameters were checked"


@pytest.mark.parametrize(("flags", "named"), [
    (["--max-soft-tokens", "100"], "max_soft_tokens=100"),
    (["--num-frames", "0"], "num_frames=0"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
])
def test_predict_checks_its_flags_against_the_same_ranges(flags, named, tmp_path):
    proc = cli("predict", str(tmp_path / "missing.jpg"), *flags)
    assert proc.returncode == 2 and named in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


@pytest.mark.parametrize(("size", "hw"), [(336, (336, 336)), ("336", (336, 336)), ("224x336", (224, 336)),
                                          ([224, 336], (224, 336)), (0, None), ("", None), (None, None)])
def test_one_size_convention_height_then_width(size, hw):
    from actionft.frames import parse_size

    assert parse_size(size) == hw
    if hw:
        config.validate({"size": size})


def test_a_bad_size_is_refused_by_the_configuration():
    with pytest.raises(ActionftError, match="size="):
        config.validate({"size": "big"})
