"""Reference-format datasets: loading, validation and deterministic splits.

A dataset is a JSON list of `{"messages": [user, assistant]}` records (exactly the Kinetics-3K format): the user turn
holds image items (`{"type": "image", "image": "frames/<clip>/frame_1.jpg"}`) or one video item
(`{"type": "video", "video": "clip.mp4"}`) and a text item with the question; the assistant turn holds one text item,
the answer. Paths are relative to an image folder. Optional per-sample metadata (label, split, source, ...) lives in
a CSV beside it, keyed by clip id, so the JSON stays exactly in the reference format.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import json
import statistics
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actionft.errors import ActionftError

SPLITS = ("train", "val", "test")


@dataclass
class Sample:
    """One clip with its question and answer; frame and video paths are absolute."""

    index: int
    clip_id: str
    prompt: str
    answer: str
    frames: list[Path] = field(default_factory=list)
    video: Path | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str | None:
        return self.meta.get("label") or None

    @property
    def split(self) -> str | None:
        return self.meta.get("split") or None

    def messages(self, with_answer: bool = True) -> list[dict]:
        """The conversation in the reference format, with absolute media paths."""
        content: list[dict] = [{"type": "image", "image": str(p)} for p in self.frames]
        if self.video is not None:
            content.append({"type": "video", "video": str(self.video)})
        content.append({"type": "text", "text": self.prompt})
        msgs = [{"role": "user", "content": content}]
        if with_answer:
            msgs.append({"role": "assistant", "content": [{"type": "text", "text": self.answer}]})
        return msgs


@dataclass
class Problem:
    index: int
    path: str
    reason: str

    def __str__(self) -> str:
        where = f" {self.path}" if self.path else ""
        return f"sample {self.index}{where}: {self.reason}"


@dataclass
class Report:
    """What `validate_dataset` found: counts, sizes, answer lengths and every problem."""

    data_path: str
    n_records: int = 0
    n_valid: int = 0
    n_frames: int = 0
    n_videos: int = 0
    image_sizes: Counter = field(default_factory=Counter)
    answer_words: list[int] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> dict[str, Any]:
        words = self.answer_words or [0]
        return {
            "samples": self.n_records,
            "valid_samples": self.n_valid,
            "bad_samples": len({p.index for p in self.problems}),
            "frames": self.n_frames,
            "videos": self.n_videos,
            "image_sizes": {f"{w}x{h}": n for (w, h), n in sorted(self.image_sizes.items())},
            "answer_words": {
                "min": min(words), "mean": round(statistics.fmean(words), 2), "max": max(words),
            },
            "problems": len(self.problems),
        }

    def format(self, max_problems: int = 50) -> str:
        s = self.summary()
        lines = [
            f"{self.data_path}",
            f"  samples: {s['samples']}  valid: {s['valid_samples']}  bad: {s['bad_samples']}",
            f"  frames: {s['frames']}  videos: {s['videos']}",
            "  image sizes: " + (", ".join(f"{k} ({v})" for k, v in s["image_sizes"].items()) or "-"),
            "  answer words: min {min}  mean {mean}  max {max}".format(**s["answer_words"]),
            f"  problems: {s['problems']}",
        ]
        lines += [f"    {p}" for p in self.problems[:max_problems]]
        if len(self.problems) > max_problems:
            lines.append(f"    ... and {len(self.problems) - max_problems} more")
        return "\n".join(lines)


def read_records(data_path: str | Path) -> list[Any]:
    """The raw JSON list of a reference-format dataset file."""
    data_path = Path(data_path)
    text = read_text_file(data_path, "dataset file", "give the path of the dataset JSON (e.g. data.json)")
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        raise ActionftError(f"{data_path} is not valid JSON: {err}") from None
    if not isinstance(records, list):
        raise ActionftError(f"{data_path} must hold a JSON list of {{'messages': [...]}} records")
    return records


def read_text_file(path: Path, what: str, fix: str = "") -> str:
    """The UTF-8 text of a file the user named, or a one-line error: missing, a folder, unreadable, not UTF-8."""
    fix = f"; {fix}" if fix else ""
    if path.is_dir():
        raise ActionftError(f"{what} {path} is a folder, not a file{fix}")
    if not path.is_file():
        raise ActionftError(f"{what} {path} does not exist{fix}")
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise ActionftError(f"{what} {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as UTF-8"
                            ) from None
    except OSError as err:
        raise ActionftError(f"{what} {path} cannot be read ({err.strerror or err})") from None


def clip_id_of(media_path: str) -> str:
    """Kinetics naming: frames live in `frames/<clip_id>/frame_k.jpg`; a video item is `<clip_id>.<ext>`."""
    p = Path(media_path)
    return p.parent.name if p.suffix.lower() in {".jpg", ".jpeg", ".png", ".webp", ".bmp"} else p.stem


def _resolve(image_folder: Path, rel: Any) -> tuple[Path | None, str]:
    """Absolute path inside `image_folder`, or None and why not."""
    if not isinstance(rel, str) or not rel.strip():
        return None, "media path is missing or not a string"
    if Path(rel).is_absolute():
        return None, "absolute path; paths must be relative to the image folder"
    root = image_folder.resolve()
    path = (root / rel).resolve()
    if not path.is_relative_to(root):
        return None, "path escapes the image folder (contains '..' or a link outside it)"
    return path, ""


def parse_record(record: Any, index: int, image_folder: Path) -> tuple[Sample | None, list[Problem]]:
    """Structure checks for one record (roles, answer, media paths); no file is opened."""
    problems: list[Problem] = []

    def bad(reason: str, path: str = "") -> tuple[None, list[Problem]]:
        problems.append(Problem(index, path, reason))
        return None, problems

    if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
        return bad("record is not an object with a 'messages' list")
    msgs = record["messages"]
    roles = [m.get("role") if isinstance(m, dict) else None for m in msgs]
    if roles != ["user", "assistant"]:
        return bad(f"roles must be ['user', 'assistant'], got {roles}")
    user, assistant = msgs
    if not isinstance(user.get("content"), list) or not isinstance(assistant.get("content"), list):
        return bad("message 'content' must be a list of items")

    answers = [i.get("text") for i in assistant["content"] if isinstance(i, dict) and i.get("type") == "text"]
    if len(answers) != 1:
        return bad(f"the assistant turn must hold exactly one text item, found {len(answers)}")
    answer = answers[0]
    if not isinstance(answer, str) or not answer.strip():
        return bad("the answer is empty")

    texts, images, videos = [], [], []
    for item in user["content"]:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            texts.append(item.get("text"))
        elif kind == "image":
            images.append(item.get("image", item.get("path")))
        elif kind == "video":
            videos.append(item.get("video", item.get("path")))
        else:
            problems.append(Problem(index, "", f"unknown user content item {item!r}"))
    prompt = " ".join(t.strip() for t in texts if isinstance(t, str)).strip()
    if not prompt:
        problems.append(Problem(index, "", "the user turn has no question text"))
    if images and videos:
        problems.append(Problem(index, "", "mixes image and video items; use one or the other"))
    if not images and not videos:
        problems.append(Problem(index, "", "the user turn has no image or video item"))
    if len(videos) > 1:
        problems.append(Problem(index, "", f"{len(videos)} video items; one per sample is supported"))

    frames: list[Path] = []
    for rel in images:
        path, why = _resolve(image_folder, rel)
        if path is None:
            problems.append(Problem(index, str(rel), why))
        else:
            frames.append(path)
    video = None
    for rel in videos[:1]:
        video, why = _resolve(image_folder, rel)
        if video is None:
            problems.append(Problem(index, str(rel), why))
    if problems:
        return None, problems
    first = images[0] if images else videos[0]
    return Sample(index, clip_id_of(first), prompt, answer.strip(), frames, video), problems


def check_media(sample: Sample, expected_frames: int | None, image_sizes: Counter | None = None) -> list[Problem]:
    """Open every frame (or probe the video) of a parsed sample."""
    from PIL import Image, UnidentifiedImageError

    problems: list[Problem] = []
    if sample.frames and expected_frames and len(sample.frames) != expected_frames:
        problems.append(
            Problem(sample.index, "", f"{len(sample.frames)} frames, expected {expected_frames} (set num_frames)")
        )
    for path in sample.frames:
        if not path.is_file():
            problems.append(Problem(sample.index, str(path), "frame file does not exist"))
            continue
        try:
            with Image.open(path) as im:
                im.load()
                rgb = im.convert("RGB")
            if image_sizes is not None:
                image_sizes[rgb.size] += 1
        except Image.DecompressionBombError as err:
            problems.append(Problem(sample.index, str(path), f"image too large to open safely ({err}); resize it"))
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
            problems.append(Problem(sample.index, str(path), f"cannot be read as an image ({err})"))
    if sample.video is not None:
        from actionft.frames import probe_video

        if not sample.video.is_file():
            problems.append(Problem(sample.index, str(sample.video), "video file does not exist"))
        else:
            try:
                probe_video(sample.video)
            except ActionftError as err:
                problems.append(Problem(sample.index, str(sample.video), str(err)))
    return problems


KINETICS_COLUMNS = {"label", "youtube_id", "time_start", "time_end"}


def kinetics_clip_id(youtube_id: str, time_start, time_end) -> str:
    """Kinetics clip naming: `<youtube_id>_<start:06d>_<end:06d>` (seconds; the CSVs write them as 10 or 10.0)."""
    return f"{youtube_id.strip()}_{int(float(time_start)):06d}_{int(float(time_end)):06d}"


def read_metadata(path: str | Path | None) -> dict[str, dict[str, str]]:
    """Per-clip metadata CSV -> {clip_id: row}: a CSV with a `clip_id` column, or a Kinetics annotation CSV
    (`label,youtube_id,time_start,time_end[,split]`) joined on the Kinetics clip id. Kinetics' own split is kept
    as `kinetics_split`: the held-out split stays the seeded hash split."""
    if not path:
        return {}
    path = Path(path)
    text = read_text_file(path, "metadata file", "set metadata_path: null to go without")
    try:
        rows = list(csv.DictReader(io.StringIO(text, newline="")))
    except csv.Error as err:
        raise ActionftError(f"metadata file {path} cannot be read as CSV: {err}") from None
    if not rows or "clip_id" in rows[0]:
        return {row["clip_id"]: row for row in rows}
    if not KINETICS_COLUMNS <= set(rows[0]):
        raise ActionftError(f"metadata file {path} needs a 'clip_id' column (or the Kinetics columns "
                            f"{sorted(KINETICS_COLUMNS)}), found {list(rows[0])}")
    out = {}
    for n, row in enumerate(rows, start=2):  # line numbers as an editor shows them, the header being line 1
        try:
            clip_id = kinetics_clip_id(row["youtube_id"], row["time_start"], row["time_end"])
        except (TypeError, ValueError):
            raise ActionftError(f"metadata file {path}, line {n}: time_start/time_end are not numbers "
                                f"({row['time_start']!r}, {row['time_end']!r})") from None
        meta = {k: v for k, v in row.items() if k != "split"}
        if row.get("split"):
            meta["kinetics_split"] = row["split"]
        out[clip_id] = {"clip_id": clip_id, **meta}
    return out


def assign_split(clip_id: str, seed: int, val_fraction: float, test_fraction: float) -> str:
    """A split from a hash of (seed, clip id): stable when the dataset grows or is reordered."""
    h = int(hashlib.sha256(f"{seed}:{clip_id}".encode()).hexdigest()[:12], 16) / 16**12
    if h < test_fraction:
        return "test"
    if h < test_fraction + val_fraction:
        return "val"
    return "train"


def validate_dataset(
    data_path: str | Path, image_folder: str | Path, expected_frames: int | None = 4, progress: bool = True
) -> tuple[list[Sample], Report]:
    """Check every record and every frame; return the good samples and a report of the rest."""
    from tqdm.auto import tqdm

    image_folder = Path(image_folder)
    if not image_folder.is_dir():
        raise ActionftError(f"image folder {image_folder} does not exist")
    records = read_records(data_path)
    report = Report(str(data_path), n_records=len(records))
    good: list[Sample] = []
    for index, record in enumerate(tqdm(records, desc="validate", disable=not progress, leave=False)):
        sample, problems = parse_record(record, index, image_folder)
        if sample is not None:
            problems = check_media(sample, expected_frames, report.image_sizes)
            report.n_frames += len(sample.frames)
            report.n_videos += sample.video is not None
            report.answer_words.append(len(sample.answer.split()))
        report.problems.extend(problems)
        if sample is not None and not problems:
            good.append(sample)
    report.n_valid = len(good)
    return good, report


def load_dataset(
    data_path: str | Path,
    image_folder: str | Path,
    metadata_path: str | Path | None = None,
    num_frames: int | None = 4,
    skip_bad: bool = False,
    check_files: bool = True,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
) -> list[Sample]:
    """Load a dataset, attach metadata and a split to every sample.

    Bad samples raise with the full list of problems, or with `skip_bad=True` are left out and reported.
    Samples without a split in the metadata get one from `assign_split`.
    """
    if check_files:
        samples, report = validate_dataset(data_path, image_folder, num_frames, progress=progress)
    else:
        report = Report(str(data_path))
        samples = []
        for index, record in enumerate(read_records(data_path)):
            sample, problems = parse_record(record, index, Path(image_folder))
            report.problems.extend(problems)
            if sample is not None:
                samples.append(sample)
    if report.problems:
        if not skip_bad:
            raise ActionftError(
                f"{len(report.problems)} problem(s) in {data_path}; fix them or load with skip_bad=True:\n"
                + "\n".join(f"  {p}" for p in report.problems[:20])
            )
        print(f"skipped {len({p.index for p in report.problems})} bad sample(s) of {data_path}:")
        for p in report.problems[:20]:
            print(f"  {p}")
    metadata = read_metadata(metadata_path)
    for s in samples:
        s.meta = dict(metadata.get(s.clip_id, {}))
        if s.meta.get("split") not in SPLITS:
            s.meta["split"] = assign_split(s.clip_id, split_seed, val_fraction, test_fraction)
    return samples


def select_split(samples: list[Sample], split: str | None) -> list[Sample]:
    """The samples of one split (`None` or 'all' keeps everything)."""
    if split in (None, "all"):
        return list(samples)
    if split not in SPLITS:
        raise ActionftError(f"unknown split {split!r}; use one of {SPLITS} or 'all'")
    return [s for s in samples if s.split == split]


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("validate", help="check a reference-format dataset and every frame it points to")
    p.add_argument("data_json", help="dataset JSON (a list of {'messages': [...]} records)")
    p.add_argument("--image-folder", required=True, help="folder the media paths are relative to")
    p.add_argument("--num-frames", type=int, default=4, help="frames expected per image sample (0: any)")
    p.add_argument("--json", dest="json_out", metavar="FILE", help="also write the summary and problems as JSON")
    p.set_defaults(func=_cli_validate)


def _cli_validate(args: argparse.Namespace) -> int:
    _, report = validate_dataset(args.data_json, args.image_folder, args.num_frames or None)
    print(report.format())
    if args.json_out:
        out = {**report.summary(), "problem_list": [vars(p) for p in report.problems]}
        Path(args.json_out).write_text(json.dumps(out, indent=2))
    return 0 if report.ok else 1
