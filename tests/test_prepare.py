"""`actionft prepare`: annotation kinds, output format, failures, re-runs and interruptions, the command line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image
from videos import (
    index_of,
    write_audio_only,
    write_format,
    write_random_bytes,
    write_truncated,
    write_video,
    write_zero_length,
)

import actionft.prepare as P
from actionft import DEFAULT_PROMPT
from actionft.data import assign_split, validate_dataset
from actionft.errors import ActionftError
from actionft.prepare import prepare_dataset

GOOD = {  # clip id -> (label, kinetics split, format); a mix of containers, flat and in label folders
    "aaa_000001_000004": ("jumping", "train", "mp4-h264"),
    "bbb_000000_000003": ("running", "validate", "webm-vp9"),
    "ccc_000010_000013": ("swimming", "test", "avi-mpeg4"),
    "ddd_000005_000008": ("jumping", "train", "mkv-h264"),
}
BAD = {  # clip id -> failure kind
    "eee_000000_000003": "empty file",
    "fff_000000_000003": "corrupt or not a media file",
    "ggg_000000_000003": "corrupt or not a media file",  # mp4 cut in half
    "hhh_000000_000003": "no video stream",
    "iii_000000_000002": "too few frames",
    "jjj_000000_000003": "missing",  # in the annotations, no file
}


def _write_videos(vdir: Path) -> None:
    for clip_id, (label, _, fmt) in GOOD.items():
        folder = vdir / label if clip_id.startswith(("aaa", "ddd")) else vdir
        folder.mkdir(parents=True, exist_ok=True)
        write_format(folder / clip_id, fmt)
    write_zero_length(vdir / "eee_000000_000003.mp4")
    write_random_bytes(vdir / "fff_000000_000003.mp4")
    write_truncated(vdir / "jumping" / "aaa_000001_000004.mp4", vdir / "ggg_000000_000003.mp4")
    write_audio_only(vdir / "hhh_000000_000003.mp4")
    write_video(vdir / "iii_000000_000002.mp4", n_frames=2)


@pytest.fixture(scope="module")
def video_dir(tmp_path_factory):
    vdir = tmp_path_factory.mktemp("videos")
    _write_videos(vdir)
    return vdir


def _kinetics_csv(path: Path, clip_ids=None) -> Path:
    rows = []
    for clip_id in clip_ids or [*GOOD, *BAD]:
        yid, start, end = clip_id.rsplit("_", 2)
        label, split, _ = GOOD.get(clip_id, ("other", "train", ""))
        rows.append({"label": label, "youtube_id": yid, "time_start": int(start), "time_end": int(end),
                     "split": split})
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["label", "youtube_id", "time_start", "time_end", "split"])
        w.writeheader()
        w.writerows(rows)
    return path


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def _check_output(out: Path, num_frames: int = 4, size=(336, 336)) -> list[dict]:
    """data.json is the reference format, every frame exists, and the validator agrees."""
    records = json.loads((out / "data.json").read_text())
    for rec in records:
        assert list(rec) == ["messages"]
        user, assistant = rec["messages"]
        assert user["role"] == "user" and assistant["role"] == "assistant"
        images = [i for i in user["content"] if i["type"] == "image"]
        assert len(images) == num_frames and user["content"][-1]["type"] == "text"
        assert len(user["content"]) == num_frames + 1
        for k, item in enumerate(images, start=1):
            assert item == {"type": "image", "image": item["image"]}
            assert item["image"].startswith("frames/") and item["image"].endswith(f"/frame_{k}.jpg")
            assert (out / item["image"]).is_file()
        assert len(assistant["content"]) == 1 and assistant["content"][0]["type"] == "text"
    good, report = validate_dataset(out / "data.json", out, expected_frames=num_frames, progress=False)
    assert report.ok, report.format()
    assert len(good) == len(records)
    if records:
        assert set(report.image_sizes) == {(size[1], size[0])}
    return records


def _referenced_frames_exist(out: Path) -> bool:
    """The invariant a kill must keep: no data.json, or one whose every frame is there and complete."""
    if not (out / "data.json").exists():
        return True
    for rec in json.loads((out / "data.json").read_text()):
        for item in rec["messages"][0]["content"]:
            if item["type"] == "image":
                path = out / item["image"]
                if not path.is_file():
                    return False
                with Image.open(path) as im:
                    im.load()
    return True


def test_kinetics_csv(tmp_path, video_dir):
    ann = _kinetics_csv(tmp_path / "kinetics.csv")
    out = tmp_path / "out"
    report = prepare_dataset(video_dir, ann, out, workers=2, progress=False)
    assert (report.ok, report.skipped, report.failed) == (len(GOOD), 0, len(BAD))
    assert report.exit_code == 1
    assert dict(report.reasons) == {k: list(BAD.values()).count(k) for k in set(BAD.values())}
    records = _check_output(out)
    assert len(records) == len(GOOD)
    first = records[0]["messages"]
    assert first[0]["content"][-1]["text"] == DEFAULT_PROMPT
    assert first[1]["content"][0]["text"] == "The video shows jumping."
    assert first[0]["content"][0]["image"] == "frames/aaa_000001_000004/frame_1.jpg"

    meta = {r["clip_id"]: r for r in _csv_rows(out / "metadata.csv")}
    assert list(_csv_rows(out / "metadata.csv")[0]) == P.METADATA_COLUMNS
    assert set(meta) == set(GOOD)
    assert meta["aaa_000001_000004"]["source"] == "jumping/aaa_000001_000004.mp4"
    assert meta["bbb_000000_000003"]["split"] == "val"  # 'validate' -> val
    assert meta["ccc_000010_000013"]["split"] == "test"
    for row in meta.values():
        assert row["timestamps"] == "0.400 1.200 1.900 2.700"
        assert float(row["fps"]) == 10.0 and float(row["duration"]) == pytest.approx(3.0, abs=0.05)
        assert (row["width"], row["height"]) == ("64", "48")

    failures = {r["clip_id"]: r for r in _csv_rows(out / "failures.csv")}
    assert set(failures) == set(BAD)
    assert "fewer than the 4 requested" in failures["iii_000000_000002"]["reason"]
    assert "not found" in failures["jjj_000000_000003"]["reason"]
    assert "no video stream" in failures["hhh_000000_000003"]["reason"]
    assert "empty" in failures["eee_000000_000003"]["reason"]
    assert failures["eee_000000_000003"]["source"] == "eee_000000_000003.mp4"

    # The frames are the ones at the segment centres (frame 4, 12, 19 and 27 of 30).
    got = [index_of(Image.open(out / "frames" / "aaa_000001_000004" / f"frame_{k}.jpg"), 30) for k in range(1, 5)]
    assert got == [4, 12, 19, 27]
    assert not list((out / "frames").glob(".tmp-*"))


def test_simple_csv_several_answers_and_hashed_splits(tmp_path, video_dir):
    ann = tmp_path / "simple.csv"
    with ann.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["file", "caption", "label"])
        w.writerow(["jumping/aaa_000001_000004.mp4", "A person jumps over a bar.", "jumping"])
        w.writerow(["jumping/aaa_000001_000004.mp4", "Someone is jumping.", "jumping"])
        w.writerow(["bbb_000000_000003", "A man runs.", "running"])  # bare id: found by name
        w.writerow(["ccc_000010_000013.avi", "", "swimming"])  # no caption: template from the label
        w.writerow(["zzz.mp4", "Nothing.", "x"])
    out = tmp_path / "out"
    report = prepare_dataset(video_dir, ann, out, size=(32, 48), jpeg_quality=70, question="What happens?",
                             answer_template="Action: {label}", workers=1, split_seed=3, progress=False)
    assert (report.ok, report.failed) == (3, 1) and report.reasons == {"missing": 1}
    records = _check_output(out, size=(32, 48))
    answers = [r["messages"][1]["content"][0]["text"] for r in records]
    assert answers == ["A person jumps over a bar.", "Someone is jumping.", "A man runs.", "Action: swimming"]
    assert {r["messages"][0]["content"][-1]["text"] for r in records} == {"What happens?"}
    meta = {r["clip_id"]: r for r in _csv_rows(out / "metadata.csv")}
    for clip_id, row in meta.items():
        assert row["split"] == assign_split(clip_id, 3, 0.1, 0.1)


def test_simple_json_with_answer_lists(tmp_path, video_dir):
    ann = tmp_path / "ann.json"
    ann.write_text(json.dumps([
        {"clip_id": "ddd_000005_000008", "answers": ["Jumping.", "A jump."], "split": "train", "label": "jumping"},
        {"clip": "bbb_000000_000003.webm", "answer": "Running.", "split": "val"},
    ]))
    out = tmp_path / "out"
    report = prepare_dataset(video_dir, ann, out, num_frames=3, size=None, workers=1, progress=False)
    assert (report.ok, report.failed, report.records) == (2, 0, 3) and report.exit_code == 0
    _check_output(out, num_frames=3, size=(48, 64))
    meta = {r["clip_id"]: r for r in _csv_rows(out / "metadata.csv")}
    assert meta["ddd_000005_000008"]["split"] == "train" and meta["bbb_000000_000003"]["split"] == "val"
    assert meta["ddd_000005_000008"]["timestamps"] == "0.500 1.500 2.500"


def test_annotation_problems(tmp_path, video_dir):
    bad_cols = tmp_path / "bad.csv"
    bad_cols.write_text("name,text\na,b\n")
    with pytest.raises(ActionftError, match="cannot tell the annotation kind"):
        prepare_dataset(video_dir, bad_cols, tmp_path / "o1", progress=False)
    with pytest.raises(ActionftError, match="does not exist"):
        prepare_dataset(video_dir, tmp_path / "none.csv", tmp_path / "o2", progress=False)
    with pytest.raises(ActionftError, match="video folder"):
        prepare_dataset(tmp_path / "novideos", bad_cols, tmp_path / "o3", progress=False)
    dup = tmp_path / "dup.csv"
    dup.write_text("file,answer\n"
                   "jumping/aaa_000001_000004.mp4,a\n"
                   "other/aaa_000001_000004.mp4,b\n"  # same clip id, another file
                   "../x.mp4,c\n"
                   "ccc_000010_000013.avi,\n")  # no answer, no label
    report = prepare_dataset(video_dir, dup, tmp_path / "o4", workers=1, progress=False)
    assert report.ok == 0 and report.failed == 3
    assert report.reasons == {"duplicate clip id": 1, "missing": 1, "bad annotation": 1}


def test_rerun_skips_done_clips_and_redoes_changed_ones(tmp_path, video_dir):
    ann = _kinetics_csv(tmp_path / "k.csv")
    out = tmp_path / "out"
    first = prepare_dataset(video_dir, ann, out, workers=1, progress=False)
    data = (out / "data.json").read_text()
    metadata = (out / "metadata.csv").read_text()
    again = prepare_dataset(video_dir, ann, out, workers=1, progress=False)
    assert (again.ok, again.skipped, again.failed) == (0, first.ok, first.failed)
    assert (out / "data.json").read_text() == data and (out / "metadata.csv").read_text() == metadata
    _check_output(out)

    # Other settings: every clip is redone and the records follow (the 2-frame clip is fine at 2 frames).
    smaller = prepare_dataset(video_dir, ann, out, num_frames=2, size=24, workers=1, progress=False)
    assert (smaller.ok, smaller.skipped, smaller.failed) == (first.ok + 1, 0, first.failed - 1)
    _check_output(out, num_frames=2, size=(24, 24))

    # A re-downloaded video is redone, the others are skipped.
    src = video_dir / "ccc_000010_000013.avi"
    st = src.stat()
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    changed = prepare_dataset(video_dir, ann, out, num_frames=2, size=24, workers=1, progress=False)
    assert (changed.ok, changed.skipped) == (1, first.ok)


def test_interrupted_run_then_rerun(tmp_path, video_dir, monkeypatch):
    ann = _kinetics_csv(tmp_path / "k.csv", list(GOOD))
    out = tmp_path / "out"
    real = P._extract
    calls = []

    def dies_on_third(task):
        calls.append(task["clip_id"])
        if len(calls) == 3:
            raise KeyboardInterrupt  # Ctrl-C in the middle of a clip
        return real(task)

    monkeypatch.setattr(P, "_extract", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(video_dir, ann, out, workers=1, progress=False)
    assert not (out / "data.json").exists()
    done = sorted(p.parent.name for p in (out / "frames").glob("*/done.json"))
    assert done == sorted(calls[:2])
    monkeypatch.setattr(P, "_extract", real)
    report = prepare_dataset(video_dir, ann, out, workers=1, progress=False)
    assert (report.skipped, report.ok, report.failed) == (2, len(GOOD) - 2, 0)
    _check_output(out)


def test_interrupted_rerun_never_leaves_records_to_missing_frames(tmp_path, video_dir, monkeypatch):
    ann = _kinetics_csv(tmp_path / "k.csv", list(GOOD))
    out = tmp_path / "out"
    prepare_dataset(video_dir, ann, out, workers=1, progress=False)
    real = P._extract

    def half_written(task):
        if task["clip_id"] == "ccc_000010_000013":
            # The kill lands after the old folder moved away, before the new one is in place.
            final = Path(task["frames_dir"]) / task["clip_id"]
            os.rename(final, Path(task["frames_dir"]) / ".old-ccc")
            raise KeyboardInterrupt
        return real(task)

    monkeypatch.setattr(P, "_extract", half_written)
    with pytest.raises(KeyboardInterrupt):
        prepare_dataset(video_dir, ann, out, num_frames=3, workers=1, progress=False)
    assert _referenced_frames_exist(out)
    monkeypatch.setattr(P, "_extract", real)
    report = prepare_dataset(video_dir, ann, out, num_frames=3, workers=1, progress=False)
    assert report.ok + report.skipped == len(GOOD) and report.skipped >= 1
    _check_output(out, num_frames=3)
    assert not list((out / "frames").glob(".*"))


def test_killed_process_then_rerun(tmp_path, video_dir):
    """A real SIGKILL in the middle of a run (the extraction is slowed so the kill lands mid-run)."""
    ann = _kinetics_csv(tmp_path / "k.csv")
    out = tmp_path / "out"
    script = (
        "import sys, time, actionft.prepare as P\n"
        "real = P._extract\n"
        "P._extract = lambda task: (time.sleep(0.3), real(task))[1]\n"
        "from actionft.prepare import prepare_dataset\n"
        f"prepare_dataset({str(video_dir)!r}, {str(ann)!r}, {str(out)!r}, workers=1, progress=False)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", script])
    try:
        deadline = time.monotonic() + 30
        while not list((out / "frames").glob("*/done.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, "the run ended before it could be killed"
            time.sleep(0.02)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "data.json").exists() and _referenced_frames_exist(out)
    n_done = len(list((out / "frames").glob("*/done.json")))
    assert 1 <= n_done < len(GOOD)
    report = prepare_dataset(video_dir, ann, out, workers=2, progress=False)
    assert report.skipped == n_done and report.ok == len(GOOD) - n_done and report.failed == len(BAD)
    _check_output(out)


@pytest.fixture
def cli(monkeypatch):
    """`actionft.cli.main` with just the subcommands under test (other stages may import heavy deps)."""
    import actionft.cli

    monkeypatch.setattr(actionft.cli, "SUBCOMMANDS", {"prepare": "actionft.prepare", "validate": "actionft.data"})
    return actionft.cli.main


def test_cli_exit_codes_and_params(tmp_path, video_dir, cli, capsys):
    out = tmp_path / "out"
    good = _kinetics_csv(tmp_path / "good.csv", list(GOOD)[:2])
    code = cli(["prepare", str(video_dir), str(good), "--out", str(out), "--workers", "1", "--no-progress",
                "--size", "40x30", "--set", "jpeg_quality=80", "--set", "num_frames=2"])
    assert code == 0
    assert "2 of 2 clips ready (2 new, 0 already done), 0 failed" in capsys.readouterr().out
    _check_output(out, num_frames=2, size=(40, 30))
    assert cli(["validate", str(out / "data.json"), "--image-folder", str(out), "--num-frames", "2"]) == 0

    params = tmp_path / "p.yaml"
    params.write_text(f"video_dir: {video_dir}\nannotations: {tmp_path / 'all.csv'}\nnum_frames: 2\nworkers: 1\n")
    _kinetics_csv(tmp_path / "all.csv")
    code = cli(["prepare", "--params", str(params), "--out", str(tmp_path / "out2"), "--no-progress"])
    assert code == 1
    printed = capsys.readouterr().out
    assert f"{len(BAD) - 1} failed" in printed and "failures.csv" in printed  # 2 frames: iii is fine

    assert cli(["prepare", str(video_dir), str(tmp_path / "missing.csv"), "--out", str(out)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["prepare", str(video_dir), str(good), "--out", str(out), "--set", "frames=3"]) == 2
    assert "unknown parameter 'frames' (did you mean num_frames?)" in capsys.readouterr().err
    assert cli(["prepare", str(video_dir), str(good)]) == 2
    assert "out_dir" in capsys.readouterr().err
