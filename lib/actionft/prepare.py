"""`actionft prepare`: build a frame dataset in the reference format from a folder of raw videos.

Annotations come in one of two kinds, told apart by their columns:

* a Kinetics annotation CSV (`label,youtube_id,time_start,time_end[,split]`): clip `<youtube_id>_<start:06d>_<end:06d>`
  is looked up by that name (any video extension) anywhere under the video folder, flat or in per-label folders.
  Kinetics has no captions, so the answer is built from the label with `answer_template` (default
  `"The video shows {label}."`); a `caption`/`answer` column, when present, wins. Split `validate` means `val`.
* a simple CSV or JSON: a `clip_id`, `clip` or `file` column (a file name, a path relative to the video folder or a
  bare clip id) and an `answer` or `caption` column (JSON: `answers` may be a list); optional `label` and `split`.
  Several rows for one clip give several answers, i.e. several records. A row without an answer but with a label
  gets the `answer_template` sentence.

The output folder holds `frames/<clip_id>/frame_<k>.jpg` (k = 1..num_frames), `data.json` in exactly the reference
format (one record per clip and answer), `metadata.csv` (clip_id, split, label, source, fps, duration, timestamps,
width, height) and `failures.csv` (clip_id, source, reason). Splits come from the annotations, else from
`actionft.data.assign_split`.

A run is interruptible and re-runnable: each clip's frames are written to a temporary folder with a `done.json`
sidecar and renamed into place in one step, so `frames/<clip_id>` is either complete or absent; clips whose folder is
complete (same frame count, size and quality, same source file) are skipped on the next run. data.json, metadata.csv
and failures.csv are written only at the end, each through a temporary file and `os.replace`; data.json and
metadata.csv are removed at the start of a run that is going to replace existing clip folders (other settings, or a
changed video), so no record ever points at a missing frame. A bad video never stops the run: it gets one row in
failures.csv. Clip ids become folder names, so they must be unique across the video folder.

Nothing prepare did not write is ever overwritten or deleted. Its output folder carries a marker,
`.actionft-prepare.json` (the settings of the last run); a non-empty `--out` without it (an existing dataset, say) is
refused unless `--overwrite` is given, and so is a `frames/<clip_id>` folder without prepare's `done.json`. A full
disk or an output folder that cannot be written stops the run with one line; SIGTERM (like Ctrl-C) stops the worker
processes too, and the finished clips are kept for the next run.
"""

from __future__ import annotations

import argparse
import csv
import errno
import inspect
import json
import os
import shutil
import signal
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from actionft import DEFAULT_PROMPT
from actionft.data import KINETICS_COLUMNS, SPLITS, assign_split, kinetics_clip_id
from actionft.errors import ActionftError, os_error
from actionft.frames import parse_size

ANSWER_TEMPLATE = "The video shows {label}."
VIDEO_EXTENSIONS = {
    ".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".flv", ".wmv", ".3gp", ".ts", ".ogv",
}
SIDECAR = "done.json"
DATA_JSON, METADATA_CSV, FAILURES_CSV = "data.json", "metadata.csv", "failures.csv"
METADATA_COLUMNS = ["clip_id", "split", "label", "source", "fps", "duration", "timestamps", "width", "height"]
FAILURE_COLUMNS = ["clip_id", "source", "reason"]
_SPLIT_NAMES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validate": "val",
                "validation": "val", "test": "test", "testing": "test"}
_SIDECAR_VERSION = 1
MARKER = ".actionft-prepare.json"  # marks a folder as prepare's output
_MARKER_VERSION = 1
# Errors of the output disk, not of one clip: they stop the run instead of failing every clip in turn.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", errno.ENOSPC)}


# ---------------------------------------------------------------------------------------------------------------
# annotations


@dataclass
class ClipSpec:
    """One clip as the annotations describe it."""

    clip_id: str
    answers: list[str] = field(default_factory=list)
    label: str = ""
    split: str = ""
    file: str = ""  # as written in the annotations ('' -> look the clip id up)
    row: int = 0  # first annotation row, 1-based (CSV: data rows; JSON: list items)
    problem: str = ""  # why the clip can't be prepared (set while reading the annotations)
    problem_kind: str = ""


def _norm_split(value: Any) -> str:
    return _SPLIT_NAMES.get(str(value or "").strip().lower(), "")


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()


def _valid_clip_id(clip_id: str) -> bool:
    return bool(clip_id) and not clip_id.startswith(".") and not any(c in clip_id for c in "/\\\0")


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.is_dir():
        raise ActionftError(f"annotation file {path} is a folder, not a file; give the annotation CSV or JSON")
    if not path.is_file():
        raise ActionftError(f"annotation file {path} does not exist")
    if path.suffix.lower() == ".json":
        try:
            rows = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ActionftError(f"annotation file {path} is not valid JSON: {err}") from None
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise ActionftError(f"annotation file {path} must hold a JSON list of objects (one per clip or answer)")
    else:
        try:
            with path.open(newline="", encoding="utf-8-sig") as fh:
                rows = list(csv.DictReader(fh))
        except (UnicodeDecodeError, csv.Error) as err:
            raise ActionftError(f"annotation file {path} cannot be read as CSV: {err}") from None
    if not rows:
        raise ActionftError(f"annotation file {path} has no rows")
    return [{_text(k).lower(): v for k, v in row.items() if k is not None} for row in rows]


def annotation_kind(columns: set[str]) -> str:
    """'kinetics' or 'simple' from the column names; raises when neither fits."""
    if KINETICS_COLUMNS <= columns:
        return "kinetics"
    if columns & {"clip_id", "clip", "file"}:
        return "simple"
    raise ActionftError(
        f"cannot tell the annotation kind from its columns {sorted(columns)}: expected a Kinetics CSV "
        f"(label,youtube_id,time_start,time_end[,split]) or a clip_id/clip/file column with answer/caption "
        f"(and optional label, split)"
    )


def load_annotations(path: str | Path, answer_template: str = ANSWER_TEMPLATE) -> tuple[str, list[ClipSpec]]:
    """Read a Kinetics CSV or a simple CSV/JSON into one `ClipSpec` per clip, in first-appearance order."""
    path = Path(path)
    rows = _read_rows(path)
    columns = set().union(*(r.keys() for r in rows))
    kind = annotation_kind(columns)
    if kind == "simple" and not columns & {"answer", "answers", "caption", "captions", "label"}:
        raise ActionftError(
            f"annotation file {path} has no answer, caption or label column; add one (the answer text per clip)"
        )
    specs: dict[str, ClipSpec] = {}
    for n, row in enumerate(rows, start=1):
        label = _text(row.get("label"))
        if kind == "kinetics":
            try:
                clip_id = kinetics_clip_id(_text(row.get("youtube_id")), row["time_start"], row["time_end"])
            except (TypeError, ValueError):
                yid = _text(row.get("youtube_id")) or f"row{n}"
                spec = specs.setdefault(yid, ClipSpec(yid, label=label, row=n))
                spec.problem = f"annotation row {n}: time_start/time_end are not numbers"
                spec.problem_kind = "bad annotation"
                continue
            file = ""
        else:
            file = _text(row.get("file")) or _text(row.get("clip"))
            clip_id = _text(row.get("clip_id")) or (Path(file).stem if file else "")
        answers: list[str] = []
        for key in ("answers", "answer", "captions", "caption"):
            value = row.get(key)
            if isinstance(value, list):
                answers += [_text(v) for v in value if _text(v)]
            elif _text(value):
                answers.append(_text(value))
        if not answers and label:
            answers.append(answer_template.format(label=label))
        spec = specs.get(clip_id)
        if spec is None:
            spec = ClipSpec(clip_id, label=label, split=_norm_split(row.get("split")), file=file, row=n)
            specs[clip_id] = spec
            if not _valid_clip_id(clip_id):
                spec.problem = (
                    f"annotation row {n}: clip id {clip_id!r} cannot be a folder name (empty, starts with '.', or "
                    f"contains a slash)"
                )
                spec.problem_kind = "bad annotation"
        elif file and spec.file and Path(file) != Path(spec.file):
            spec.problem = (
                f"annotation row {n}: clip id {clip_id!r} names two videos ({spec.file} and {file}); clip ids "
                f"(file names without extension) must be unique"
            )
            spec.problem_kind = "duplicate clip id"
        spec.label = spec.label or label
        spec.split = spec.split or _norm_split(row.get("split"))
        spec.answers += [a for a in answers if a not in spec.answers]
    for spec in specs.values():
        if not spec.answers and not spec.problem:
            spec.problem = f"annotation row {spec.row}: clip {spec.clip_id} has no answer/caption and no label"
            spec.problem_kind = "bad annotation"
    return kind, list(specs.values())


# ---------------------------------------------------------------------------------------------------------------
# finding the videos


class VideoIndex:
    """Every video file under a folder, by name and by stem (one walk, skipping hidden folders and `exclude`)."""

    def __init__(self, root: Path, exclude: Path | None = None):
        self.root = root
        self.by_stem: dict[str, list[str]] = {}
        self.by_name: dict[str, list[str]] = {}
        exclude = exclude.resolve() if exclude else None
        for dirpath, dirnames, filenames in os.walk(root):
            here = Path(dirpath)
            dirnames[:] = sorted(
                d for d in dirnames if not d.startswith(".") and (exclude is None or (here / d).resolve() != exclude)
            )
            for name in sorted(filenames):
                if Path(name).suffix.lower() in VIDEO_EXTENSIONS:
                    rel = (here / name).relative_to(root).as_posix()
                    self.by_stem.setdefault(Path(name).stem, []).append(rel)
                    self.by_name.setdefault(name, []).append(rel)

    def resolve(self, spec: ClipSpec) -> tuple[str | None, str]:
        """The video's path relative to the root, or None and why not."""
        if spec.file:
            direct = self.root / spec.file
            if direct.is_file():
                return Path(spec.file).as_posix(), ""
            name = Path(spec.file).name
            found = self.by_name.get(name) or ([] if Path(name).suffix else self.by_stem.get(name, []))
        else:
            found = self.by_stem.get(spec.clip_id, [])
        if len(found) > 1 and spec.label:  # Kinetics per-label folders: prefer the one in the label's folder
            in_label = [f for f in found if Path(f).parent.name in (spec.label, spec.label.replace(" ", "_"))]
            found = in_label or found
        if len(found) == 1:
            return found[0], ""
        wanted = spec.file or f"{spec.clip_id}.*"
        if not found:
            return None, f"video file {wanted} not found under {self.root}"
        return None, f"{len(found)} videos match {wanted} under {self.root} ({', '.join(found[:3])}); make names unique"


# ---------------------------------------------------------------------------------------------------------------
# per-clip work (runs in worker processes)


@dataclass
class ClipResult:
    clip_id: str
    source: str
    ok: bool
    skipped: bool = False
    reason: str = ""
    kind: str = ""
    fps: float | None = None
    duration: float | None = None
    timestamps: list[float] = field(default_factory=list)
    width: int | None = None
    height: int | None = None


def _source_stamp(path: Path) -> dict[str, int]:
    st = path.stat()
    return {"source_bytes": st.st_size, "source_mtime_ns": st.st_mtime_ns}


def _frame_names(num_frames: int) -> list[str]:
    return [f"frame_{k}.jpg" for k in range(1, num_frames + 1)]


def _extract(task: dict[str, Any]) -> ClipResult:
    """Read the frames of one clip and move its finished folder into place; never raises for a bad video."""
    from actionft.frames import VideoError, read_frames

    clip_id, source = task["clip_id"], task["source"]
    frames_dir = Path(task["frames_dir"])
    video = Path(task["video"])
    tmp = frames_dir / f".tmp-{clip_id}-{os.getpid()}"
    try:
        images, times, info = read_frames(video, task["num_frames"], task["size"], threads=task.get("threads"))
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        for name, img in zip(_frame_names(task["num_frames"]), images):
            img.save(tmp / name, format="JPEG", quality=task["jpeg_quality"])
        result = ClipResult(
            clip_id, source, True, fps=round(info.fps, 3) if info.fps else None, duration=round(info.duration, 3),
            timestamps=[round(t, 3) for t in times], width=info.width, height=info.height,
        )
        sidecar = {
            "version": _SIDECAR_VERSION, "clip_id": clip_id, "source": source, **_source_stamp(video),
            "num_frames": task["num_frames"], "size": task["size"], "jpeg_quality": task["jpeg_quality"],
            **{k: getattr(result, k) for k in ("fps", "duration", "timestamps", "width", "height")},
            "codec": info.codec,
        }
        (tmp / SIDECAR).write_text(json.dumps(sidecar, indent=1))  # written last: the folder is complete
        final = frames_dir / clip_id
        if final.exists():
            old = frames_dir / f".old-{clip_id}-{os.getpid()}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        return result
    except VideoError as err:
        return ClipResult(clip_id, source, False, reason=str(err), kind=err.kind)
    except OSError as err:
        if err.errno in _WRITE_ERRNOS:  # the output disk, not this clip: stop the run (the parent reports it)
            raise os_error(err, f"cannot write the frames of clip {clip_id}") from None
        return ClipResult(clip_id, source, False, reason=f"unexpected error on {video}: {type(err).__name__}: {err}",
                          kind="unexpected error")
    except ActionftError as err:
        return ClipResult(clip_id, source, False, reason=str(err), kind="unreadable")
    except Exception as err:  # one odd file must not stop a long run
        return ClipResult(clip_id, source, False, reason=f"unexpected error on {video}: {type(err).__name__}: {err}",
                          kind="unexpected error")
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _done(frames_dir: Path, clip_id: str, settings: dict[str, Any], source: str | None,
          video: Path | None) -> ClipResult | None:
    """The recorded result when the clip's folder is complete for these settings and this source, else None."""
    folder = frames_dir / clip_id
    try:
        meta = json.loads((folder / SIDECAR).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != _SIDECAR_VERSION:
        return None
    if any(meta.get(k) != v for k, v in settings.items()):
        return None
    if not all((folder / name).is_file() for name in _frame_names(settings["num_frames"])):
        return None
    if source is not None:
        if meta.get("source") != source:
            return None
        try:
            if any(meta.get(k) != v for k, v in _source_stamp(video).items()):
                return None  # the video changed since
        except OSError:
            return None
    return ClipResult(
        clip_id, meta.get("source", source or ""), True, skipped=True, fps=meta.get("fps"),
        duration=meta.get("duration"), timestamps=list(meta.get("timestamps") or []), width=meta.get("width"),
        height=meta.get("height"),
    )


POOL_DECODER_THREADS = 1  # decoder threads in each worker process (None: FFmpeg's choice)


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops the pool
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's handler (forked): SIGTERM ends a worker
    if sys.platform.startswith("linux"):
        # Should the parent die without stopping the pool (SIGKILL), the kernel sends each worker SIGTERM.
        try:
            import ctypes

            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass


def _stop_pool(pool) -> None:
    """Cancel what has not started and end the workers now (their half-written .tmp folders are swept next run)."""
    processes = list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    for proc in processes:
        if proc.is_alive():
            proc.terminate()
    for proc in processes:
        proc.join(10)


class Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception in the parent so the pool is stopped on the way out."""


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


def _run(tasks: list[dict[str, Any]], workers: int, progress: bool) -> list[ClipResult]:
    from tqdm.auto import tqdm

    results: list[ClipResult] = []
    bar = tqdm(total=len(tasks), desc="prepare", unit="clip", disable=not progress or not tasks)
    failed = 0

    def done(r: ClipResult) -> None:
        nonlocal failed
        results.append(r)
        failed += not r.ok
        bar.update(1)
        if failed:
            bar.set_postfix(failed=failed, refresh=False)

    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                done(_extract(task))
        else:
            from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

            pool = ProcessPoolExecutor(max_workers=workers, initializer=_worker_init)
            try:
                pending: set = set()
                queue = iter(tasks)
                for task in queue:
                    # Workers keep the cores busy: a single-threaded decoder does the same work with less CPU.
                    pending.add(pool.submit(_extract, {**task, "threads": POOL_DECODER_THREADS}))
                    if len(pending) >= 4 * workers:  # bounded: memory stays flat for huge datasets
                        finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                        for fut in finished:
                            done(fut.result())
                while pending:
                    finished, pending = wait(pending, return_when=FIRST_COMPLETED)
                    for fut in finished:
                        done(fut.result())
            except BaseException:
                _stop_pool(pool)
                raise
            pool.shutdown(wait=True)
    finally:
        bar.close()
    return results


# ---------------------------------------------------------------------------------------------------------------
# the whole run


@dataclass
class PrepareReport:
    """What a run did: clips prepared now, skipped (already done), failed (one row each in failures.csv)."""

    out_dir: str
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    records: int = 0
    reasons: Counter = field(default_factory=Counter)
    failures: list[dict[str, str]] = field(default_factory=list)

    @property
    def clips(self) -> int:
        return self.ok + self.skipped + self.failed

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def format(self) -> str:
        out = Path(self.out_dir)
        lines = [
            f"prepared {out}: {self.ok + self.skipped} of {self.clips} clips ready ({self.ok} new, {self.skipped} "
            f"already done), {self.failed} failed, {self.records} records in {out / DATA_JSON}",
        ]
        if self.failed:
            lines.append("  failures: " + ", ".join(f"{k} {n}" for k, n in self.reasons.most_common()))
            lines.append(f"  one row per failed clip in {out / FAILURES_CSV}")
        return "\n".join(lines)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with tmp.open("w", newline="", encoding="utf-8") as fh:
            write(fh)
        os.replace(tmp, path)
    except OSError as err:
        raise os_error(err, f"cannot write {path.name} in") from None
    finally:
        if tmp.exists():
            tmp.unlink()


def _is_own_clip_folder(folder: Path) -> bool:
    """Written by prepare: its `done.json` (a folder is renamed into place only once that is written)."""
    return (folder / SIDECAR).is_file()


def _claim_output(out_dir: Path, settings: dict[str, Any], overwrite: bool) -> None:
    """Make `out_dir` prepare's output folder, or refuse: never write over what prepare did not write.

    An empty or new folder, or one with the marker, is prepare's. A folder written by a version without the marker
    counts as prepare's when it holds only prepare's files and every clip folder has its `done.json`. Anything else
    needs `overwrite`.
    """
    if out_dir.exists() and not out_dir.is_dir():
        raise ActionftError(f"output folder {out_dir} is a file, not a folder; choose another --out")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        entries = sorted(p.name for p in out_dir.iterdir())
    except OSError as err:
        raise os_error(err, "cannot create the output folder") from None
    frames_dir = out_dir / "frames"
    clip_folders = [p for p in frames_dir.iterdir() if not p.name.startswith(".")] if frames_dir.is_dir() else []
    foreign_clips = [p for p in clip_folders if not _is_own_clip_folder(p)]
    ours = {"frames", DATA_JSON, METADATA_CSV, FAILURES_CSV}
    own = (out_dir / MARKER).is_file() or (
        all(e in ours or any(e.startswith(f".{name}.tmp-") for name in ours) for e in entries)
        and frames_dir.is_dir() and not foreign_clips
    )
    if entries and not own and not overwrite:
        shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
        raise ActionftError(
            f"output folder {out_dir} is not empty ({shown}) and was not written by actionft prepare; choose an "
            f"empty or new --out, or pass --overwrite to write data.json, metadata.csv and frames/ into it anyway"
        )
    if foreign_clips and not overwrite:
        shown = ", ".join(p.name for p in foreign_clips[:3]) + (", ..." if len(foreign_clips) > 3 else "")
        raise ActionftError(
            f"{frames_dir} holds {len(foreign_clips)} folder(s) that actionft prepare did not write ({shown}: no "
            f"{SIDECAR}); move them away, or pass --overwrite to let prepare replace the ones it needs"
        )
    marker = {"tool": "actionft prepare", "version": _MARKER_VERSION, "settings": settings}
    _write_atomic(out_dir / MARKER, lambda fh: fh.write(json.dumps(marker, indent=1) + "\n"))


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> None:
    def write(fh):
        w = csv.DictWriter(fh, fieldnames=columns)
        w.writeheader()
        w.writerows(rows)

    _write_atomic(path, write)


def record(clip_id: str, num_frames: int, question: str, answer: str) -> dict[str, Any]:
    """One reference-format record; frame paths are relative to the output folder."""
    content: list[dict[str, str]] = [
        {"type": "image", "image": f"frames/{clip_id}/{name}"} for name in _frame_names(num_frames)
    ]
    content.append({"type": "text", "text": question})
    return {"messages": [
        {"role": "user", "content": content},
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
    ]}


def _default_workers() -> int:
    return max(1, min(4, os.cpu_count() or 1))


def prepare_dataset(
    video_dir: str | Path,
    annotations: str | Path,
    out_dir: str | Path,
    num_frames: int = 4,
    size: int | Sequence[int] | str | None = 336,
    jpeg_quality: int = 90,
    question: str = DEFAULT_PROMPT,
    answer_template: str = ANSWER_TEMPLATE,
    workers: int | None = None,
    split_seed: int = 0,
    val_fraction: float = 0.1,
    test_fraction: float = 0.1,
    progress: bool = True,
    overwrite: bool = False,
) -> PrepareReport:
    """Extract `num_frames` frames per annotated clip into `out_dir` and write data.json, metadata.csv, failures.csv.

    `size`: an int S (resize the short side to S, centre-crop SxS), (h, w) or "HxW" (resize to cover, centre-crop),
    or None (keep the decoded size). `answer_template` builds the answer from the label where the annotations have
    no caption (Kinetics). `workers` processes (default min(4, CPUs); 0 or 1 runs in this process). Splits come from
    the annotations, else `assign_split(clip_id, split_seed, val_fraction, test_fraction)`.
    Raises `ActionftError` for unusable input (no video folder, unreadable annotations, bad parameters); a bad clip
    only adds a row to failures.csv. Rerunning skips clips already done. A non-empty `out_dir` that prepare did not
    write is refused unless `overwrite` (see the module docstring).
    """
    video_dir, out_dir = Path(video_dir), Path(out_dir)
    if not video_dir.is_dir():
        raise ActionftError(f"video folder {video_dir} does not exist")
    num_frames = int(num_frames)
    if num_frames < 1:
        raise ActionftError(f"num_frames must be at least 1, got {num_frames}")
    size_hw = parse_size(size)
    jpeg_quality = int(jpeg_quality)
    if not 1 <= jpeg_quality <= 100:
        raise ActionftError(f"jpeg_quality must be between 1 and 100, got {jpeg_quality}")
    if not str(question).strip():
        raise ActionftError("question must not be empty")
    try:
        answer_template.format(label="x")
    except (KeyError, IndexError, ValueError) as err:
        raise ActionftError(f"answer_template {answer_template!r} must use only {{label}} ({err})") from None
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ActionftError(f"val_fraction {val_fraction} and test_fraction {test_fraction} must be in [0, 1), sum < 1")
    workers = _default_workers() if workers is None else int(workers)

    _, specs = load_annotations(annotations, answer_template)
    settings = {"num_frames": num_frames, "size": list(size_hw) if size_hw else None, "jpeg_quality": jpeg_quality}
    _claim_output(out_dir, settings, overwrite)
    frames_dir = out_dir / "frames"
    try:
        frames_dir.mkdir(exist_ok=True)
    except OSError as err:
        raise os_error(err, "cannot create") from None
    for stale in frames_dir.glob(".tmp-*"):  # left by a killed run
        shutil.rmtree(stale, ignore_errors=True)
    for stale in frames_dir.glob(".old-*"):
        shutil.rmtree(stale, ignore_errors=True)
    index = VideoIndex(video_dir, exclude=out_dir)

    results: dict[str, ClipResult] = {}
    tasks: list[dict[str, Any]] = []
    replaces_existing = False
    for spec in specs:
        if spec.problem:
            results[spec.clip_id] = ClipResult(spec.clip_id, spec.file, False, reason=spec.problem,
                                               kind=spec.problem_kind)
            continue
        source, why = index.resolve(spec)
        video = video_dir / source if source else None
        done = _done(frames_dir, spec.clip_id, settings, source, video)
        if done is not None:
            results[spec.clip_id] = done
        elif source is None:
            results[spec.clip_id] = ClipResult(spec.clip_id, spec.file, False, reason=why, kind="missing")
        else:
            replaces_existing = replaces_existing or (frames_dir / spec.clip_id).exists()
            tasks.append({"clip_id": spec.clip_id, "source": source, "video": str(video),
                          "frames_dir": str(frames_dir), **settings})
    if replaces_existing:
        # Clip folders are about to change under the old data.json: take it away until the new one is written.
        for name in (DATA_JSON, METADATA_CSV):
            (out_dir / name).unlink(missing_ok=True)

    for r in _run(tasks, workers, progress):
        results[r.clip_id] = r

    report = PrepareReport(str(out_dir))
    records, meta_rows, failure_rows = [], [], []
    for spec in specs:
        r = results[spec.clip_id]
        if not r.ok:
            report.failed += 1
            report.reasons[r.kind or "other"] += 1
            failure_rows.append({"clip_id": spec.clip_id, "source": r.source, "reason": r.reason})
            continue
        if r.skipped:
            report.skipped += 1
        else:
            report.ok += 1
        split = spec.split if spec.split in SPLITS else assign_split(spec.clip_id, split_seed, val_fraction,
                                                                     test_fraction)
        meta_rows.append({
            "clip_id": spec.clip_id, "split": split, "label": spec.label, "source": r.source,
            "fps": "" if r.fps is None else r.fps, "duration": r.duration,
            "timestamps": " ".join(f"{t:.3f}" for t in r.timestamps), "width": r.width, "height": r.height,
        })
        records += [record(spec.clip_id, num_frames, question, answer) for answer in spec.answers]
    report.records = len(records)
    report.failures = failure_rows
    _write_csv(out_dir / FAILURES_CSV, FAILURE_COLUMNS, failure_rows)
    _write_csv(out_dir / METADATA_CSV, METADATA_COLUMNS, meta_rows)
    _write_atomic(out_dir / DATA_JSON, lambda fh: fh.write(json.dumps(records, indent=2, ensure_ascii=False) + "\n"))
    return report


# ---------------------------------------------------------------------------------------------------------------
# command line


def add_parser(sub: argparse._SubParsersAction) -> None:
    from actionft.params import add_params_args

    p = sub.add_parser(
        "prepare", help="extract frames from raw videos into a reference-format dataset",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("video_dir", nargs="?", help="folder of videos (searched recursively)")
    p.add_argument("annotations", nargs="?", help="Kinetics CSV, or simple CSV/JSON with clip + answer columns")
    p.add_argument("--out", dest="out_dir", metavar="DIR", help="output folder (frames/, data.json, ...)")
    p.add_argument("--num-frames", type=int, help="frames per clip, at segment centres (default 4)")
    p.add_argument("--size", help="S (short side S, centre crop SxS) or HxW; 0 keeps the video's size (default 336)")
    p.add_argument("--jpeg-quality", type=int, help="JPEG quality 1-100 (default 90)")
    p.add_argument("--question", help="question text of every record (default: actionft.DEFAULT_PROMPT)")
    p.add_argument("--answer-template", help=f"answer built from the label (default {ANSWER_TEMPLATE!r})")
    p.add_argument("--workers", type=int, help="worker processes (default min(4, CPUs); 1: no pool)")
    p.add_argument("--seed", dest="split_seed", type=int, help="seed of the hashed split (default 0)")
    p.add_argument("--val-fraction", type=float, help="hashed split: share of val (default 0.1)")
    p.add_argument("--test-fraction", type=float, help="hashed split: share of test (default 0.1)")
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, help="no progress bar")
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="write into a non-empty folder that prepare did not write (replacing its data.json, "
                        "metadata.csv and the clip folders it needs)")
    add_params_args(p)
    p.set_defaults(func=_cli_prepare)


# prepare_dataset's arguments, in its order: each one is a key of actionft.config (data or prepare section)
PREPARE_ARGS = ("video_dir", "annotations", "out_dir", "num_frames", "size", "jpeg_quality", "question",
                "answer_template", "workers", "split_seed", "val_fraction", "test_fraction", "overwrite")


def _cli_prepare(args: argparse.Namespace) -> int:
    from actionft import config
    from actionft.params import params_from_args

    params = params_from_args(args)
    params.update({name: getattr(args, name) for name in PREPARE_ARGS if getattr(args, name, None) is not None})
    cfg = config.validate(params, sections=("data", "prepare"))  # unknown keys and bad values: one line, no work
    missing = [n for n in ("video_dir", "annotations", "out_dir") if not cfg[n]]
    if missing:
        raise ActionftError(
            f"prepare needs {', '.join(missing)}: `actionft prepare VIDEO_DIR ANNOTATIONS --out DIR` "
            f"(or set them in --params)"
        )
    # the prepare section's None means "prepare_dataset's own default"
    kwargs = {name: cfg[name] for name in PREPARE_ARGS if cfg[name] is not None}
    if args.progress is not None:
        kwargs["progress"] = args.progress
    on_term = signal.signal(signal.SIGTERM, _raise_terminated)  # stop the workers too, not just this process
    try:
        report = prepare_dataset(**kwargs)
    except KeyboardInterrupt as err:
        print("\ninterrupted: finished clips are kept; run the same command again to do the rest", file=sys.stderr)
        return 143 if isinstance(err, Terminated) else 130
    finally:
        signal.signal(signal.SIGTERM, on_term)
    print(report.format())
    return report.exit_code


__all__ = [
    "ANSWER_TEMPLATE", "ClipResult", "ClipSpec", "PrepareReport", "VideoIndex", "annotation_kind",
    "load_annotations", "prepare_dataset", "record",
]
