"""The generated action dataset: deterministic per seed, stratified splits, reference-format records, decodable
videos whose extracted frames sit at segment centres, and answers that name their class."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from conftest import SYNTH_SETTINGS
from PIL import Image

from actionft import DEFAULT_PROMPT
from actionft.errors import ActionftError
from actionft.evaluate import answer_class
from actionft.labels import read_label_set
from actionft.synth import CLASSES, COLOURS, SHAPES, generate_dataset, label_set, stratified_splits

SMALL = {"clips_per_class": 3, "val_per_class": 1, "test_per_class": 1, "frame_size": 48, "videos": False,
         "progress": False}


def folder_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def metadata(root: Path) -> list[dict]:
    with (root / "metadata.csv").open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_same_seed_same_bytes(tmp_path):
    generate_dataset(tmp_path / "a", seed=3, **SMALL)
    generate_dataset(tmp_path / "b", seed=3, **SMALL)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert sorted(a) == sorted(b)
    assert sum(k.endswith(".jpg") for k in a) == len(CLASSES) * 3 * 4
    differ = [k for k in a if a[k] != b[k]]
    assert not differ, differ[:5]


def test_different_seed_different_data(tmp_path):
    generate_dataset(tmp_path / "a", seed=3, **SMALL)
    generate_dataset(tmp_path / "b", seed=4, **SMALL)
    a, b = folder_bytes(tmp_path / "a"), folder_bytes(tmp_path / "b")
    assert a["data.json"] != b["data.json"]
    frames = [k for k in a if k.endswith(".jpg")]
    assert sum(a[k] != b.get(k) for k in frames) > len(frames) // 2


def test_ensure_dataset_reuses_and_regenerates(tmp_path):
    from actionft.synth import ensure_dataset

    out = ensure_dataset(tmp_path / "d", seed=1, **SMALL)
    first = (out / "data.json").stat().st_mtime_ns
    assert ensure_dataset(tmp_path / "d", seed=1, **SMALL) == out
    assert (out / "data.json").stat().st_mtime_ns == first  # same settings: nothing re-rendered
    before = (out / "data.json").read_bytes()
    ensure_dataset(tmp_path / "d", seed=2, **SMALL)
    assert (out / "data.json").read_bytes() != before
    assert json.loads((out / "summary.json").read_text())["settings"]["seed"] == 2
    assert not (tmp_path / "d.partial").exists()


def test_never_renders_over_a_folder_of_other_data(tmp_path):
    """synth: true with image_folder pointing at one's own frames must not replace them."""
    from actionft.synth import ensure_dataset

    own = tmp_path / "my_frames"
    (own / "clip_1").mkdir(parents=True)
    (own / "clip_1" / "frame_1.jpg").write_bytes(b"mine")
    (own / "data.json").write_text("[]")
    with pytest.raises(ActionftError, match="holds files the generator did not write.*synth: false"):
        ensure_dataset(own, seed=1, **SMALL)
    assert (own / "clip_1" / "frame_1.jpg").read_bytes() == b"mine" and not (tmp_path / "my_frames.partial").exists()


def test_bad_settings_are_clear_errors(tmp_path):
    with pytest.raises(ActionftError, match="clips_per_class"):
        generate_dataset(tmp_path / "x", clips_per_class=2, val_per_class=1, test_per_class=1, progress=False)
    with pytest.raises(ActionftError, match="multiple of num_frames"):
        generate_dataset(tmp_path / "x", video_frames=10, **SMALL)


def test_classes_and_stratified_splits(synth_dataset):
    rows = metadata(synth_dataset)
    assert len(CLASSES) >= 8
    assert {r["label"] for r in rows} == set(CLASSES)
    per_class = Counter((r["label"], r["split"]) for r in rows)
    n = SYNTH_SETTINGS["clips_per_class"]
    n_val, n_test = SYNTH_SETTINGS["val_per_class"], SYNTH_SETTINGS["test_per_class"]
    for label in CLASSES:
        assert per_class[label, "test"] == n_test
        assert per_class[label, "val"] == n_val
        assert per_class[label, "train"] == n - n_val - n_test
    summary = json.loads((synth_dataset / "summary.json").read_text())
    assert summary["splits"] == {"train": 18, "val": 9, "test": 9}


def test_stratified_splits_are_seeded():
    labels = [c for c in "abc" for _ in range(10)]
    s0, s0_again, s1 = (stratified_splits(labels, seed, 2, 3) for seed in (0, 0, 1))
    assert s0 == s0_again and s0 != s1
    for c in "abc":
        got = Counter(s for s, lab in zip(s0, labels) if lab == c)
        assert got == {"test": 3, "val": 2, "train": 5}


def test_records_in_reference_format(synth_dataset):
    records = json.loads((synth_dataset / "data.json").read_text())
    rows = metadata(synth_dataset)
    labels = read_label_set(synth_dataset / "labels.csv")
    assert labels.classes == list(CLASSES)
    assert len(records) == len(rows) == len(CLASSES) * SYNTH_SETTINGS["clips_per_class"]
    for record, row in zip(records, rows):
        assert list(record) == ["messages"]
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        images = user["content"][:-1]
        assert [i["type"] for i in user["content"]] == ["image"] * 4 + ["text"]
        assert user["content"][-1]["text"] == DEFAULT_PROMPT
        assert [i["image"] for i in images] == [f"frames/{row['clip_id']}/frame_{k}.jpg" for k in range(1, 5)]
        for item in images:
            assert not Path(item["image"]).is_absolute()
            assert (synth_dataset / item["image"]).is_file()
        assert assistant["content"] == [{"type": "text", "text": assistant["content"][0]["text"]}]
        answer = assistant["content"][0]["text"]
        # the dataset's own labels.csv reads every answer back as its class
        assert row["object"] in answer and answer_class(answer, labels) == row["label"]


def test_video_records_point_at_the_same_clips(synth_dataset):
    records = json.loads((synth_dataset / "data.json").read_text())
    videos = json.loads((synth_dataset / "data_video.json").read_text())
    assert len(videos) == len(records)
    for rec, vid in zip(records, videos):
        items = vid["messages"][0]["content"]
        assert [i["type"] for i in items] == ["video", "text"]
        clip_id = Path(rec["messages"][0]["content"][0]["image"]).parent.name
        assert items[0]["video"] == f"videos/{clip_id}.mp4"
        assert vid["messages"][1] == rec["messages"][1]


def test_videos_decode_with_expected_frames(synth_dataset):
    paths = sorted((synth_dataset / "videos").glob("*.mp4"))
    assert len(paths) == len(CLASSES) * SYNTH_SETTINGS["clips_per_class"]
    for path in paths:
        with av.open(str(path)) as container:
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
        assert len(frames) == 16, path.name  # generate_dataset's video_frames default
        assert frames[0].shape == (192, 192, 3)


def test_extracted_frames_are_segment_centres(synth_dataset):
    """frame_k.jpg is video frame k*4+2 of 16 (the centre of segment k): closer to it than to its neighbours."""
    clip = "move_right_0000"  # moving: neighbouring video frames differ
    with av.open(str(synth_dataset / "videos" / f"{clip}.mp4")) as container:
        video = [f.to_ndarray(format="rgb24").astype(np.float32) for f in container.decode(video=0)]
    for k in range(4):
        frame = np.asarray(Image.open(synth_dataset / "frames" / clip / f"frame_{k + 1}.jpg"), dtype=np.float32)
        diffs = [float(np.abs(frame - v).mean()) for v in video]
        assert int(np.argmin(diffs)) == 4 * k + 2, diffs


def test_answer_templates_name_their_class():
    objects = [f"{c} {s}" for c in COLOURS for s in SHAPES]
    for cls in CLASSES.values():
        assert len(cls.templates) >= 2 and cls.keywords
        for template in cls.templates:
            assert "{obj}" in template
            text = template.format(obj="red square").lower()
            assert any(kw in text for kw in cls.keywords), (cls.name, template)
            # the closed-set reader maps every paraphrase, for every object, back to exactly this class
            for obj in objects:
                assert answer_class(template.format(obj=obj), label_set()) == cls.name, (cls.name, template, obj)


def test_synth_command_honours_the_params_files_names(tmp_path, capsys):
    """`actionft synth --params` reads the synth_* names of the params files (and refuses a misspelt one)."""
    import csv

    from actionft.cli import main

    sets = ["--set", "synth_clips_per_class=3", "--set", "synth_val_per_class=1", "--set", "synth_test_per_class=1",
            "--set", "synth_frame_size=48"]
    assert main(["synth", "--out", str(tmp_path / "ds"), *sets]) == 0
    with open(tmp_path / "ds" / "metadata.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 9 * 3 and sum(r["split"] == "test" for r in rows) == 9
    from PIL import Image

    first = next((tmp_path / "ds" / "frames").iterdir())
    assert Image.open(next(first.iterdir())).size == (48, 48)
    assert main(["synth", "--out", str(tmp_path / "typo"), "--set", "synth_clip_per_class=3"]) == 2
    assert "did you mean synth_clips_per_class?" in capsys.readouterr().err
    assert not (tmp_path / "typo").exists()
