"""`actionft prepare` on the generated dataset's own mp4 files reproduces the frames the generator wrote.

The generator renders 16 frames per clip (8 fps, 2 s), encodes them as H.264 and saves frames 2, 6, 10, 14 (the
segment centres) as JPEGs. Preparing the mp4 files must pick exactly those frames and give back the same pixels up to
compression noise.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from actionft.data import read_metadata, read_records, validate_dataset
from actionft.errors import ActionftError
from actionft.frames import sample_times
from actionft.prepare import prepare_dataset
from actionft.synth import CLASSES, MISSING_CLIP, compare_prepared, frame_times, write_annotations

NUM_FRAMES = 4
# Largest mean |prepared - generated| per frame, on the 0-255 scale. The two differ by H.264 (CRF 18, 4:2:0 chroma:
# the shapes' colour edges blur, so single pixels are off by up to ~50) and two JPEG encodings (quality 95). Measured
# on all 2160 frames of the default dataset (540 clips): mean 1.14, 99th percentile 1.38, max 1.51 at the native
# 192 px; mean 1.16, max 1.51 resized to 224 (an upscale: swscale here, PIL for the generator's frames). 2.0 leaves
# a third of margin; decoding with a wrong colour range or matrix, a wrong crop or a missing rotation is off by 5 or
# more. A pick one video frame off moves a clip's mean by only 0.3-2, which is what the frame-index check below is for.
NOISE_LIMIT = 2.0


@pytest.fixture(scope="module")
def generated(synth_no_val) -> Path:
    return synth_no_val


@pytest.fixture(scope="module")
def annotations(generated) -> Path:
    """The simple CSV (file, answer, label, split) of every generated clip, as notebook 00 writes it."""
    path = write_annotations(generated, generated.parent / "annotations.csv")
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 18 and {r["label"] for r in rows} == set(CLASSES)
    return path


def test_annotations_subset_spreads_over_the_classes(generated, tmp_path):
    path = write_annotations(generated, tmp_path / "a.csv", max_clips=4, add_missing_clip=True)
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 5 and len({r["label"] for r in rows[:4]}) == 4 and rows[-1] == MISSING_CLIP  # round robin
    order = [r["clip_id"] for r in read_metadata(generated / "metadata.csv").values()]
    clips = [Path(r["file"]).stem for r in rows[:4]]
    assert clips == sorted(clips, key=order.index)  # in the generator's order


@pytest.fixture(scope="module", params=[None, 224], ids=["native-size", "resized-224"])
def prepared(request, generated, annotations, tmp_path_factory):
    size = request.param
    out = tmp_path_factory.mktemp("prepared")
    report = prepare_dataset(generated, annotations, out, num_frames=NUM_FRAMES, size=size, jpeg_quality=95,
                             workers=1 if size is None else 2, progress=False)
    return size, out, report


def test_records_and_metadata_match_the_generator(generated, prepared):
    _, out, report = prepared
    assert (report.failed, report.exit_code) == (0, 0), report.failures
    assert report.ok == report.records == 18
    # same frame paths, question and answers: the generator writes the reference format too
    assert read_records(out / "data.json") == read_records(generated / "data.json")
    ours, theirs = read_metadata(out / "metadata.csv"), read_metadata(generated / "metadata.csv")
    assert list(ours) == list(theirs)
    for clip_id, row in ours.items():
        assert (row["label"], row["split"], row["source"]) == (theirs[clip_id]["label"], theirs[clip_id]["split"],
                                                               theirs[clip_id]["source"])
        assert float(row["fps"]) == float(theirs[clip_id]["fps"])
        assert float(row["duration"]) == pytest.approx(float(theirs[clip_id]["duration"]))
    _, check = validate_dataset(out / "data.json", out, expected_frames=NUM_FRAMES, progress=False)
    assert check.ok, check.format()
    assert check.n_valid == 18 and check.n_frames == 18 * NUM_FRAMES


def test_sampled_times_are_the_generators_frame_times(generated, prepared):
    size, out, _ = prepared
    compared = compare_prepared(generated, out, size=size)
    assert len(compared) == 18
    for row in compared:
        # the segment centres where the generator takes its frames, in seconds
        assert row["times"] == pytest.approx([t * row["duration"] for t in frame_times(NUM_FRAMES)], abs=1e-3)
        assert row["times"] == pytest.approx(sample_times(row["duration"], NUM_FRAMES), abs=1e-3)
        assert row["prepared_indices"] == row["frame_indices"] == [2, 6, 10, 14]


def test_frames_equal_the_generators_up_to_compression_noise(generated, prepared):
    size, out, _ = prepared
    compared = compare_prepared(generated, out, size=size)
    for row in compared:
        assert row["frames"] == [f"frame_{k}.jpg" for k in range(1, NUM_FRAMES + 1)]
        assert row["mode"] == "RGB" and row["size"] == ((192, 192) if size is None else (size, size))
        assert max(row["frame_mean_diff"]) < NOISE_LIMIT, row
    # JPEG + H.264 leave some noise: a zero would mean the generator's files were copied
    assert max(max(r["frame_mean_diff"]) for r in compared) > 0.1


def test_compare_refuses_frames_of_another_size(generated, prepared):
    size, out, _ = prepared
    if size is None:
        pytest.skip("the native size matches the generator's frames")
    with pytest.raises(ActionftError, match="pass the size prepare used"):
        compare_prepared(generated, out)


def test_noise_limit_tells_neighbouring_frames_apart(generated):
    """The limit is tight enough to reject the wrong frame: consecutive sampled frames of a moving shape differ more."""
    for clip_id in ("move_left_0000", "grow_0000", "appear_0000"):
        frames = [np.asarray(Image.open(generated / "frames" / clip_id / f"frame_{k}.jpg"), dtype=np.int16)
                  for k in range(1, NUM_FRAMES + 1)]
        diffs = [np.abs(a - b).mean() for a, b in zip(frames, frames[1:])]
        assert max(diffs) > 2 * NOISE_LIMIT, (clip_id, diffs)


def test_cli_prepare_then_validate(generated, annotations, tmp_path, monkeypatch, capsys):
    import actionft.cli

    # just the subcommands under test: the others import the training stack
    monkeypatch.setattr(actionft.cli, "SUBCOMMANDS", {"prepare": "actionft.prepare", "validate": "actionft.data"})
    out = tmp_path / "prepared"
    args = ["prepare", str(generated), str(annotations), "--out", str(out), "--size", "0", "--jpeg-quality", "95",
            "--workers", "1", "--no-progress"]
    assert actionft.cli.main(args) == 0
    assert "18 of 18 clips ready (18 new, 0 already done), 0 failed" in capsys.readouterr().out
    assert actionft.cli.main(args) == 0  # a re-run finds every clip done
    assert "(0 new, 18 already done)" in capsys.readouterr().out
    assert actionft.cli.main(["validate", str(out / "data.json"), "--image-folder", str(out)]) == 0
    assert "problems: 0" in capsys.readouterr().out
    assert json.loads((out / "data.json").read_text()) == read_records(generated / "data.json")
