"""Dataset validation: a clean dataset passes with the right counts; every kind of broken sample is reported with
its index, path and reason (library and `actionft validate` CLI); `load_dataset(skip_bad=True)` leaves them out."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from actionft.data import load_dataset, validate_dataset
from actionft.errors import ActionftError

ROOT = Path(__file__).parents[1]
KINETICS_SAMPLE = (ROOT / "../shared/data/kinetics3k_sample").resolve()


def cli_validate(data_json: Path, image_folder: Path, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "actionft.cli", "validate", str(data_json), "--image-folder", str(image_folder), *extra],
        capture_output=True, text=True, timeout=120,
    )


@pytest.fixture
def broken(synth_dataset, tmp_path):
    """A writable copy of the generated dataset (frames and JSON; videos are not needed) and its records."""
    root = tmp_path / "ds"
    shutil.copytree(synth_dataset / "frames", root / "frames")
    records = json.loads((synth_dataset / "data.json").read_text())
    return root, records


def write(root: Path, records: list) -> Path:
    path = root / "data.json"
    path.write_text(json.dumps(records))
    return path


def frame_rel(record: dict, k: int = 0) -> str:
    return record["messages"][0]["content"][k]["image"]


# -- clean dataset --------------------------------------------------------------------------------------------
def test_clean_dataset_summary(synth_dataset):
    records = json.loads((synth_dataset / "data.json").read_text())
    samples, report = validate_dataset(synth_dataset / "data.json", synth_dataset, progress=False)
    words = [len(r["messages"][1]["content"][0]["text"].split()) for r in records]
    s = report.summary()
    assert report.ok and report.problems == []
    assert len(records) == 36
    assert (s["samples"], s["valid_samples"], s["bad_samples"]) == (36, 36, 0)
    assert (s["frames"], s["videos"]) == (36 * 4, 0)
    assert s["image_sizes"] == {"192x192": 36 * 4}
    assert (s["answer_words"]["min"], s["answer_words"]["max"]) == (min(words), max(words))
    assert [smp.index for smp in samples] == list(range(36))
    assert all(len(smp.frames) == 4 and all(f.is_file() for f in smp.frames) for smp in samples)


def test_clean_video_dataset(synth_dataset):
    samples, report = validate_dataset(synth_dataset / "data_video.json", synth_dataset, progress=False)
    assert report.ok, report.format()
    assert (report.n_records, report.n_valid, report.n_videos, report.n_frames) == (36, 36, 36, 0)
    assert all(s.video is not None and s.video.suffix == ".mp4" for s in samples)


def test_cli_clean_exit_zero(synth_dataset, tmp_path):
    out = tmp_path / "report.json"
    proc = cli_validate(synth_dataset / "data.json", synth_dataset, "--json", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "samples: 36  valid: 36  bad: 0" in proc.stdout
    assert "frames: 144" in proc.stdout
    summary = json.loads(out.read_text())
    assert summary["problems"] == 0 and summary["problem_list"] == []


# -- broken copies: one kind of damage each -------------------------------------------------------------------
def missing_frame(root, records):
    (root / frame_rel(records[3], 1)).unlink()
    return 3, frame_rel(records[3], 1), "does not exist"


def truncated_jpeg(root, records):
    path = root / frame_rel(records[5], 2)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    return 5, frame_rel(records[5], 2), "cannot be read as an image"


def garbage_jpeg(root, records):
    (root / frame_rel(records[7], 0)).write_bytes(b"\x00not a jpeg at all\xff" * 40)
    return 7, frame_rel(records[7], 0), "cannot be read as an image"


def escaping_path(root, records):
    # The target exists, so only the escape itself can be the reason.
    outside = root.parent / "outside" / "frame_1.jpg"
    outside.parent.mkdir()
    shutil.copy(root / frame_rel(records[2]), outside)
    rel = "frames/../../outside/frame_1.jpg"
    records[2]["messages"][0]["content"][0]["image"] = rel
    return 2, rel, "escapes the image folder"


def empty_answer(root, records):
    records[4]["messages"][1]["content"][0]["text"] = "   "
    return 4, "", "answer is empty"


def swapped_roles(root, records):
    records[6]["messages"].reverse()
    return 6, "", "roles must be ['user', 'assistant']"


def missing_assistant(root, records):
    del records[8]["messages"][1]
    return 8, "", "roles must be ['user', 'assistant']"


def three_frames(root, records):
    del records[9]["messages"][0]["content"][3]
    return 9, "", "3 frames, expected 4"


BREAKAGES = [missing_frame, truncated_jpeg, garbage_jpeg, escaping_path, empty_answer, swapped_roles,
             missing_assistant, three_frames]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=lambda f: f.__name__)
def test_broken_sample_reported(broken, breakage):
    root, records = broken
    index, path, reason = breakage(root, records)
    samples, report = validate_dataset(write(root, records), root, progress=False)
    assert not report.ok
    assert {p.index for p in report.problems} == {index}, report.format()
    problem = report.problems[0]
    assert reason in problem.reason
    assert problem.path.endswith(path) if path else problem.path == ""
    assert str(problem).startswith(f"sample {index}")
    assert len(samples) == 35 and index not in {s.index for s in samples}
    assert report.summary()["bad_samples"] == 1


def test_cli_reports_every_broken_sample(broken, tmp_path):
    root, records = broken
    expected = [breakage(root, records) for breakage in BREAKAGES]
    out = tmp_path / "report.json"
    proc = cli_validate(write(root, records), root, "--json", str(out))
    assert proc.returncode != 0
    assert f"bad: {len(BREAKAGES)}" in proc.stdout
    listed = {(p["index"], p["path"], p["reason"]) for p in json.loads(out.read_text())["problem_list"]}
    for index, path, reason in expected:
        hits = [p for p in listed if p[0] == index and p[1].endswith(path) and reason in p[2]]
        assert hits, f"sample {index} ({reason}) not reported: {sorted(listed)}"
        # the human-readable report names the sample, the file and the reason on one line
        assert any(line.strip().startswith(f"sample {index}") and reason in line and path in line
                   for line in proc.stdout.splitlines()), proc.stdout


def test_cli_missing_image_folder_is_clear_error(synth_dataset, tmp_path):
    proc = cli_validate(synth_dataset / "data.json", tmp_path / "nowhere")
    assert proc.returncode == 2
    assert "image folder" in proc.stderr and "nowhere" in proc.stderr and "Traceback" not in proc.stderr


# -- load_dataset ---------------------------------------------------------------------------------------------
def test_load_dataset_raises_on_bad_samples(broken):
    root, records = broken
    index, path, reason = missing_frame(root, records)
    with pytest.raises(ActionftError) as err:
        load_dataset(write(root, records), root, progress=False)
    message = str(err.value)
    assert "skip_bad=True" in message  # says how to go on
    assert any(f"sample {index}" in line and path in line and reason in line for line in message.splitlines())


def test_load_dataset_skip_bad(broken, synth_dataset, capsys):
    root, records = broken
    bad = [missing_frame(root, records)[0], empty_answer(root, records)[0], three_frames(root, records)[0]]
    samples = load_dataset(write(root, records), root, synth_dataset / "metadata.csv", skip_bad=True,
                           progress=False)
    out = capsys.readouterr().out
    assert "skipped 3 bad sample(s)" in out
    for index in bad:
        assert f"sample {index}" in out
    assert len(samples) == 33 and not {s.index for s in samples} & set(bad)
    # metadata still attaches to the survivors
    assert all(s.label and s.split in ("train", "val", "test") for s in samples)
    assert all(s.clip_id.startswith(s.label) for s in samples)


def test_load_dataset_skip_bad_without_file_checks(broken):
    root, records = broken
    clean = copy.deepcopy(records)
    swapped_roles(root, records)
    samples = load_dataset(write(root, records), root, skip_bad=True, check_files=False, progress=False)
    assert len(samples) == len(clean) - 1 and 6 not in {s.index for s in samples}


# -- the real Kinetics-3K sample ------------------------------------------------------------------------------
def test_kinetics_sample_validates():
    data_json = KINETICS_SAMPLE / "kinetic_3K_sample.json"
    if not data_json.is_file():
        pytest.skip(f"{KINETICS_SAMPLE} is absent (the shared Kinetics-3K sample is not on this machine)")
    samples, report = validate_dataset(data_json, KINETICS_SAMPLE, progress=False)
    assert report.ok, report.format()
    s = report.summary()
    assert (s["samples"], s["valid_samples"], s["frames"]) == (200, 200, 800)
    assert s["image_sizes"] == {"336x336": 800}
    assert len({smp.clip_id for smp in samples}) == 200
    assert 8 <= s["answer_words"]["min"] and s["answer_words"]["max"] <= 43


# -- labels from a Kinetics annotation CSV --------------------------------------------------------------------
def test_kinetics_annotation_csv_as_metadata(broken, tmp_path):
    """Frames named the Kinetics way (`frames/<youtube_id>_<start:06d>_<end:06d>/...`, as in Kinetics-3K) get
    their labels from the Kinetics annotation CSV, joined on the clip id; Kinetics' split does not replace the
    held-out hash split."""
    root, records = broken
    ids = ["abcdefghijk_000010_000020", "-x_Y1234567_000000_000010", "zzzzzzzzzzz_000123_000133"]
    for record, clip_id in zip(records, ids):
        old = Path(frame_rel(record)).parent
        shutil.copytree(root / old, root / "frames" / clip_id)
        for item in record["messages"][0]["content"]:
            if item["type"] == "image":
                item["image"] = f"frames/{clip_id}/{Path(item['image']).name}"
    csv_path = tmp_path / "kinetics_train.csv"
    csv_path.write_text("label,youtube_id,time_start,time_end,split\n"
                        "playing guitar,abcdefghijk,10,20,train\n"
                        "riding a bike,-x_Y1234567,0.0,10.0,val\n"
                        "unrelated,qqqqqqqqqqq,5,15,train\n")  # the third clip has no row
    samples = load_dataset(write(root, records[:3]), root, csv_path, split_seed=0, val_fraction=0.0,
                           test_fraction=1.0, progress=False)
    by_id = {s.clip_id: s for s in samples}
    assert by_id[ids[0]].label == "playing guitar" and by_id[ids[1]].label == "riding a bike"
    assert by_id[ids[2]].label is None
    assert by_id[ids[1]].meta["kinetics_split"] == "val"
    assert all(s.split == "test" for s in samples)  # the hash split (all test here), not Kinetics' train/val

    bad = tmp_path / "bad.csv"
    bad.write_text("label,youtube_id,time_start,time_end\nplaying guitar,abcdefghijk,ten,20\n")
    with pytest.raises(ActionftError, match=r"bad.csv, line 2: time_start/time_end are not numbers"):
        load_dataset(write(root, records[:3]), root, bad, progress=False)
    neither = tmp_path / "neither.csv"
    neither.write_text("video,caption\na.mp4,hello\n")
    with pytest.raises(ActionftError, match="needs a 'clip_id' column"):
        load_dataset(write(root, records[:3]), root, neither, progress=False)
