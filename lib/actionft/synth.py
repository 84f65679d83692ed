"""The embedded default dataset: generated clips of one shape doing one of nine actions.

Every action needs more than one frame to name: a medium-sized square could be growing or shrinking, an empty frame
could be the start of "appears" or the end of "disappears". Clips are rendered as short mp4 videos (PyAV) and as
4 frames taken at the segment centres of the clip, with a JSON in exactly the Kinetics-3K reference format and a
metadata CSV (label, split, object, source video). Answers are short sentences from a few paraphrase templates.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import random
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from actionft import DEFAULT_PROMPT
from actionft.errors import ActionftError

COLOURS = {
    "red": (225, 45, 40),
    "green": (40, 200, 70),
    "blue": (50, 95, 235),
    "yellow": (235, 215, 40),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND = (70, 70, 70)
DIM = 0.3  # brightness of a "dim" object relative to its full colour


@dataclass(frozen=True)
class ActionClass:
    name: str
    templates: tuple[str, ...]  # paraphrases; "{obj}" is e.g. "red square". The first is the canonical answer.
    keywords: tuple[str, ...]  # words that name this action in a free-form answer

    def answer(self, obj: str, rng: random.Random | None = None) -> str:
        template = self.templates[0] if rng is None else rng.choice(self.templates)
        return template.format(obj=obj)


CLASSES: dict[str, ActionClass] = {
    c.name: c
    for c in [
        ActionClass("grow", ("The {obj} grows.", "The {obj} gets bigger.", "The {obj} is growing larger."),
                    ("grows", "bigger", "growing", "larger")),
        ActionClass("shrink", ("The {obj} shrinks.", "The {obj} gets smaller.", "The {obj} is shrinking away."),
                    ("shrinks", "smaller", "shrinking")),
        ActionClass("brighten", ("The {obj} lights up.", "The {obj} gets brighter.", "The {obj} starts to glow."),
                    ("lights up", "brighter", "glow")),
        ActionClass("darken", ("The {obj} fades dark.", "The {obj} gets darker.", "The {obj} is dimming."),
                    ("fades dark", "darker", "dimming")),
        ActionClass("appear", ("The {obj} appears.", "A {obj} shows up.", "The {obj} pops into view."),
                    ("appears", "shows up", "pops into view")),
        ActionClass("disappear", ("The {obj} disappears.", "The {obj} vanishes.", "The {obj} is gone."),
                    ("disappears", "vanishes", "is gone")),
        ActionClass("move_left", ("The {obj} moves left.", "The {obj} slides to the left.",
                                  "The {obj} is moving to the left."), ("left",)),
        ActionClass("move_right", ("The {obj} moves right.", "The {obj} slides to the right.",
                                   "The {obj} is moving to the right."), ("right",)),
        ActionClass("change_colour", ("The {obj} changes colour.", "The {obj} switches colour.",
                                      "The {obj} takes a new colour."), ("colour",)),
    ]
}


def label_set(classes: list[str] | None = None):
    """The generated dataset's label set: each class scored as its canonical sentence about the clip's own object
    (metadata column `object`, so only the action differs between candidates); its keywords name it in free text."""
    from actionft.labels import LabelSet

    classes = list(classes or CLASSES)
    return LabelSet(classes, {c: CLASSES[c].templates[0].replace("{obj}", "{object}") for c in classes},
                    {c: list(CLASSES[c].keywords) for c in classes}, "the generated dataset's labels.csv")


@dataclass
class Clip:
    """Everything needed to render one clip at any time t in [0, 1]."""

    clip_id: str
    label: str
    colour: str
    shape: str
    size: tuple[float, float]  # radius as a fraction of the frame side, at t=0 and t=1
    x: tuple[float, float]  # centre, fraction of the width, at t=0 and t=1
    y: float
    brightness: tuple[float, float]
    visible: tuple[float, float] = (0.0, 1.0)  # visible for visible[0] <= t < visible[1]
    colour_after: str | None = None
    switch_at: float = 2.0  # t at which the colour switches
    answer: str = ""
    extra: dict = field(default_factory=dict)

    @property
    def obj(self) -> str:
        return f"{self.colour} {self.shape}"

    def state(self, t: float) -> dict:
        lerp = lambda a: a[0] + (a[1] - a[0]) * t  # noqa: E731
        colour = self.colour_after if self.colour_after and t >= self.switch_at else self.colour
        return {
            "visible": self.visible[0] <= t < self.visible[1],
            "colour": colour,
            "shape": self.shape,
            "radius": lerp(self.size),
            "x": lerp(self.x),
            "y": self.y,
            "brightness": lerp(self.brightness),
        }


def random_clip(label: str, clip_id: str, rng: random.Random) -> Clip:
    """A clip of `label` with the other properties drawn at random (but held still)."""
    colour, shape = rng.choice(list(COLOURS)), rng.choice(SHAPES)
    r = rng.uniform(0.14, 0.2)
    x, y = rng.uniform(0.35, 0.65), rng.uniform(0.35, 0.65)
    clip = Clip(clip_id, label, colour, shape, (r, r), (x, x), y, (1.0, 1.0))
    if label == "grow":
        clip.size = (rng.uniform(0.06, 0.1), rng.uniform(0.26, 0.32))
    elif label == "shrink":
        clip.size = (rng.uniform(0.26, 0.32), rng.uniform(0.06, 0.1))
    elif label == "brighten":
        clip.brightness = (DIM, 1.0)
    elif label == "darken":
        clip.brightness = (1.0, DIM)
    elif label == "appear":
        clip.visible = (rng.uniform(0.3, 0.6), 2.0)
    elif label == "disappear":
        clip.visible = (-1.0, rng.uniform(0.4, 0.7))
    elif label == "move_left":
        clip.x = (rng.uniform(0.72, 0.8), rng.uniform(0.2, 0.28))
    elif label == "move_right":
        clip.x = (rng.uniform(0.2, 0.28), rng.uniform(0.72, 0.8))
    elif label == "change_colour":
        clip.colour_after = rng.choice([c for c in COLOURS if c != colour])
        clip.switch_at = rng.uniform(0.3, 0.7)
    else:
        raise ActionftError(f"unknown action class {label!r}; known: {', '.join(CLASSES)}")
    clip.answer = CLASSES[label].answer(clip.obj, rng)
    return clip


def render(state: dict, size: int) -> np.ndarray:
    """One RGB frame (size x size, uint8) of a clip state."""
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = BACKGROUND
    if not state["visible"]:
        return img
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    cx, cy, r = state["x"] * size, state["y"] * size, state["radius"] * size
    if state["shape"] == "square":
        inside = (np.abs(xx - cx) <= r * 0.9) & (np.abs(yy - cy) <= r * 0.9)
    elif state["shape"] == "circle":
        inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r * r
    else:  # triangle pointing up, inscribed in the circle of radius r
        top, base = cy - r, cy + r * 0.6
        half = (yy - top) / (base - top) * r * 0.95
        inside = (yy >= top) & (yy <= base) & (np.abs(xx - cx) <= half)
    colour = np.array(COLOURS[state["colour"]], dtype=np.float32) * state["brightness"]
    img[inside] = colour.round().astype(np.uint8)
    return img


def frame_times(num_frames: int) -> list[float]:
    """Segment centres on [0, 1]: where the extracted frames of a clip are taken (as `actionft prepare` does)."""
    return [(i + 0.5) / num_frames for i in range(num_frames)]


def write_video(path: Path, frames: list[np.ndarray], fps: int) -> None:
    """Encode frames as an H.264 mp4 (yuv420p) with PyAV."""
    import av

    tmp = path.with_suffix(".tmp.mp4")
    with av.open(str(tmp), mode="w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast"}
        for arr in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    os.replace(tmp, path)


def stratified_splits(labels: list[str], seed: int, val_per_class: int, test_per_class: int) -> list[str]:
    """Per class: the first `test_per_class` shuffled clips go to test, the next to val, the rest to train."""
    rng = random.Random(seed)
    splits = ["train"] * len(labels)
    for label in sorted(set(labels)):
        idx = [i for i, lab in enumerate(labels) if lab == label]
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            splits[i] = "test" if j < test_per_class else "val" if j < test_per_class + val_per_class else "train"
    return splits


def settings(cfg: dict) -> dict:
    """`generate_dataset`'s keyword arguments from the `synth_*` parameters of a config."""
    return {"clips_per_class": cfg["synth_clips_per_class"], "val_per_class": cfg["synth_val_per_class"],
            "test_per_class": cfg["synth_test_per_class"], "seed": cfg["synth_seed"],
            "frame_size": cfg["synth_frame_size"]}


def generate_dataset(
    out_dir: str | Path,
    clips_per_class: int = 60,
    val_per_class: int = 6,
    test_per_class: int = 10,
    classes: list[str] | None = None,
    frame_size: int = 192,
    num_frames: int = 4,
    fps: int = 8,
    video_frames: int = 16,
    seed: int = 0,
    prompt: str = DEFAULT_PROMPT,
    videos: bool = True,
    progress: bool = True,
) -> dict:
    """Render the dataset into `out_dir`; return a summary. Deterministic for a given seed and settings.

    Layout: `videos/<clip>.mp4`, `frames/<clip>/frame_<k>.jpg`, `data.json` (reference format, image items),
    `data_video.json` (same samples as video items), `metadata.csv` (clip_id, split, label, ...), `labels.csv`
    (the label set: class, answer template, synonyms).
    """
    from PIL import Image
    from tqdm.auto import tqdm

    classes = list(classes or CLASSES)
    if clips_per_class <= val_per_class + test_per_class:
        raise ActionftError("clips_per_class must exceed val_per_class + test_per_class")
    if video_frames % num_frames:
        raise ActionftError("video_frames must be a multiple of num_frames so frames sit at segment centres")
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "summary.json").is_file():
        # the generated dataset replaces the folder: never one that holds someone's own data
        raise ActionftError(f"{out_dir} holds files the generator did not write; the generated dataset (synth: true) "
                            "replaces its folder. For your own data set synth: false; for the generated one choose "
                            "an empty or new image_folder")
    tmp_dir = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    (tmp_dir / "frames").mkdir(parents=True)
    (tmp_dir / "videos").mkdir()

    rng = random.Random(seed)
    clips = [
        random_clip(label, f"{label}_{i:04d}", rng) for label in classes for i in range(clips_per_class)
    ]
    splits = stratified_splits([c.label for c in clips], seed, val_per_class, test_per_class)
    step = video_frames // num_frames
    keep = [k * step + step // 2 for k in range(num_frames)]  # frame indices at the segment centres
    records, video_records, rows = [], [], []
    for clip, split in zip(tqdm(clips, desc="render clips", disable=not progress), splits):
        times = [(i + 0.5) / video_frames for i in range(video_frames)]
        frames = [render(clip.state(t), frame_size) for t in times]
        fdir = tmp_dir / "frames" / clip.clip_id
        fdir.mkdir()
        rel_frames = []
        for k, idx in enumerate(keep, start=1):
            Image.fromarray(frames[idx]).save(fdir / f"frame_{k}.jpg", quality=95)
            rel_frames.append(f"frames/{clip.clip_id}/frame_{k}.jpg")
        rel_video = f"videos/{clip.clip_id}.mp4"
        if videos:
            write_video(tmp_dir / rel_video, frames, fps)
        answer_msg = {"role": "assistant", "content": [{"type": "text", "text": clip.answer}]}
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": p} for p in rel_frames]
             + [{"type": "text", "text": prompt}]},
            answer_msg,
        ]})
        video_records.append({"messages": [
            {"role": "user", "content": [{"type": "video", "video": rel_video}, {"type": "text", "text": prompt}]},
            answer_msg,
        ]})
        rows.append({
            "clip_id": clip.clip_id, "split": split, "label": clip.label, "colour": clip.colour,
            "shape": clip.shape, "object": clip.obj, "source": rel_video if videos else "",
            "fps": fps, "duration": video_frames / fps,
            "timestamps": " ".join(f"{(idx + 0.5) / fps:.3f}" for idx in keep),
        })
    (tmp_dir / "data.json").write_text(json.dumps(records, indent=1))
    label_set(classes).write(tmp_dir / "labels.csv")
    if videos:
        (tmp_dir / "data_video.json").write_text(json.dumps(video_records, indent=1))
    with (tmp_dir / "metadata.csv").open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "clips": len(clips), "classes": classes, "frame_size": frame_size, "seed": seed,
        "splits": {s: splits.count(s) for s in ("train", "val", "test")},
    }
    (tmp_dir / "summary.json").write_text(json.dumps(summary, indent=1))
    # Publish atomically: a half-rendered dataset never sits where a notebook would read it.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp_dir, out_dir)
    return summary


def ensure_dataset(out_dir: str | Path, **kwargs) -> Path:
    """Generate the dataset unless `out_dir` already holds one made with the same settings."""
    out_dir = Path(out_dir)
    marker = out_dir / "summary.json"
    wanted = {k: v for k, v in kwargs.items() if k != "progress"}
    if marker.is_file() and (out_dir / "labels.csv").is_file():
        previous = json.loads(marker.read_text()).get("settings")
        if previous == json.loads(json.dumps(wanted)):
            return out_dir
    generate_dataset(out_dir, **kwargs)
    summary = json.loads(marker.read_text())
    summary["settings"] = wanted
    marker.write_text(json.dumps(summary, indent=1))
    return out_dir


# The annotation row notebook 00 adds on purpose: a clip that failed to download, to show the failure report.
MISSING_CLIP = {"file": "videos/grow_9999.mp4", "answer": "The red square grows.", "label": "grow", "split": "train"}


def write_annotations(dataset_dir: str | Path, path: str | Path, max_clips: int = 0,
                      add_missing_clip: bool = False) -> Path:
    """Write a simple annotation CSV (file, answer, label, split) for the generated clips' mp4 files, as
    `actionft prepare` reads it: `max_clips` clips (0: all) taken round robin over the classes, so every class is
    in a subset, listed in the generator's order; with `add_missing_clip`, one more row whose video does not exist
    (MISSING_CLIP)."""
    from actionft.data import clip_id_of, read_metadata, read_records

    dataset_dir = Path(dataset_dir)
    answer_of = {clip_id_of(r["messages"][0]["content"][0]["image"]): r["messages"][1]["content"][0]["text"]
                 for r in read_records(dataset_dir / "data.json")}
    meta = list(read_metadata(dataset_dir / "metadata.csv").values())
    by_label: dict[str, list[int]] = {}
    for i, row in enumerate(meta):
        by_label.setdefault(row["label"], []).append(i)
    spread = [idx[k] for k in range(max(map(len, by_label.values()))) for idx in by_label.values() if k < len(idx)]
    chosen = sorted(spread[:max_clips] if max_clips else spread)  # in the generator's order
    out = [{"file": meta[i]["source"], "answer": answer_of[meta[i]["clip_id"]], "label": meta[i]["label"],
            "split": meta[i]["split"]} for i in chosen]
    if add_missing_clip:
        out.append(dict(MISSING_CLIP))
    path = Path(path)
    with path.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=["file", "answer", "label", "split"])
        writer.writeheader()
        writer.writerows(out)
    return path


def compare_prepared(dataset_dir: str | Path, prepared_dir: str | Path, size: int | None = None) -> list[dict]:
    """Per clip that `actionft prepare` extracted from the generated mp4 files into `prepared_dir`: the frame
    indices both picked, the sample times, and the mean and largest |prepared - generated| pixel difference (0-255)
    of each frame; the generator's frames are resized like prepare's (`size`, None or 0: as they are) first."""
    from PIL import Image

    from actionft.data import read_metadata
    from actionft.frames import resize_center_crop

    dataset_dir, prepared_dir = Path(dataset_dir), Path(prepared_dir)
    generated = read_metadata(dataset_dir / "metadata.csv")
    rows = []
    for m in read_metadata(prepared_dir / "metadata.csv").values():
        g = generated[m["clip_id"]]
        fps = float(g["fps"])
        times = [float(t) for t in m["timestamps"].split()]
        names = sorted(p.name for p in (prepared_dir / "frames" / m["clip_id"]).glob("frame_*.jpg"))
        frame_mean, frame_max, shape, mode = [], [], None, None
        for name in names:
            theirs = Image.open(dataset_dir / "frames" / m["clip_id"] / name).convert("RGB")
            if size:
                theirs = resize_center_crop(theirs, size)
            ours = Image.open(prepared_dir / "frames" / m["clip_id"] / name)
            if ours.size != theirs.size:
                raise ActionftError(f"{m['clip_id']}/{name}: prepared {ours.size} against the generator's "
                                    f"{theirs.size}; pass the size prepare used")
            diff = np.abs(np.asarray(ours.convert("RGB"), dtype=np.int16) - np.asarray(theirs, dtype=np.int16))
            frame_mean.append(float(diff.mean()))
            frame_max.append(int(diff.max()))
            shape, mode = ours.size, ours.mode
        rows.append({
            "clip_id": m["clip_id"], "label": g["label"], "frames": names, "mode": mode,
            "size": shape, "times": times, "duration": float(g["duration"]),
            # the generator records each frame's display-interval centre, (index + 0.5) / fps; prepare records its pts
            "frame_indices": [round(float(t) * fps - 0.5) for t in g["timestamps"].split()],
            "prepared_indices": [round(t * fps) for t in times],
            "frame_mean_diff": frame_mean, "frame_max_diff": frame_max,
            "mean_diff": float(np.mean(frame_mean)) if frame_mean else float("nan"),
            "max_diff": max(frame_max, default=0),
        })
    return rows


def corpus() -> list[str]:
    """Every sentence the synthetic tasks use: what the tiny tokenizer is trained on."""
    lines = [DEFAULT_PROMPT]
    for colour in COLOURS:
        for shape in SHAPES:
            obj = f"{colour} {shape}"
            for cls in CLASSES.values():
                lines += [t.format(obj=obj) for t in cls.templates]
    return lines


def add_parser(sub: argparse._SubParsersAction) -> None:
    from actionft.params import add_params_args

    p = sub.add_parser("synth", help="generate the embedded action dataset (videos, frames, JSON, metadata)")
    p.add_argument("--out", required=True, help="output folder")
    add_params_args(p)
    p.set_defaults(func=_cli_synth)


def _cli_synth(args: argparse.Namespace) -> int:
    from actionft.params import params_from_args

    from actionft import config

    cfg = config.validate(params_from_args(args))
    summary = generate_dataset(args.out, num_frames=cfg["num_frames"], **settings(cfg))
    print(json.dumps(summary, indent=1))
    return 0

