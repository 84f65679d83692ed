"""Seek-based frame reading: right frames at segment centres for every container/codec, rotation, variable frame
rate, non-zero start times, the sequential fallback, and a clear error for every kind of broken file."""

from __future__ import annotations

import pytest
from PIL import Image
from videos import (
    FORMAT_IDS,
    corner_is_white,
    index_of,
    write_audio_only,
    write_format,
    write_random_bytes,
    write_truncated,
    write_unknown_codec,
    write_vfr,
    write_video,
    write_zero_length,
)

import actionft.frames as F
from actionft.errors import ActionftError
from actionft.frames import VideoError, probe_video, read_frames, resize_center_crop, sample_times


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """One 3 s, 10 fps, 30-frame clip per container/codec (skipped where the encoder is missing)."""
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name in FORMAT_IDS:
        try:
            out[name] = write_format(d / name, name)
        except pytest.skip.Exception:
            out[name] = None
    return out


def _clip(clips, name):
    if clips[name] is None:
        pytest.skip(f"no encoder for {name}")
    return clips[name]


def _check_picks(clip, images, times, num_frames=4):
    n = len(clip.times)
    expected = [clip.frame_at_or_after(t) for t in sample_times(clip.duration, num_frames)]
    assert [index_of(img, n) for img in images] == expected
    assert times == pytest.approx([clip.times[i] for i in expected], abs=2e-3)
    assert all(corner_is_white(img) for img in images)


def test_sample_times_are_segment_centres():
    assert sample_times(8.0, 4) == [1.0, 3.0, 5.0, 7.0]
    assert sample_times(3.0, 1) == [1.5]
    assert sample_times(10.0, 5) == pytest.approx([1.0, 3.0, 5.0, 7.0, 9.0])
    with pytest.raises(ActionftError):
        sample_times(3.0, 0)
    with pytest.raises(ActionftError):
        sample_times(0.0, 4)


def test_resize_center_crop():
    img = Image.new("RGB", (200, 100), (0, 0, 0))
    img.paste((255, 0, 0), (0, 0, 50, 100))  # red left quarter, cropped away by a centre square
    out = resize_center_crop(img, 50)
    assert out.size == (50, 50)
    assert out.getpixel((0, 25))[0] < 30 and out.getpixel((49, 25))[0] < 30
    assert resize_center_crop(img, (30, 90)).size == (90, 30)  # (h, w)
    assert resize_center_crop(img, (100, 200)) is img
    assert resize_center_crop(img, 400).size == (400, 400)  # upscales to cover


@pytest.mark.parametrize("name", FORMAT_IDS)
def test_probe(clips, name):
    clip = _clip(clips, name)
    info = probe_video(clip.path)
    assert info.duration == pytest.approx(3.0, abs=0.05)
    assert info.fps == pytest.approx(10.0)
    assert (info.width, info.height, info.rotation) == (64, 48, 0)
    assert info.codec in {"h264", "mpeg4", "vp8", "vp9"}
    assert info.path == str(clip.path)


@pytest.mark.parametrize("name", FORMAT_IDS)
def test_read_frames_picks_segment_centres(clips, name, monkeypatch):
    clip = _clip(clips, name)

    def no_fallback(*a, **k):
        raise AssertionError("a plain clip must be read by seeking, not by the sequential fallback")

    monkeypatch.setattr(F, "_sequential_read", no_fallback)
    images, times, info = read_frames(clip.path, 4)
    assert len(images) == 4 and all(img.mode == "RGB" and img.size == (64, 48) for img in images)
    _check_picks(clip, images, times)
    assert times == pytest.approx([0.4, 1.2, 1.9, 2.7], abs=2e-3)  # first frame at/after 0.375, 1.125, ...


@pytest.mark.parametrize("name", ["mp4-h264", "webm-vp9", "avi-mpeg4"])
def test_sequential_fallback_gives_the_same_frames(clips, name, monkeypatch):
    clip = _clip(clips, name)
    seek_images, seek_times, _ = read_frames(clip.path, 6)

    def seek_fails(*a, **k):
        raise F._SeekFailed("simulated")

    monkeypatch.setattr(F, "_seek_read", seek_fails)
    images, times, _ = read_frames(clip.path, 6)
    assert times == seek_times
    assert [index_of(i, 30) for i in images] == [index_of(i, 30) for i in seek_images]
    _check_picks(clip, images, times, 6)


def test_size_resizes_and_crops(clips):
    clip = _clip(clips, "mp4-h264")
    images, _, _ = read_frames(clip.path, 4, size=32)
    assert all(img.size == (32, 32) for img in images)
    images, _, _ = read_frames(clip.path, 4, size=(24, 40))
    assert all(img.size == (40, 24) for img in images)
    _check_picks(clip, images, [clip.times[clip.frame_at_or_after(t)] for t in sample_times(3.0, 4)])


def test_explicit_timestamps_and_past_the_end(clips):
    clip = _clip(clips, "mkv-h264")
    images, times, _ = read_frames(clip.path, timestamps=[2.0, 0.0, 2.95, 10.0])
    assert [index_of(i, 30) for i in images] == [20, 0, 29, 29]  # order kept; past the end -> last frame
    assert times == pytest.approx([2.0, 0.0, 2.9, 2.9], abs=2e-3)


def test_many_frames_at_a_long_gop(tmp_path):
    """Keyframe every 10 frames: some targets continue forward from the current position, some seek."""
    clip = write_video(tmp_path / "gop.mp4", n_frames=50, fps=25, gop=10, options={"preset": "ultrafast"})
    images, times, info = read_frames(clip.path, 10)
    assert info.duration == pytest.approx(2.0, abs=0.05)
    _check_picks(clip, images, times, 10)


def test_b_frames_skipped_before_the_target_do_not_change_the_picks(tmp_path, monkeypatch):
    """x264 'veryfast' codes most frames as B-frames; non-reference ones before a target are not decoded."""
    import av

    options = {"preset": "veryfast", "crf": "8"}
    clip = write_video(tmp_path / "bframes.mp4", n_frames=40, fps=20, gop=20, options=options)
    with av.open(str(clip.path)) as container:
        kinds = [int(f.pict_type) for f in container.decode(video=0)]
    assert kinds.count(3) >= 10  # AV_PICTURE_TYPE_B
    monkeypatch.setattr(F, "_sequential_read", lambda *a: pytest.fail("fell back to the sequential pass"))
    for n in (4, 7, 12):
        images, times, _ = read_frames(clip.path, n)
        _check_picks(clip, images, times, n)
    # Targets one to three frames apart, on frames and between them: the skipping restarts at every target.
    for stride in (1, 2, 3):
        for offset in (0.0, 0.01):
            ts = [k / 20 + offset for k in range(1, 39, stride)]
            images, times, _ = read_frames(clip.path, timestamps=ts)
            expected = [clip.frame_at_or_after(t) for t in ts]
            assert [index_of(img, 40) for img in images] == expected, (stride, offset)


@pytest.mark.parametrize("size", [None, (24, 32)], ids=["as-decoded", "downscaled"])
@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_applied(tmp_path, rotation, size):
    clip = write_video(tmp_path / f"rot{rotation}.mp4", rotation=rotation, options={"preset": "ultrafast"})
    info = probe_video(clip.path)
    assert info.rotation == rotation
    assert (info.width, info.height) == (64, 48)  # as displayed
    images, times, info = read_frames(clip.path, 4, size=size)
    assert all(img.size == ((64, 48) if size is None else (32, 24)) for img in images)  # (height 24, width 32)
    _check_picks(clip, images, times)  # includes: the white corner is top-left, i.e. upright


def test_variable_frame_rate_picks_by_time(tmp_path):
    clip = write_vfr(tmp_path / "vfr.mkv")
    info = probe_video(clip.path)
    images, times, info = read_frames(clip.path, 4)
    n = len(clip.times)
    expected = [clip.frame_at_or_after(t) for t in sample_times(info.duration, 4)]
    assert [index_of(i, n) for i in images] == expected
    assert times == pytest.approx([clip.times[i] for i in expected], abs=2e-3)
    # A frame index on a constant-rate grid would pick other frames: make sure the test would notice.
    grid = [round(t * (n - 1) / clip.times[-1]) for t in sample_times(info.duration, 4)]
    assert grid != expected


@pytest.mark.parametrize("suffix,fmt", [(".mp4", "mp4"), (".mkv", "matroska")])
def test_clip_with_audio(tmp_path, suffix, fmt):
    clip = write_video(tmp_path / f"av{suffix}", "libx264", fmt, audio=True, options={"preset": "ultrafast"})
    info = probe_video(clip.path)
    assert info.duration == pytest.approx(3.0, abs=0.05)
    images, times, _ = read_frames(clip.path, 4)
    _check_picks(clip, images, times)


def test_stream_not_starting_at_zero(tmp_path):
    clip = write_video(tmp_path / "late.mkv", "libx264", "matroska", start=2.0, options={"preset": "ultrafast"})
    info = probe_video(clip.path)
    assert info.start == pytest.approx(2.0)
    assert info.duration == pytest.approx(3.0, abs=0.05)
    images, times, _ = read_frames(clip.path, 4)
    _check_picks(clip, images, times)


def test_two_frame_clip(tmp_path):
    clip = write_video(tmp_path / "two.mp4", n_frames=2, options={"preset": "ultrafast"})
    assert probe_video(clip.path).duration == pytest.approx(0.2, abs=0.01)
    images, times, _ = read_frames(clip.path, 1)  # centre 0.1 s -> the second frame
    assert [index_of(i, 2) for i in images] == [1] and times == pytest.approx([0.1])
    images, times, _ = read_frames(clip.path, timestamps=[0.0, 0.1])
    assert [index_of(i, 2) for i in images] == [0, 1]
    with pytest.raises(ActionftError, match=r"has only 2 frames, fewer than the 4 requested") as err:
        read_frames(clip.path, 4)
    assert str(clip.path) in str(err.value) and err.value.kind == "too few frames"


def _broken(kind, d, clips):
    if kind == "missing":
        return d / "nope.mp4"
    if kind == "empty file":
        return write_zero_length(d / "empty.mp4")
    if kind == "random bytes":
        return write_random_bytes(d / "random.mp4")
    if kind == "truncated mp4":
        return write_truncated(_clip(clips, "mp4-h264").path, d / "cut.mp4")
    if kind == "truncated webm":
        return write_truncated(_clip(clips, "webm-vp9").path, d / "cut.webm")
    if kind == "truncated mkv":
        return write_truncated(_clip(clips, "mkv-h264").path, d / "cut.mkv")
    if kind == "audio only":
        return write_audio_only(d / "audio.m4a")
    if kind == "unknown codec":
        return write_unknown_codec(d / "zzzz.avi")
    raise ValueError(kind)


BROKEN = {
    "missing": ("missing", "does not exist"),
    "empty file": ("empty file", "empty"),
    "random bytes": ("corrupt or not a media file", "cannot be opened"),
    "truncated mp4": ("corrupt or not a media file", "corrupt/truncated"),
    "truncated webm": ("truncated", "truncated"),
    "truncated mkv": ("truncated", "truncated"),
    "audio only": ("no video stream", "no video stream"),
    "unknown codec": ("unsupported codec", "not supported"),
}


@pytest.mark.parametrize("kind", list(BROKEN))
def test_broken_files_raise_clear_errors(tmp_path, clips, kind):
    path = _broken(kind, tmp_path, clips)
    want_kind, words = BROKEN[kind]
    for fn in (probe_video, read_frames):
        with pytest.raises(VideoError) as err:
            fn(path)
        assert isinstance(err.value, ActionftError)
        assert str(path) in str(err.value) and words in str(err.value)
        assert err.value.kind == want_kind


def test_reused_swscale_contexts_give_the_pixels_of_fresh_ones(tmp_path):
    """`_frame_image` keeps one swscale context per step and thread; frames of other sizes, turns and target sizes
    in between must not change its output (compared with PyAV's own one-context-per-frame path and PIL's turns)."""
    import av
    import numpy as np

    clips = [write_video(tmp_path / "a.mp4", size=(160, 96), options={"preset": "ultrafast"}),
             write_video(tmp_path / "b.mp4", size=(96, 64), rotation=90, options={"preset": "ultrafast"})]
    frames = []
    for clip in clips:
        with av.open(str(clip.path)) as container:
            frames += [f for _, f in zip(range(3), container.decode(video=0))]
    frames = [frames[i] for i in (0, 3, 1, 4, 2, 5)]  # alternate the two sources

    def fresh(frame, size):
        turns = round(frame.rotation / 90) % 4
        w, h = (frame.height, frame.width) if turns % 2 else (frame.width, frame.height)
        new_w, new_h = F._cover_size(w, h, size)
        if turns % 2:
            new_w, new_h = new_h, new_w
        scaled = frame.reformat(width=new_w, height=new_h, interpolation="BICUBIC")
        img = Image.fromarray(scaled.to_ndarray(format="rgb24"))
        if turns:
            img = img.transpose([None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180,
                                 Image.Transpose.ROTATE_270][turns])
        return resize_center_crop(img, size)

    # downscales, a crop at the decoded size ((96, 160) of the 160x96 clip) and upscales (128, (100, 170))
    for size in (48, (20, 36), 40, (96, 160), 128, (100, 170)):
        for frame in frames:
            got = F._frame_image(frame, size)
            assert np.array_equal(np.asarray(got), np.asarray(fresh(frame, size))), (size, frame.width)


def test_single_threaded_decoder_gives_the_same_frames(tmp_path, monkeypatch):
    """`threads=1` (what prepare's workers use) changes how FFmpeg decodes, not what: same picks, same pixels."""
    import numpy as np

    clip = write_video(tmp_path / "t.mp4", n_frames=40, fps=20, gop=20, options={"preset": "veryfast", "crf": "8"})
    counts = []
    set_threads = F._set_threads

    def spy(stream, threads):
        set_threads(stream, threads)
        counts.append(stream.codec_context.thread_count)

    monkeypatch.setattr(F, "_set_threads", spy)
    default = read_frames(clip.path, 6, size=32)
    single = read_frames(clip.path, 6, size=32, threads=1)
    assert counts == [0, 1]  # 0: FFmpeg picks the count
    assert default[1] == single[1]
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(default[0], single[0]))
    _check_picks(clip, single[0], single[1], 6)
