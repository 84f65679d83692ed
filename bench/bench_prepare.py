"""Benchmark: seek-based `read_frames` against decoding every frame and then subsampling.

For each keyframe layout (`--layouts`) it generates N H.264 clips (default 12 x 10 s, 640x360, textured moving
content, libx264 at ffmpeg's default settings: preset medium, crf 23) in a folder of their own, then times, on the
same clips and in one process each (a subprocess per method, so peak RSS is honest):

  (a) seek:  `actionft.frames.read_frames(path, 4, size=336)`, single process
  (b) naive: decode every frame to an RGB array in a list (`to_ndarray("rgb24")`, as the reference training code
      did for video items), pick the same 4 (first frame at/after each segment centre), resize/crop them to 336
  (c) decode only: (a)'s opening, seeking and decoding, without turning the 4 picks into pictures. The frames it
      decodes (every reference frame up to each pick from the keyframe before it, and the picks) are what any reader
      of exactly these frames has to decode, so (b)/(c) is about the most such a reader can gain over (b). That
      holds for libx264's default of 3 reference frames, where P-frames predict from the B-frames kept as
      references; its fast presets (`--preset veryfast` and faster) keep 1, P-frames then never use those B-frames,
      and a reader that parsed every slice's reference lists could skip them too
  (d) worker: (a) with a single-threaded decoder (`threads=1`), as `actionft prepare` runs it in its worker
      processes; its CPU time against (b)'s is the work saved

in rounds that run one pass of each back to back (alternating the order, so a slow spell of a shared machine hits
all of them), and prints clips/s (median and best pass), the speed ratio (median of the rounds' ratios, with their
range), CPU time and page faults per clip, and peak memory: the peak RSS of the process and its rise over the RSS
after imports (FFmpeg's frame buffers live outside Python's allocator, so tracemalloc would not see them). The ratio
of CPU times, (b) over (d), is the work saved: about the speed-up when every core is busy (several workers), where
threads inside a process find no idle core. Before timing it checks, by their times, that both methods pick the same
frames of every clip. The measuring processes keep freed memory (see KEEP_MEMORY), which gives the baseline its
fastest, steadiest form. A summary table of all layouts comes last.

    .venv/bin/python bench/bench_prepare.py [--layouts 25:250,30:250,25:50] [--clips 12] [--seconds 10]
                                            [--size 640x360] [--preset medium] [--repeat 7] [--dir DIR]
                                            [--glibc-defaults]

A layout is `FPS:GOP`, GOP being libx264's maximum keyframe interval in frames. The default three: 25:250, one
keyframe per 10 s clip, the hardest case for seeking (the last sample, at 87.5% of the clip, needs every reference
frame before it); 30:250, libx264's default keyint at 30 fps, as in clips re-encoded with ffmpeg's defaults (a
second keyframe at 8.3 s); 25:50, a keyframe every 2 s. `--content noise` makes every frame a P-frame (high-entropy
texture, no B-frames), the worst case: nothing can be skipped between keyframes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def make_clip(path: Path, seconds: float, fps: int, width: int, height: int, gop: int, seed: int,
              content: str = "smooth", preset: str = "medium") -> None:
    """A synthetic clip with motion, encoded by libx264 at `preset` and its default quality (crf 23).

    "smooth": a smooth scrolling texture, three moving blocks and light grain; like natural video, libx264 codes
    most of it as B-frames. "noise": scrolling high-entropy noise coded without B-frames (about 3.5x the bitrate),
    the worst case for a seeking reader: every frame up to the last sample time has to be decoded.
    """
    import av
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    if content == "smooth":
        small = rng.integers(0, 256, (height // 20, width // 10, 3), dtype=np.uint8)
        texture = np.asarray(Image.fromarray(small).resize((width * 2, height), Image.Resampling.BICUBIC))
    else:
        texture = rng.integers(0, 256, (height, width * 2, 3), dtype=np.uint8)
    n = int(seconds * fps)
    with av.open(str(path), "w") as out:
        options = {"preset": preset, "crf": "23"}
        if content == "noise":
            options["bf"] = "0"
        stream = out.add_stream("libx264", rate=fps, options=options)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.codec_context.gop_size = gop
        for i in range(n):
            x = (i * 2) % width
            img = np.ascontiguousarray(texture[:, x : x + width])
            for k in range(3):
                bx = int((width - 80) * (0.5 + 0.5 * np.sin(i / (15 + 7 * k) + k)))
                by = int((height - 80) * (0.5 + 0.5 * np.cos(i / (20 + 5 * k) + 2 * k)))
                img[by : by + 80, bx : bx + 80] = (60 * k + 40, 200 - 50 * k, (i * 3) % 256)
            if content == "smooth":
                grain = rng.integers(-6, 7, img.shape, dtype=np.int16)
                img = np.clip(img.astype(np.int16) + grain, 0, 255).astype(np.uint8)
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            frame.pts = i
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def read_all_frames_then_sample(path, num_frames: int = 4, size: int | None = 336):
    """The naive baseline: decode every frame into a list of RGB arrays, then pick `num_frames` uniformly (the first
    frame at or after each segment centre, as `read_frames` does). Returns the pictures and the picks' times."""
    import av
    from PIL import Image

    from actionft.frames import resize_center_crop

    with av.open(str(path)) as container:
        decoded = [(frame.time, frame.to_ndarray(format="rgb24")) for frame in container.decode(video=0)]
    n = len(decoded)
    picks = [decoded[min(n - 1, math.ceil((i + 0.5) * n / num_frames - 1e-9))] for i in range(num_frames)]
    images = [Image.fromarray(a) for _, a in picks]
    return ([resize_center_crop(img, size) for img in images] if size else images), [t for t, _ in picks]


def decode_only(path) -> list:
    """(c): the frames `read_frames` picks, as decoded (`VideoFrame`s, no RGB conversion, no resize)."""
    import av

    from actionft import frames

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        info = frames._info(container, stream, Path(path))
        picked = frames._seek_read(container, stream, frames.sample_times(info.duration, 4), info.duration)
    return [f for _, f in picked]


def check_same_picks(clips: list[str]) -> None:
    """Both methods must return the same frames, or the comparison means nothing: compare the picks' times."""
    from actionft.frames import read_frames

    for p in clips:
        seek_times = read_frames(p, 4, size=336)[1]
        naive_times = read_all_frames_then_sample(p, 4, 336)[1]
        if any(abs(a - b) > 1e-6 for a, b in zip(seek_times, naive_times)):
            raise SystemExit(f"{p}: the two methods picked different frames ({seek_times} vs {naive_times})")


def _rss_mb() -> float:
    """Peak RSS of this process in MiB: VmHWM (reset by exec, unlike ru_maxrss, which keeps the parent's peak)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB; macOS: bytes (roughly)


def _minor_faults() -> int:
    """Page faults served without I/O so far: each is a fresh page of memory handed to this process."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


# The measuring children keep freed memory instead of handing it back to the OS after every clip: the baseline's
# list of RGB frames (173 MB for a 10 s 640x360 clip) otherwise costs a page fault per 4 KiB on every clip, or not,
# as glibc's heuristics decide (seen here: 41k faults and 1.5x the time per clip at 640x360 in one process, next to
# none in another). Kept memory is the baseline's fastest and steadiest form; `--glibc-defaults` measures without it.
KEEP_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(32 << 20), "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


def serve(method: str, clips: list[str]) -> None:
    """A measuring child (one per method, so peak RSS is its own): after a warm-up it prints `ready`, then times one
    pass over the clips for every `pass` line on stdin and prints the seconds; `done` prints the memory figures."""
    from actionft.frames import read_frames

    if method == "seek":
        def fn(p):
            return read_frames(p, 4, size=336)[0]
    elif method == "worker":
        def fn(p):
            return read_frames(p, 4, size=336, threads=1)[0]
    elif method == "decode":
        fn = decode_only
    else:
        def fn(p):
            return read_all_frames_then_sample(p, 4, 336)[0]

    import av  # noqa: F401  (imported before the baseline so it is not counted)
    import numpy  # noqa: F401
    from PIL import Image  # noqa: F401

    base_rss = _rss_mb()
    fn(clips[0])  # warm-up (codec init, first allocations); timed passes follow
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if line.strip() == "pass":
            t0, c0, f0 = time.perf_counter(), time.process_time(), _minor_faults()
            for p in clips:
                images = fn(p)
                assert len(images) == 4 and (method == "decode" or images[0].size == (336, 336))
            print(json.dumps({"seconds": time.perf_counter() - t0, "cpu": time.process_time() - c0,
                              "faults": _minor_faults() - f0}), flush=True)
        else:
            break
    print(json.dumps({"peak_rss_mb": _rss_mb(), "rss_rise_mb": _rss_mb() - base_rss}), flush=True)


METHODS = ("seek", "naive", "decode", "worker")


class _Child:
    def __init__(self, method: str, folder: Path, clips: int, keep_memory: bool):
        cmd = [sys.executable, __file__, "--serve", method, "--dir", str(folder), "--clips", str(clips)]
        env = {**os.environ, **KEEP_MEMORY} if keep_memory else None
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def ask(self, line: str) -> dict:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.read()

    def read(self) -> dict:
        out = self.proc.stdout.readline()
        if not out:
            raise SystemExit(f"the measuring process exited with code {self.proc.wait()}")
        return json.loads(out)


def measure(folder: Path, clips: int, repeat: int, keep_memory: bool = True) -> dict:
    """Interleaved passes: each round times one pass of each method, back to back (the order alternates), so a
    slow spell of a shared machine hits all of them; a speed-up is the median of the rounds' ratios."""
    children = {m: _Child(m, folder, clips, keep_memory) for m in METHODS}
    for child in children.values():
        child.read()  # ready
    passes: dict[str, dict[str, list[float]]] = {key: {m: [] for m in METHODS} for key in ("seconds", "cpu", "faults")}
    for r in range(repeat):
        for m in (METHODS if r % 2 == 0 else METHODS[::-1]):
            answer = children[m].ask("pass")
            for key, values in passes.items():
                values[m].append(answer[key])
    memory = {m: child.ask("done") for m, child in children.items()}
    for child in children.values():
        child.proc.wait()
    seconds, cpu = passes["seconds"], passes["cpu"]
    return {**passes, "memory": memory,
            "ratios": sorted(n / s for n, s in zip(seconds["naive"], seconds["seek"])),
            "bounds": sorted(n / d for n, d in zip(seconds["naive"], seconds["decode"])),
            "cpu_ratios": sorted(n / w for n, w in zip(cpu["naive"], cpu["worker"]))}


def _median(values: list[float]) -> float:
    v = sorted(values)
    return (v[len(v) // 2] + v[(len(v) - 1) // 2]) / 2


def parse_layouts(text: str) -> list[tuple[int, int]]:
    """"25:250,30:250" -> [(25, 250), (30, 250)]: frames per second and the keyframe interval in frames."""
    layouts = []
    for item in text.split(","):
        try:
            fps, gop = (int(v) for v in item.split(":"))
        except ValueError:
            raise SystemExit(f"--layouts: {item!r} is not FPS:GOP (e.g. 25:250)") from None
        if fps < 1 or gop < 1:
            raise SystemExit(f"--layouts: {item!r}: FPS and GOP must be positive")
        layouts.append((fps, gop))
    return layouts


def _layout_name(fps: int, gop: int, seconds: float) -> str:
    keyframes = math.ceil(seconds * fps / gop)
    every = "one keyframe per clip" if keyframes == 1 else f"a keyframe every {gop / fps:.3g} s"
    return f"{fps} fps, GOP {gop}: {every}"


def run_layout(folder: Path, args, fps: int, gop: int, width: int, height: int) -> dict:
    """Generate (or reuse) one layout's clips, check the picks, measure and print its table."""
    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(args.clips):
        path = folder / f"clip_{i:03d}.mp4"
        if not path.exists():
            make_clip(path, args.seconds, fps, width, height, gop, seed=i, content=args.content, preset=args.preset)
    print(f"\n== {_layout_name(fps, gop, args.seconds)}: {args.clips} clips of {args.seconds:g} s, {width}x{height}, "
          f"H.264 (libx264 {args.preset}, {args.content} content; {time.perf_counter() - t0:.1f} s to generate)")
    clips = sorted(str(p) for p in folder.glob("clip_*.mp4"))[: args.clips]
    check_same_picks(clips)
    print(f"both methods pick the same 4 frames of each clip (checked on all {len(clips)})")
    result = measure(folder, len(clips), args.repeat, keep_memory=not args.glibc_defaults)
    print(f"{'method':<34} {'clips/s':>8} {'best':>8} {'s/clip':>8} {'CPU s/clip':>11} {'faults/clip':>12} "
          f"{'peak RSS MB':>12} {'RSS rise MB':>12}")
    names = {"seek": "(a) read_frames, seek (this)", "naive": "(b) decode all, then subsample",
             "decode": "(c) (a) without the RGB pictures", "worker": "(d) (a) with one decoder thread"}
    for method, secs in result["seconds"].items():
        mem = result["memory"][method]
        median = _median(secs)
        print(f"{names[method]:<34} {args.clips / median:>8.2f} {args.clips / min(secs):>8.2f} "
              f"{median / args.clips:>8.3f} {_median(result['cpu'][method]) / args.clips:>11.3f} "
              f"{_median(result['faults'][method]) / args.clips:>12.0f} {mem['peak_rss_mb']:>12.0f} "
              f"{mem['rss_rise_mb']:>12.0f}")
    ratios, bounds, cpu_ratios = result["ratios"], result["bounds"], result["cpu_ratios"]
    print(f"speed-up of (a) over (b): {_median(ratios):.1f}x (target >= 5x); median of {len(ratios)} rounds, "
          f"each one pass of every method back to back; range {ratios[0]:.1f}x-{ratios[-1]:.1f}x")
    print(f"speed-up with the decoding alone, (b) over (c): {_median(bounds):.1f}x (range {bounds[0]:.1f}x-"
          f"{bounds[-1]:.1f}x): about the most a reader of exactly these frames can reach")
    print(f"CPU time per clip, (b) over (d): {_median(cpu_ratios):.1f}x (range {cpu_ratios[0]:.1f}x-"
          f"{cpu_ratios[-1]:.1f}x): the work saved, about the speed-up when every core is busy (prepare's workers "
          f"run (d); the baseline's own threads then find no idle core)")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layouts", default="25:250,30:250,25:50",
                    help="comma-separated FPS:GOP keyframe layouts, one measurement each (default: %(default)s)")
    ap.add_argument("--clips", type=int, default=12)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--size", default="640x360", help="WxH of the generated clips")
    ap.add_argument("--content", choices=["smooth", "noise"], default="smooth",
                    help="smooth: natural-video-like, mostly B-frames (default); noise: worst case, no B-frames")
    ap.add_argument("--preset", default="medium",
                    help="libx264 preset of the generated clips (default: %(default)s, ffmpeg's own default)")
    ap.add_argument("--repeat", type=int, default=7, help="rounds of one pass per method")
    ap.add_argument("--dir", help="use/keep the clips in this folder (one subfolder per layout) instead of a "
                                  "temporary one")
    ap.add_argument("--glibc-defaults", action="store_true",
                    help="let glibc hand freed memory back to the OS as it likes (the baseline then pays page faults "
                         "on some runs); by default every measuring process keeps it")
    ap.add_argument("--serve", choices=METHODS, help=argparse.SUPPRESS)  # internal: a measuring child
    args = ap.parse_args(argv)

    if args.serve:
        serve(args.serve, sorted(str(p) for p in Path(args.dir).glob("clip_*.mp4"))[: args.clips])
        return 0

    width, height = (int(v) for v in args.size.lower().split("x"))
    layouts = parse_layouts(args.layouts)
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench_prepare_") as tmp:
        base = Path(args.dir or tmp)
        for fps, gop in layouts:
            folder = base / f"{width}x{height}_{args.seconds:g}s_{fps}fps_gop{gop}_{args.content}_{args.preset}"
            result = run_layout(folder, args, fps, gop, width, height)
            summary.append((_layout_name(fps, gop, args.seconds), result))
    memory = "glibc's defaults" if args.glibc_defaults else "freed memory kept"
    print(f"\nsummary ({width}x{height}, {args.seconds:g} s clips, libx264 {args.preset}, 4 frames at 336x336, "
          f"{memory}; speed-ups are medians of {args.repeat} rounds, target >= 5x)")
    col = max(len(name) for name, _ in summary)
    print(f"{'layout':<{col}} {'seek clips/s':>12} {'all clips/s':>12} {'speed-up':>9} {'range':>11} "
          f"{'decoding alone':>15} {'CPU time':>9}")
    for name, result in summary:
        secs, ratios, bounds = result["seconds"], result["ratios"], result["bounds"]
        print(f"{name:<{col}} {args.clips / _median(secs['seek']):>12.2f} {args.clips / _median(secs['naive']):>12.2f} "
              f"{_median(ratios):>8.1f}x {f'{ratios[0]:.1f}-{ratios[-1]:.1f}x':>11} {_median(bounds):>14.1f}x "
              f"{_median(result['cpu_ratios']):>8.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
