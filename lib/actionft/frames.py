"""Reading a few frames from a video by seeking, without decoding the whole clip.

`read_frames` takes `num_frames` frames at the centres of equal segments of the clip (`sample_times`). For each
sample time it seeks to the keyframe before it and decodes forward only until the first frame whose presentation
time is at or after the sample time (or the last frame when the time is past the end), so memory holds a few frames
whatever the clip's length. Times come from each frame's pts, so variable frame rate and streams that do not start
at 0 are handled; all times here are seconds from the start of the video stream. When seeking misbehaves the reader
falls back to one sequential pass that keeps only the frames it needs. Frames are turned upright from the stream's
display matrix (phone videos).

Every problem with a file (missing, empty, corrupt, no video stream, unsupported codec, too few frames) raises
`ActionftError` with the file name and what to do.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, Sequence

from actionft.errors import ActionftError

# A frame counts as "at" a sample time when its time is within this many seconds of it (rounding of pts).
_EPS = 1e-6

_FIX = "re-encode it (e.g. `ffmpeg -i IN -c:v libx264 OUT.mp4`) or remove it from the annotations"


@dataclass
class VideoInfo:
    """What `probe_video` found.

    `duration` is in seconds from the first video timestamp (`start`, seconds in the stream's own clock);
    `width`/`height` are as displayed, i.e. after the `rotation` (counter-clockwise degrees from the display
    matrix) has been applied; `fps` is the average frame rate, None when the file doesn't say.
    """

    path: str
    fps: float | None
    duration: float
    width: int
    height: int
    rotation: int
    codec: str
    container: str
    start: float = 0.0


class VideoError(ActionftError):
    """A problem with one video file; `kind` is a short category (used to count failures)."""

    def __init__(self, message: str, kind: str = "unreadable"):
        super().__init__(message)
        self.kind = kind


class _SeekFailed(Exception):
    """Seeking gave something unusable; the caller falls back to a sequential pass."""


def sample_times(duration: float, num_frames: int) -> list[float]:
    """Centres of `num_frames` equal segments of `[0, duration)`: `(i + 0.5) * duration / num_frames`."""
    if num_frames < 1:
        raise ActionftError(f"num_frames must be at least 1, got {num_frames}")
    if not duration or duration <= 0 or not math.isfinite(duration):
        raise ActionftError(f"cannot sample frames from a clip of duration {duration!r} s")
    return [(i + 0.5) * duration / num_frames for i in range(num_frames)]


def parse_size(size: Any) -> tuple[int, int] | None:
    """A frame size as (height, width), the one convention here: an int S or "S" is SxS, "HxW" or [h, w] is that,
    and None, 0 or "" mean "keep the decoded size" (None)."""
    if size is None or (isinstance(size, str) and size.strip().lower() in ("", "0", "none", "null")) or size == 0:
        return None
    if isinstance(size, str):
        parts = size.lower().replace(",", "x").split("x")
        try:
            vals = [int(p) for p in parts]
        except ValueError:
            raise ActionftError(f"size must be S or HxW (e.g. 336 or 224x336), got {size!r}") from None
        size = vals[0] if len(vals) == 1 else vals
    if isinstance(size, bool):
        raise ActionftError(f"size must be S or HxW, got {size!r}")
    if isinstance(size, int):
        size = (size, size)
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ActionftError(f"size must be S, HxW or [h, w], got {size!r}") from None
    if h < 1 or w < 1:
        raise ActionftError(f"size must be positive, got {size!r}")
    return h, w


def _cover_size(w: int, h: int, size: int | Sequence[int]) -> tuple[int, int]:
    """The smallest (w, h) with the aspect of `w` x `h` that covers `size`."""
    h_t, w_t = parse_size(size)
    scale = max(w_t / w, h_t / h)
    return max(w_t, round(w * scale)), max(h_t, round(h * scale))


def resize_center_crop(img, size: int | Sequence[int]):
    """Resize so the picture covers `size` then crop the centre: an int S gives SxS, a tuple is (height, width)."""
    from PIL import Image

    h_t, w_t = parse_size(size)
    w, h = img.size
    if (w, h) == (w_t, h_t):
        return img
    new_w, new_h = _cover_size(w, h, size)
    if (new_w, new_h) != (w, h):
        img = img.resize((new_w, new_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    left, top = (new_w - w_t) // 2, (new_h - h_t) // 2
    return img.crop((left, top, left + w_t, top + h_t))


_SWS = threading.local()  # this thread's swscale contexts, made on first use


def _reformat(step: str, frame, **kwargs):
    """`frame` through this thread's swscale context for `step` ("scale" or "rgb"), single-threaded.

    `VideoFrame.reformat`/`to_ndarray(format=...)` build a new context for every frame, and PyAV lets swscale start
    its own threads for each one; that set-up cost more than the work (1.8 against 0.3 ms for a 336-pixel picture
    from 640x360 here). One context per step, reused from frame to frame, gives the same pixels; parallelism comes
    from the workers.
    """
    context = getattr(_SWS, step, None)
    if context is None:
        from av.video.reformatter import VideoReformatter

        context = VideoReformatter()
        setattr(_SWS, step, context)
    return context.reformat(frame, threads=1, **kwargs)


def _rgb_array(frame):
    return _reformat("rgb", frame, format="rgb24").to_ndarray()


def _frame_image(frame, size: int | Sequence[int] | None):
    """A decoded frame as an upright RGB picture, resized and centre-cropped to `size` (None: as decoded).

    A resize happens in FFmpeg's swscale on the YUV planes before the RGB conversion (bicubic; for a downscale its
    filter widens with the scale factor, so no aliasing), and the turn and the crop are numpy views, so only the
    final picture is copied: several times cheaper than `to_image()` on the full frame followed by a PIL resize
    (0.2 against 2.5 ms for an upscale from 340x256 to cover 336x336 here).
    """
    import numpy as np
    from PIL import Image

    rotation = frame.rotation  # taken before reformat, whose new frame need not carry the display matrix
    turns = round(rotation / 90) % 4  # counter-clockwise quarter turns
    if size is not None:
        w, h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)  # upright size
        new_w, new_h = _cover_size(w, h, size)
        if (new_w, new_h) != (w, h):
            frame = _reformat("scale", frame, width=new_h if turns % 2 else new_w,
                              height=new_w if turns % 2 else new_h, interpolation="BICUBIC")
    array = np.rot90(_rgb_array(frame), k=turns)
    if size is not None:
        h_t, w_t = parse_size(size)
        left, top = (new_w - w_t) // 2, (new_h - h_t) // 2
        array = array[top : top + h_t, left : left + w_t]
    return Image.fromarray(np.ascontiguousarray(array))


# ---------------------------------------------------------------------------------------------------------------
# opening and probing


def _check_file(path: Path) -> None:
    if not path.exists():
        raise VideoError(
            f"video {path} does not exist; check the path or remove it from the annotations", kind="missing"
        )
    if not path.is_file():
        raise VideoError(f"video {path} is not a file", kind="missing")
    if path.stat().st_size == 0:
        raise VideoError(
            f"video {path} is empty (0 bytes); re-download it or remove it from the annotations", kind="empty file"
        )


def _open(path: Path):
    import av

    try:
        return av.open(str(path), "r")
    except av.FFmpegError as err:
        raise VideoError(
            f"video {path} cannot be opened: not a media file, or corrupt/truncated ({_why(err)}); "
            f"re-download it or remove it from the annotations",
            kind="corrupt or not a media file",
        ) from None
    except OSError as err:
        raise VideoError(f"video {path} cannot be read ({err})", kind="unreadable") from None


def _why(err: Exception) -> str:
    return getattr(err, "strerror", None) or str(err) or type(err).__name__


def _video_stream(container, path: Path):
    streams = list(container.streams.video)
    if not streams:
        kinds = sorted({s.type for s in container.streams}) or ["no streams"]
        raise VideoError(
            f"video {path} has no video stream (found: {', '.join(kinds)}); it is not a video clip, remove it "
            f"from the annotations",
            kind="no video stream",
        )
    stream = streams[0]
    if stream.codec_context is None:
        try:
            tag = stream.codec_tag
        except Exception:
            tag = "unknown"
        raise VideoError(
            f"video {path}: its video codec ({tag!r}) is not supported by this FFmpeg build; {_FIX}",
            kind="unsupported codec",
        )
    return stream


def _stream_start(stream) -> int:
    return stream.start_time if stream.start_time is not None else 0


def _tail_end(container, stream) -> int | None:
    """The pts just past the last video packet, found by demuxing from the last keyframe (no decoding)."""
    end = None
    try:
        if container.duration:
            guess = _stream_start(stream) + int(container.duration / 1_000_000 / stream.time_base)
            container.seek(guess, stream=stream, backward=True)
        else:
            container.seek(_stream_start(stream), stream=stream, backward=True)
    except Exception:
        pass  # demux from wherever we are
    default_dur = 0
    rate = stream.average_rate or stream.guessed_rate
    if rate:
        default_dur = max(int(1 / (rate * stream.time_base)), 0)
    try:
        for packet in container.demux(stream):
            if packet.pts is None:
                continue
            packet_end = packet.pts + (packet.duration or default_dur)
            end = packet_end if end is None else max(end, packet_end)
    except Exception:
        pass  # a truncated tail: what was read so far is the end
    return end


def _declared_end(container, stream) -> float | None:
    """The end time the header claims for the video stream: Matroska's per-stream DURATION tag, else the
    container's duration when the video is its only stream (with audio it may be the audio's, which can be longer)."""
    tag = (stream.metadata or {}).get("DURATION")
    if tag:
        try:
            h, m, sec = tag.split(":")
            return int(h) * 3600 + int(m) * 60 + float(sec)
        except ValueError:
            pass
    if container.duration and len(container.streams) == 1:
        return container.duration / 1_000_000
    return None


def _check_index(stream, path: Path) -> None:
    """Raise "truncated" when the container's index (e.g. an MP4 `moov` written at the start) points past the end of
    the file: the file was cut after its index was written. Reads no packet."""
    try:
        entries = [(e.pos + e.size, e.timestamp) for e in stream.index_entries if e.pos >= 0]
        size = path.stat().st_size
    except Exception:
        return
    if not entries or max(end for end, _ in entries) <= size:
        return
    tb, start = stream.time_base, _stream_start(stream)
    held = [ts for end, ts in entries if end <= size]
    last = max(0.0, float((max(held) - start) * tb)) if held and tb else 0.0
    missing = sum(end > size for end, _ in entries)
    raise VideoError(
        f"video {path} is truncated: the file ends after about {last:.2f} s of video, its index lists {missing} more "
        f"frame(s) past the end of the file; re-download it or remove it from the annotations",
        kind="truncated",
    )


def _info(container, stream, path: Path) -> VideoInfo:
    """Probe without decoding (rotation left at 0; the reader fills it in from the first decoded frame)."""
    _check_index(stream, path)
    tb = stream.time_base
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    fps = float(rate) if rate else None
    duration = None
    if stream.duration and tb:
        duration = float(stream.duration * tb)
    if not duration and tb:
        end = _tail_end(container, stream)
        if end is not None:
            duration = float((end - _stream_start(stream)) * tb)
            declared = _declared_end(container, stream)
            data_end = float(end * tb)  # absolute, like the declared durations of Matroska/WebM
            if declared and data_end < declared - max(0.5, 0.1 * declared):
                raise VideoError(
                    f"video {path} is truncated: its header says {declared:.2f} s but the video data stops at "
                    f"{data_end:.2f} s; re-download it or remove it from the annotations",
                    kind="truncated",
                )
    if not duration and container.duration:
        duration = container.duration / 1_000_000
    if not duration or duration <= 0:
        raise VideoError(
            f"video {path}: its duration is unknown and could not be worked out from its timestamps; {_FIX}",
            kind="unknown duration",
        )
    cc = stream.codec_context
    return VideoInfo(
        path=str(path),
        fps=fps,
        duration=duration,
        width=cc.width,
        height=cc.height,
        rotation=0,
        codec=cc.name,
        container=container.format.name,
        start=float(_stream_start(stream) * tb) if tb else 0.0,
    )


def _set_rotation(info: VideoInfo, rotation: int) -> None:
    r = round(rotation / 90) % 4 * 90
    if r != info.rotation:
        if (r - info.rotation) % 180:
            info.width, info.height = info.height, info.width
        info.rotation = r


def probe_video(path: str | Path) -> VideoInfo:
    """Open a video, check it has a decodable video stream and read its fps, duration, size, rotation and codec.

    Decodes the first frame (to prove the stream decodes and to read the display matrix). Raises `ActionftError`
    naming the file for a missing, empty, corrupt or audio-only file, an unsupported codec or an unknown duration.
    """
    import av

    path = Path(path)
    _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        info = _info(container, stream, path)
        try:
            container.seek(_stream_start(stream), stream=stream, backward=True)
        except av.FFmpegError:
            container.close()
            container = _open(path)
            stream = container.streams.video[0]
        try:
            frame = next(iter(container.decode(stream)), None)
        except av.FFmpegError as err:
            raise VideoError(
                f"video {path}: its video stream cannot be decoded ({_why(err)}); {_FIX}", kind="undecodable"
            ) from None
        if frame is None:
            raise VideoError(f"video {path}: its video stream holds no decodable frame; {_FIX}", kind="undecodable")
        _set_rotation(info, frame.rotation)
        return info
    finally:
        container.close()


# ---------------------------------------------------------------------------------------------------------------
# reading


def _frame_seconds(frame, start: int, tb: Fraction) -> float | None:
    pts = frame.pts
    return None if pts is None else (pts - start) * tb.numerator / tb.denominator  # == float(Fraction), rounded once


def _keyframe_times(stream) -> list[int]:
    """Keyframe pts from the container's index (sorted), or [] when the container has no index."""
    try:
        return sorted(e.timestamp for e in stream.index_entries if e.is_keyframe)
    except Exception:
        return []


def _seek_read(container, stream, targets: list[float], duration: float) -> list[tuple[float, object]]:
    """(time, VideoFrame) for each target, by seeking; raises _SeekFailed when the result can't be trusted.

    Packets of non-reference frames (e.g. most B-frames) that are displayed before the current target are not
    decoded at all (`skip_frame=NONREF`): nothing else depends on them and they can't be the pick, which is the
    first frame at or after the target.
    """
    import av

    tb = stream.time_base
    start = _stream_start(stream)
    keyframes = _keyframe_times(stream)
    order = sorted(range(len(targets)), key=targets.__getitem__)
    picked: list[tuple[float, object] | None] = [None] * len(targets)
    frames = None  # the decode iterator of the current position
    last: tuple[float, object] | None = None  # the last frame decoded, (seconds, frame)
    cc = stream.codec_context
    skip_below: list[float | None] = [None]  # pts under which non-reference frames are skipped (None: none)

    def decode_from_here():
        skipping = cc.skip_frame == "NONREF"
        for packet in container.demux(stream):
            below = skip_below[0]
            skip = below is not None and packet.pts is not None and packet.pts < below
            if skip != skipping:  # only set on a change: the property goes through an enum each time
                cc.skip_frame = "NONREF" if skip else "DEFAULT"
                skipping = skip
            yield from packet.decode()

    def seek_to(t: float):
        ts = start + math.floor(t / tb) if t > 0 else start
        container.seek(int(ts), stream=stream, backward=True)
        return decode_from_here()

    try:
        for j in order:
            t = targets[j]
            # Past (or at) the end the pick is the last frame, which must not be skipped.
            skip_below[0] = start + (t - 1e-3) * tb.denominator / tb.numerator if t < duration - 0.05 else None
            if last is not None and last[0] >= t - _EPS:
                picked[j] = last  # already there: targets are sorted, so it's the first frame at/after t
                continue
            need_seek = frames is None
            if not need_seek:
                # Keep decoding forward when no keyframe lies between here and the target (seeking would go back).
                target_pts = start + t / tb
                before = [k for k in keyframes if k <= target_pts]
                need_seek = not before or (last is not None and (before[-1] - start) * tb > last[0] + _EPS)
            if need_seek:
                frames = seek_to(t)
                fresh = True
            found = None
            for frame in frames:
                ft = _frame_seconds(frame, start, tb)
                if ft is None:
                    raise _SeekFailed("frame without a timestamp")
                if fresh:
                    fresh = False
                    if ft > t + _EPS and t > _EPS:
                        raise _SeekFailed("seek landed after the target")
                last = (ft, frame)
                if ft >= t - _EPS:
                    found = last
                    break
            if found is None:  # end of stream: the last frame before EOF
                if last is None:
                    raise _SeekFailed("no frame after seeking")
                found = last
                frames = iter(())  # exhausted; a later (larger) target would also get the last frame
            picked[j] = found
    except av.FFmpegError as err:
        raise _SeekFailed(str(err)) from None
    if len({id(p[1]) for p in picked}) < len(picked):
        # Two sample times landed on one frame: either a real gap in a variable-frame-rate clip or a clip with too
        # few frames; only a full pass can tell, and it is exact.
        raise _SeekFailed("duplicate frames")
    return picked  # type: ignore[return-value]


def _sequential_read(path: Path, targets: list[float], threads: int | None = None
                     ) -> tuple[list[tuple[float, object]], int]:
    """One pass over every frame, keeping only the ones needed. Returns the picks and the number of frames decoded."""
    import av

    container = _open(path)
    try:
        stream = _video_stream(container, path)
        _set_threads(stream, threads)
        tb = stream.time_base
        start = _stream_start(stream)
        rate = stream.average_rate or stream.guessed_rate
        order = sorted(range(len(targets)), key=targets.__getitem__)
        picked: list[tuple[float, object] | None] = [None] * len(targets)
        k = 0  # next target (in sorted order)
        count = 0
        last = None
        try:
            for frame in container.decode(stream):
                ft = _frame_seconds(frame, start, tb)
                if ft is None:
                    ft = count / float(rate) if rate else float(count)
                count += 1
                last = (ft, frame)
                while k < len(order) and ft >= targets[order[k]] - _EPS:
                    picked[order[k]] = last
                    k += 1
        except av.FFmpegError:
            pass  # corrupt tail: keep what decoded
        if last is not None:
            for j in order[k:]:
                picked[j] = last
        return picked, count  # type: ignore[return-value]
    finally:
        container.close()


def _set_threads(stream, threads: int | None) -> None:
    if threads is not None:
        stream.codec_context.thread_count = threads


def _check_reached(path: Path, info: VideoInfo, targets: list[float], picked: list[tuple[float, object]]) -> None:
    """Raise "truncated" when a sample time inside the clip's declared duration lies past the last decodable frame.

    The header's duration (an MP4 index written at the start, as most download tools do, survives a cut) can
    promise more than the data holds; each pick must then be the frame shown at its time, not a stale last frame.
    A frame counts as shown until one and a half frame durations after its time (its own duration, else 1/fps).
    """
    for t, (ft, frame) in zip(targets, picked):
        if t >= info.duration - _EPS or ft >= t - _EPS:
            continue  # past the declared end (the last frame is the answer), or a frame at/after the time
        span = 0.0
        if frame.duration and frame.time_base:
            span = float(frame.duration * frame.time_base)
        if info.fps:
            span = max(span, 1 / info.fps)
        if t > ft + 1.5 * span + 0.01:
            raise VideoError(
                f"video {path} is truncated: its header says {info.duration:.2f} s but no frame decodes after "
                f"{ft:.2f} s (a frame was wanted at {t:.2f} s); re-download it or remove it from the annotations",
                kind="truncated",
            )


def read_frames(
    path: str | Path,
    num_frames: int = 4,
    size: int | Sequence[int] | None = None,
    timestamps: Sequence[float] | None = None,
    threads: int | None = None,
):
    """`num_frames` RGB frames at the segment centres of a clip (or at `timestamps`, seconds from the stream start).

    Returns `(images, times, info)`: PIL RGB images, upright; the actual time of each picked frame (the first
    frame at or after each sample time, the last frame for times past the end); and the `VideoInfo`. `size` None
    keeps the decoded size, an int S resizes the short side to S and centre-crops SxS, a (height, width) tuple
    resizes to cover it and centre-crops. `threads` is the decoder's thread count: None lets FFmpeg choose, the
    quickest way to read one clip; 1 when several processes read clips side by side (`prepare`'s workers), where
    the decoder's extra threads find no idle core and only add work (about a fifth more CPU time per clip here).
    Raises `ActionftError` for unreadable files and for clips with fewer frames than requested.
    """
    import av

    path = Path(path)
    _check_file(path)
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        _set_threads(stream, threads)
        info = _info(container, stream, path)
        targets = [float(t) for t in timestamps] if timestamps is not None else sample_times(info.duration, num_frames)
        if not targets:
            raise ActionftError("read_frames needs at least one sample time")
        try:
            picked = _seek_read(container, stream, targets, info.duration)
            count = None
        except _SeekFailed:
            picked = None
    finally:
        container.close()
    if picked is None:
        picked, count = _sequential_read(path, targets, threads)
        if count == 0:
            raise VideoError(f"video {path}: no frame of its video stream could be decoded; {_FIX}", kind="undecodable")
    _check_reached(path, info, targets, picked)
    if count is not None:
        if count < len(targets):
            raise VideoError(
                f"video {path} has only {count} frame{'s' if count != 1 else ''}, fewer than the {len(targets)} "
                f"requested; lower num_frames or remove it from the annotations",
                kind="too few frames",
            )
    images, times = [], []
    converted: dict[int, object] = {}
    for ft, frame in picked:
        key = id(frame)
        if key not in converted:
            try:
                img = _frame_image(frame, size)
            except (av.FFmpegError, ValueError) as err:
                raise VideoError(
                    f"video {path}: a frame cannot be converted to RGB ({_why(err)}); {_FIX}", kind="undecodable"
                ) from None
            _set_rotation(info, frame.rotation)
            converted[key] = img
        images.append(converted[key])
        times.append(ft)
    return images, times, info
