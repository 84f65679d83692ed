"""Tiny synthetic test videos written with PyAV.

Every frame is a flat grey whose level encodes the frame's index (`level_of(i, n)`), plus a white block in the
top-left corner of the *upright* picture, so a test can tell which frame was picked (`index_of`) and which way up
it is (`corner_is_white`). All generators return a `Clip` with the path and the presentation time of every frame
(seconds from the first frame), so tests can compute the frame a sample time must land on.

Import from tests with `from videos import ...` (tests/ has no __init__.py, pytest puts it on sys.path).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

W, H = 64, 48  # stored size of the normal clips (even, so every codec takes it)
MARK = (16, 12)  # white block (w, h) in the top-left corner of the upright picture

# (name, suffix, container format, encoder, pixel format, encoder options)
_VPX = {"deadline": "realtime", "cpu-used": "8", "crf": "4", "b": "1M"}
FORMATS = [
    ("mp4-h264", ".mp4", "mp4", "libx264", "yuv420p", {"preset": "ultrafast"}),
    ("mp4-mpeg4", ".mp4", "mp4", "mpeg4", "yuv420p", {"qscale": "2"}),
    ("avi-mpeg4", ".avi", "avi", "mpeg4", "yuv420p", {"qscale": "2"}),
    ("webm-vp8", ".webm", "webm", "libvpx", "yuv420p", _VPX),
    ("webm-vp9", ".webm", "webm", "libvpx-vp9", "yuv420p", _VPX),
    ("mkv-h264", ".mkv", "matroska", "libx264", "yuv420p", {"preset": "ultrafast"}),
]
FORMAT_IDS = [f[0] for f in FORMATS]


@dataclass
class Clip:
    path: Path
    times: list[float] = field(default_factory=list)  # presentation time of frame i, seconds from the first frame
    duration: float = 0.0
    size: tuple[int, int] = (W, H)  # upright (width, height)

    def frame_at_or_after(self, t: float) -> int:
        """Index of the first frame whose time is >= t (the last frame when t is past the end)."""
        for i, ft in enumerate(self.times):
            if ft >= t - 1e-6:
                return i
        return len(self.times) - 1


def has_encoder(name: str) -> bool:
    try:
        av.codec.Codec(name, "w")
        return True
    except Exception:
        return False


def need_encoder(name: str) -> None:
    if not has_encoder(name):
        pytest.skip(f"this PyAV build has no {name} encoder")


def level_of(i: int, n: int) -> int:
    """Grey level of frame i of n: spread over 20..220 so lossy codecs can't confuse neighbours."""
    return 20 + round(200 * i / max(n - 1, 1))


def index_of(img, n: int) -> int:
    """The frame index whose grey level is nearest to the mean of the picture's centre."""
    a = np.asarray(img.convert("L"), dtype=np.float32)
    h, w = a.shape
    centre = a[h // 3 : 2 * h // 3, w // 3 : 2 * w // 3].mean()
    return min(range(n), key=lambda i: abs(level_of(i, n) - centre))


def corner_is_white(img) -> bool:
    """True when the top-left corner is (near) white, i.e. the picture is upright."""
    a = np.asarray(img.convert("L"), dtype=np.float32)
    h, w = a.shape
    return a[: max(h // 10, 2), : max(w // 10, 2)].mean() > 235


def picture(i: int, n: int, width: int = W, height: int = H) -> np.ndarray:
    """The upright RGB picture of frame i of n."""
    a = np.full((height, width, 3), level_of(i, n), dtype=np.uint8)
    a[: MARK[1], : MARK[0]] = 255
    return a


def write_video(
    path: str | Path,
    encoder: str = "libx264",
    fmt: str | None = None,
    fps: int = 10,
    n_frames: int = 30,
    times: list[float] | None = None,
    start: float = 0.0,
    rotation: int = 0,
    size: tuple[int, int] = (W, H),
    pix_fmt: str = "yuv420p",
    options: dict | None = None,
    gop: int | None = None,
    audio: bool = False,
) -> Clip:
    """Write a clip: `n_frames` at `fps`, or frames at the given `times` (variable frame rate).

    `start` shifts every timestamp (a stream that does not start at 0). `rotation` (multiple of 90, counter-clockwise
    as PyAV's `VideoFrame.rotation` reads it) stores the pictures turned the other way and sets the display matrix,
    so a reader that honours the matrix sees them upright. `audio` adds an AAC track as long as the video.
    """
    need_encoder(encoder)
    path = Path(path)
    if times is None:
        times = [i / fps for i in range(n_frames)]
    n = len(times)
    vfr = any(abs((b - a) - 1 / fps) > 1e-9 for a, b in zip(times, times[1:]))
    tb = Fraction(1, 1000) if (vfr or start) else Fraction(1, fps)
    width, height = size
    if rotation % 180:
        stored_w, stored_h = height, width
    else:
        stored_w, stored_h = width, height
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(encoder, rate=fps, options=dict(options or {}))
        stream.width, stream.height, stream.pix_fmt = stored_w, stored_h, pix_fmt
        stream.codec_context.time_base = tb
        if gop:
            stream.codec_context.gop_size = gop
        if rotation:
            stream.set_display_rotation(rotation)
        sound = None
        if audio:
            need_encoder("aac")
            sound = out.add_stream("aac", rate=16000, layout="mono")
            sample = 0
        for i, t in enumerate(times):
            a = picture(i, n, width, height)
            if rotation:
                a = np.ascontiguousarray(np.rot90(a, k=-(rotation // 90)))
            frame = av.VideoFrame.from_ndarray(a, format="rgb24")
            frame.pts = round((t + start) / tb)
            frame.time_base = tb
            for packet in stream.encode(frame):
                out.mux(packet)
            while sound is not None and sample < (t + 1 / fps) * 16000:
                chunk = np.zeros((1, 1024), dtype=np.float32)
                aframe = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="mono")
                aframe.sample_rate, aframe.pts = 16000, sample
                sample += 1024
                for packet in sound.encode(aframe):
                    out.mux(packet)
        for st in (stream, sound) if sound is not None else (stream,):
            for packet in st.encode():
                out.mux(packet)
    return Clip(path, list(times), times[-1] + 1 / fps, (width, height))


def write_format(path_stem: str | Path, name: str, **kw) -> Clip:
    """A clip in one of FORMATS (skips the test when the encoder is missing)."""
    _, suffix, fmt, encoder, pix_fmt, options = next(f for f in FORMATS if f[0] == name)
    return write_video(Path(str(path_stem) + suffix), encoder, fmt, pix_fmt=pix_fmt, options=options, **kw)


def write_vfr(path: str | Path) -> Clip:
    """H.264 in Matroska with irregular gaps between frames (bursts and pauses)."""
    times = [0.0, 0.04, 0.08, 0.5, 0.52, 0.54, 1.3, 1.35, 2.0, 2.02, 2.04, 2.06, 2.9, 3.3, 3.31, 3.9]
    return write_video(path, "libx264", "matroska", times=times, options={"preset": "ultrafast"})


def write_audio_only(path: str | Path, seconds: float = 1.0) -> Path:
    """An audio-only file: AAC in MP4 (or Opus in Ogg, or MP3, whichever encoder exists), a 440 Hz tone."""
    path = Path(path)
    for encoder, fmt in (("aac", "mp4"), ("libopus", "ogg"), ("libmp3lame", "mp3")):
        if has_encoder(encoder):
            break
    else:
        pytest.skip("no audio encoder in this PyAV build")
    rate = 48000
    with av.open(str(path), "w", format=fmt) as out:
        stream = out.add_stream(encoder, rate=rate, layout="mono")
        sample_fmt = stream.codec_context.format.name  # e.g. fltp (planar) or s16p
        n = stream.codec_context.frame_size or 1024
        for start in range(0, int(seconds * rate), n):
            tone = 0.1 * np.sin(2 * np.pi * 440 * (start + np.arange(n)) / rate)
            frame = av.AudioFrame.from_ndarray(tone.astype(np.float32)[None, :], format="fltp", layout="mono")
            frame.sample_rate, frame.pts = rate, start
            if sample_fmt != "fltp":
                frame = av.AudioResampler(format=sample_fmt, layout="mono", rate=rate).resample(frame)[0]
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_truncated(src: str | Path, dst: str | Path, fraction: float = 0.5) -> Path:
    """The first `fraction` of the bytes of `src`."""
    data = Path(src).read_bytes()
    Path(dst).write_bytes(data[: int(len(data) * fraction)])
    return Path(dst)


def write_zero_length(path: str | Path) -> Path:
    Path(path).write_bytes(b"")
    return Path(path)


def write_random_bytes(path: str | Path, n: int = 4096, seed: int = 0) -> Path:
    Path(path).write_bytes(np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes())
    return Path(path)


def write_unknown_codec(path: str | Path) -> Path:
    """An AVI whose video stream's FourCC names no codec FFmpeg knows (MPEG-4 data relabelled 'ZZZZ')."""
    path = Path(path)
    write_video(path, "mpeg4", "avi", n_frames=5, options={"qscale": "2"})
    data = path.read_bytes()
    for tag in (b"FMP4", b"fmp4"):
        data = data.replace(tag, b"ZZZZ")
    path.write_bytes(data)
    return path
