"""Faults and bad input: nothing a user had is lost, nothing stale is used, every error is one line.

Each test injects one fault (a foreign output folder, a cut faststart MP4, a read-only or misplaced folder, a full
disk, SIGTERM to prepare's parent, a run folder of another configuration, an adapter for another base, a non-UTF-8
file, an oversized image) and checks what the tool does: exit code 2 for bad input, 1 for a failure, one line on
stderr naming the file and the fix, and no model loaded before the input is known to be good. The README's
"Reliability" table points at these tests.
"""

from __future__ import annotations

import csv
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import av
import pytest
from videos import index_of, write_truncated, write_video

import actionft.cli
import actionft.prepare as P
from actionft.errors import ActionftError, ResourceError, os_error, writable_folder
from actionft.frames import VideoError, read_frames

REPO = Path(__file__).resolve().parents[1]
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# -- helpers --------------------------------------------------------------------------------------------------
def run_cli(args: list[str], capsys) -> tuple[int, str, str]:
    code = actionft.cli.main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line(err: str) -> str:
    """The error as printed: exactly one line, no traceback."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def read_only(tmp_path, monkeypatch):
    """A folder nothing can be created in: mode 0555, or, as root (whom permissions do not stop), a read-only file
    system faked at `Path.mkdir` (EROFS for anything below it)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if not IS_ROOT:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if Path(os.path.abspath(self)).is_relative_to(folder):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    yield folder


READ_ONLY_WORDS = ("permission denied", "read-only")


@pytest.fixture
def no_model(monkeypatch):
    """Fail the test if any model weights load (checks must come first)."""
    import actionft.modeling

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the input was checked")

    monkeypatch.setattr(actionft.modeling, "load_model", refuse)
    monkeypatch.setattr(actionft.modeling, "load_processor", refuse)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    """Three good 3 s clips and their Kinetics-style annotation file."""
    root = tmp_path_factory.mktemp("fault_videos")
    videos = root / "videos"
    videos.mkdir()
    for name in ("aaa", "bbb", "ccc"):
        write_video(videos / f"{name}_000000_000003.mp4", n_frames=30, options={"preset": "ultrafast"})
    write_annotations(root / "ann.csv", ["aaa", "bbb", "ccc"])
    return root


def write_annotations(path: Path, names: list[str], end: int = 3) -> Path:
    """A Kinetics annotation CSV: clip `<name>_000000_<end:06d>` for each name."""
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["label", "youtube_id", "time_start", "time_end"])
        for name in names:
            w.writerow(["jumping", name, 0, end])
    return path


def prepare_args(clips: Path, out: Path, *extra) -> list:
    return ["prepare", clips / "videos", clips / "ann.csv", "--out", out, "--workers", "1", "--no-progress",
            "--size", "32", *extra]


# -- 1. prepare never writes over what it did not write ------------------------------------------------------
def foreign_dataset(folder: Path) -> dict[str, bytes]:
    """A dataset prepare did not write: its own data.json, metadata.csv and a clip folder of the same name."""
    (folder / "frames" / "aaa_000000_000003").mkdir(parents=True)
    (folder / "frames" / "aaa_000000_000003" / "frame_1.jpg").write_bytes(b"the user's own frame")
    (folder / "data.json").write_text('[{"messages": "the user\'s own records"}]')
    (folder / "metadata.csv").write_text("clip_id,split\nmine,train\n")
    return snapshot(folder)


def test_prepare_refuses_a_foreign_folder_and_leaves_it_untouched(tmp_path, clips, capsys):
    out = tmp_path / "existing_dataset"
    before = foreign_dataset(out)
    code, _, err = run_cli(prepare_args(clips, out), capsys)
    assert code == 2
    line = one_line(err)
    assert str(out) in line and "--overwrite" in line
    assert snapshot(out) == before  # not a byte changed, no marker written


def test_prepare_refuses_a_clip_folder_it_did_not_write(tmp_path, clips, capsys):
    out = tmp_path / "out"
    assert run_cli(prepare_args(clips, out), capsys)[0] == 0
    assert (out / P.MARKER).is_file()
    mine = out / "frames" / "zzz_000000_000003"  # a folder the user put into prepare's own output
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    before = snapshot(out)
    code, _, err = run_cli(prepare_args(clips, out), capsys)
    assert code == 2 and "zzz_000000_000003" in one_line(err) and "--overwrite" in err
    assert snapshot(out) == before


def test_prepare_overwrite_replaces_only_what_it_needs(tmp_path, clips, capsys):
    out = tmp_path / "existing_dataset"
    foreign_dataset(out)
    (out / "README.txt").write_text("the user's notes")
    code, printed, _ = run_cli(prepare_args(clips, out, "--overwrite"), capsys)
    assert code == 0 and "3 of 3 clips ready" in printed
    assert (out / "README.txt").read_text() == "the user's notes"  # files prepare does not write stay
    assert len(json.loads((out / "data.json").read_text())) == 3
    assert (out / "frames" / "aaa_000000_000003" / P.SIDECAR).is_file()
    # From now on the folder is prepare's: a rerun resumes (skips every clip) without --overwrite.
    code, printed, _ = run_cli(prepare_args(clips, out), capsys)
    assert code == 0 and "(0 new, 3 already done)" in printed


def test_prepare_resumes_a_folder_written_before_the_marker(tmp_path, clips, capsys):
    out = tmp_path / "out"
    assert run_cli(prepare_args(clips, out), capsys)[0] == 0
    (out / P.MARKER).unlink()  # as an older version left it: prepare's files only, every clip with done.json
    code, printed, _ = run_cli(prepare_args(clips, out), capsys)
    assert code == 0 and "(0 new, 3 already done)" in printed


def test_prepare_output_under_a_file(tmp_path, clips, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_cli(prepare_args(clips, tmp_path / "afile" / "out"), capsys)
    assert code == 2 and "afile is a file" in one_line(err)
    code, _, err = run_cli(prepare_args(clips, tmp_path / "afile"), capsys)
    assert code == 2 and "is a file, not a folder" in one_line(err)


def test_prepare_read_only_output(clips, capsys, read_only):
    code, _, err = run_cli(prepare_args(clips, read_only / "out"), capsys)
    assert code == 2 and any(w in one_line(err) for w in READ_ONLY_WORDS) and str(read_only / "out") in err


def test_prepare_disk_full_stops_with_one_line_and_leaves_nothing_half_written(tmp_path, clips, capsys,
                                                                                  monkeypatch):
    from PIL import Image

    out = tmp_path / "out"
    real_save = Image.Image.save
    saved = []

    def fills_the_disk(self, fp, *args, **kwargs):
        if len(saved) >= 5:  # the disk fills up in the middle of the second clip
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fp))
        saved.append(fp)
        return real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", fills_the_disk)
    code, _, err = run_cli(prepare_args(clips, out), capsys)
    assert code == 1
    line = one_line(err)
    assert "no space left" in line and "bbb_000000_000003" in line
    assert not (out / "data.json").exists()  # no records for a run that did not finish
    assert not [p for p in (out / "frames").iterdir() if p.name.startswith(".")]  # no half-written folder
    assert [p.name for p in (out / "frames").iterdir()] == ["aaa_000000_000003"]  # the finished clip is kept
    monkeypatch.setattr(Image.Image, "save", real_save)
    code, printed, _ = run_cli(prepare_args(clips, out), capsys)  # space freed: the same command finishes
    assert code == 0 and "(2 new, 1 already done)" in printed


# -- 2. truncated clips, whatever the container layout -------------------------------------------------------
def faststart(src: Path, dst: Path) -> Path:
    """`src` remuxed with its index (moov) at the start, as most download tools write MP4."""
    with av.open(str(src)) as inp, av.open(str(dst), "w", format="mp4", options={"movflags": "faststart"}) as out:
        stream = out.add_stream_from_template(inp.streams.video[0])
        for packet in inp.demux(inp.streams.video[0]):
            if packet.dts is None:
                continue
            packet.stream = stream
            out.mux(packet)
    assert dst.read_bytes()[:64].find(b"moov") > 0  # the index sits before the data
    return dst


@pytest.fixture(scope="module")
def cut_clips(tmp_path_factory) -> Path:
    """A 10 s faststart MP4 cut at half its size, and one whose second half is zeroed (index intact)."""
    root = tmp_path_factory.mktemp("cut")
    src = write_video(root / "src.mp4", n_frames=100, fps=10, options={"preset": "ultrafast"}).path
    whole = faststart(src, root / "whole.mp4")
    videos = root / "videos"
    videos.mkdir()
    write_truncated(whole, videos / "cut_000000_000010.mp4")
    data = bytearray(whole.read_bytes())
    half = len(data) // 2
    data[half:] = bytes(len(data) - half)
    (videos / "zeroed_000000_000010.mp4").write_bytes(bytes(data))
    write_video(videos / "fine_000000_000010.mp4", n_frames=100, fps=10, options={"preset": "ultrafast"})
    return root


def test_whole_faststart_clip_reads_normally(cut_clips):
    images, times, info = read_frames(cut_clips / "whole.mp4", 4)
    same, same_times, _ = read_frames(cut_clips / "src.mp4", 4)
    assert info.duration == pytest.approx(10.0) and times == pytest.approx([1.3, 3.8, 6.3, 8.8])
    assert times == same_times and [index_of(i, 100) for i in images] == [index_of(i, 100) for i in same]


@pytest.mark.parametrize("name", ["cut_000000_000010.mp4", "zeroed_000000_000010.mp4"])
def test_truncated_faststart_clip_is_a_truncated_failure(cut_clips, name):
    with pytest.raises(VideoError) as err:
        read_frames(cut_clips / "videos" / name, 4)
    assert err.value.kind == "truncated" and name in str(err.value) and "re-download" in str(err.value)


def test_prepare_reports_truncated_clips_by_name(cut_clips, tmp_path, capsys):
    ann = write_annotations(tmp_path / "ann.csv", ["cut", "zeroed", "fine"], end=10)
    out = tmp_path / "out"
    code, printed, _ = run_cli(["prepare", cut_clips / "videos", ann, "--out", out, "--workers", "1",
                                "--no-progress", "--size", "32"], capsys)
    assert code == 1 and "truncated 2" in printed
    with (out / "failures.csv").open(newline="") as fh:
        failures = {row["clip_id"]: row["reason"] for row in csv.DictReader(fh)}
    assert set(failures) == {"cut_000000_000010", "zeroed_000000_000010"}
    assert all("truncated" in reason for reason in failures.values())
    with (out / "metadata.csv").open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["clip_id"] for r in rows] == ["fine_000000_000010"]
    times = [float(t) for t in rows[0]["timestamps"].split()]
    assert len(set(times)) == 4  # four different frames, no repeated last one


# -- 5. SIGTERM to prepare's parent stops the whole pool -----------------------------------------------------
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_sigterm_to_prepare_stops_its_workers(clips, tmp_path, sig):
    """`kill PID` (SIGTERM, to the parent only) stops the pool with it; even SIGKILL, which the parent cannot
    handle, leaves no orphan (the kernel signals the workers when their parent dies)."""
    psutil = pytest.importorskip("psutil")
    out = tmp_path / "out"
    script = (
        "import sys, time, actionft.prepare as P\n"
        "real = P._extract\n"
        "def slow(task):\n"  # the workers are busy when the signal comes
        "    time.sleep(30)\n"
        "    return real(task)\n"
        "P._extract = slow\n"
        "from actionft.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    args = [str(a) for a in prepare_args(clips, out)]
    args[args.index("--workers") + 1] = "2"
    proc = subprocess.Popen([sys.executable, "-c", script, *args], stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    workers = []
    try:
        parent = psutil.Process(proc.pid)
        deadline = time.monotonic() + 60
        while len(workers) < 2 and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            workers = [c for c in parent.children(recursive=True) if "python" in c.name().lower()]
            time.sleep(0.1)
        assert len(workers) >= 2, "the pool never started"
        time.sleep(0.5)  # the workers have taken their first clips
        proc.send_signal(sig)  # to the parent only, as `kill PID` does
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
        gone, alive = psutil.wait_procs(workers, timeout=10)
        for w in alive:
            w.kill()
    assert not alive, f"orphaned workers: {alive}"
    if sig == signal.SIGTERM:
        assert proc.returncode == 143 and "interrupted" in proc.stderr.read()
    else:
        assert proc.returncode == -signal.SIGKILL
    assert not (out / "data.json").exists()


# -- 3. a run folder belongs to one configuration ------------------------------------------------------------
@pytest.fixture(scope="module")
def train_params(tmp_path_factory) -> dict:
    from actionft.synth import generate_dataset

    root = tmp_path_factory.mktemp("fault_train")
    generate_dataset(root / "synth", clips_per_class=2, val_per_class=0, test_per_class=1, frame_size=48,
                     videos=False, progress=False)
    return {
        "model_id": "tiny", "max_soft_tokens": 70, "bf16": False, "lora_dropout": 0.0, "dataloader_num_workers": 0,
        "logging_steps": 1, "warmup_ratio": 0.0, "gradient_checkpointing": False, "deepspeed": None,
        "optim": "adamw_torch", "seed": 42, "data_path": str(root / "synth" / "data.json"),
        "image_folder": str(root / "synth"), "metadata_path": str(root / "synth" / "metadata.csv"),
        "output_root": str(root / "outputs"), "max_steps": 2, "save_steps": 1, "save_total_limit": 2,
        "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "val_fraction": 0.0,
        "max_train_samples": 4,
    }


def write_params(path: Path, params: dict) -> Path:
    path.write_text(json.dumps(params))  # JSON is YAML
    return path


def test_run_folder_refuses_another_configuration(train_params, tmp_path, capsys, no_model):
    from actionft.train import resolve_config

    params = {**train_params, "run_name": "bound", "output_root": str(tmp_path)}
    run = tmp_path / "bound"
    run.mkdir()
    (run / "train_config.json").write_text(json.dumps(resolve_config(params)))
    before = snapshot(run)
    other = write_params(tmp_path / "other.yaml", {**params, "learning_rate": 1e-3})
    code, _, err = run_cli(["train", "--params", other], capsys)
    assert code == 2
    line = one_line(err)
    assert "learning_rate 0.002 -> 0.001" in line and "run_name" in line
    assert snapshot(run) == before  # the old run's record is kept
    # settings that do not change what a run computes may differ on a resume
    from actionft.train import check_run_folder

    check_run_folder(resolve_config({**params, "logging_steps": 5, "resume_from_checkpoint": "latest"}), run)


def test_missing_resume_checkpoint_is_reported_before_the_model_loads(train_params, tmp_path, capsys, no_model):
    params = {**train_params, "run_name": "fresh", "output_root": str(tmp_path)}
    for resume, words in (("latest", "no complete checkpoint"), (str(tmp_path / "nope"), "no such folder")):
        path = write_params(tmp_path / "p.yaml", {**params, "resume_from_checkpoint": resume})
        code, _, err = run_cli(["train", "--params", path], capsys)
        assert code == 2 and words in one_line(err)


def test_run_folder_read_only(train_params, tmp_path, capsys, no_model, read_only):
    path = write_params(tmp_path / "p.yaml", {**train_params, "output_root": str(read_only), "run_name": "r"})
    code, _, err = run_cli(["train", "--params", path], capsys)
    assert code == 2 and any(w in one_line(err) for w in READ_ONLY_WORDS) and str(read_only / "r") in err


def test_a_fresh_start_sets_earlier_checkpoints_aside(train_params, tmp_path, no_model):
    """Starting a run over in its folder keeps the earlier attempt's checkpoints, out of reach of `latest` and of
    the Trainer's rotation: a later resume can only continue the new attempt."""
    from actionft.errors import ActionftError
    from actionft.train import latest_checkpoint, prepare, resolve_config

    params = {**train_params, "run_name": "again", "output_root": str(tmp_path)}
    run = tmp_path / "again"
    (run / "checkpoints" / "checkpoint-60").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-60" / "trainer_state.json").write_text('{"global_step": 60}')
    (run / "train_config.json").write_text(json.dumps(resolve_config(params)))
    with pytest.raises(AssertionError, match="a model was loaded"):  # the checks and the set-aside come first
        prepare(params, progress=False)
    assert (run / "checkpoints" / "previous-1" / "checkpoint-60" / "trainer_state.json").is_file()
    with pytest.raises(ActionftError, match="no complete checkpoint"):
        latest_checkpoint(run / "checkpoints")


def test_resume_refuses_a_dataset_that_changed(train_params, tmp_path, no_model):
    """Same settings, same paths, other contents (the dataset was prepared again): `latest` is refused before the
    model loads; the run's record of its data is kept."""
    from actionft.errors import ActionftError
    from actionft.train import RUN_DATA, _data_fingerprint, prepare, resolve_config

    data = tmp_path / "data.json"
    data.write_bytes(Path(train_params["data_path"]).read_bytes())
    params = {**train_params, "run_name": "moved", "output_root": str(tmp_path), "data_path": str(data)}
    run = tmp_path / "moved"
    (run / "checkpoints" / "checkpoint-1").mkdir(parents=True)
    (run / "checkpoints" / "checkpoint-1" / "trainer_state.json").write_text('{"global_step": 1}')
    (run / "train_config.json").write_text(json.dumps(resolve_config(params)))
    (run / RUN_DATA).write_text(json.dumps(_data_fingerprint(resolve_config(params))))
    records = json.loads(data.read_text())
    data.write_text(json.dumps(records[1:] + records[:1]))  # the same samples, another order: another run
    before = (run / RUN_DATA).read_text()
    with pytest.raises(ActionftError, match="changed since the run started"):
        prepare({**params, "resume_from_checkpoint": "latest"}, progress=False)
    assert (run / RUN_DATA).read_text() == before
    data.write_bytes(Path(train_params["data_path"]).read_bytes())  # back as it was: the resume goes on
    with pytest.raises(AssertionError, match="a model was loaded"):
        prepare({**params, "resume_from_checkpoint": "latest"}, progress=False)


@pytest.mark.slow
def test_finished_run_resumed_adds_no_step_and_disk_full_is_one_line(train_params, tmp_path, monkeypatch):
    """A 2-step run (checkpoint every step) on the tiny model, in this process without DeepSpeed; then `latest` on
    the finished run takes no step; a full disk while training is one line that says how to go on."""
    import torch

    from actionft.train import fit, prepare, train

    torch.set_num_threads(1)
    params = {**train_params, "run_name": "done", "output_root": str(tmp_path)}
    summary = train(params, progress=False)
    run = tmp_path / "done"
    assert summary["global_step"] == 2
    adapter = (run / "adapter" / "adapter_model.safetensors").read_bytes()

    trainer, info = prepare({**params, "resume_from_checkpoint": "latest"}, progress=False)
    assert info["resume"].endswith("checkpoint-2")
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    again = fit(trainer, info)
    assert again["global_step"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert json.loads((run / "trainer_state.json").read_text())["global_step"] == 2
    # Killed after the last checkpoint but before the adapter was saved: the adapter comes from the checkpoint.
    import shutil

    shutil.rmtree(run / "adapter")
    (run / "trainer_state.json").unlink()
    again = fit(trainer, info)
    assert again["global_step"] == 2
    assert (run / "adapter" / "adapter_model.safetensors").read_bytes() == adapter
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "trainer_state.json").is_file()

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "checkpoints" / "checkpoint-1"))

    monkeypatch.setattr(trainer, "train", disk_full)
    info["resume"] = None
    with pytest.raises(ResourceError) as err:
        fit(trainer, info)
    assert "no space left" in str(err.value) and "resume_from_checkpoint=latest" in str(err.value)
    assert err.value.exit_code == 1 and "\n" not in str(err.value)


# -- 4. evaluate and predict check everything before loading a model -----------------------------------------
def adapter_for(folder: Path, in_features: int | None = None) -> Path:
    """An adapter folder whose one LoRA pair targets layer 0's q_proj; `in_features` None: the tiny base's size."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from actionft.modeling import resolve_model_id

    name = "model.language_model.layers.0.self_attn.q_proj"
    with torch.device("meta"):
        module = dict(Gemma4ForConditionalGeneration(AutoConfig.from_pretrained(resolve_model_id("tiny")))
                      .named_modules())[name]
    folder.mkdir(parents=True)
    save_file({f"base_model.model.{name}.lora_A.weight": torch.zeros(4, in_features or module.in_features),
               f"base_model.model.{name}.lora_B.weight": torch.zeros(module.out_features, 4)},
              str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "google/gemma-4-e4b-it",
                                                            "peft_type": "LORA", "r": 4}))
    return folder


def test_adapter_for_another_base_is_one_line(tmp_path, capsys, no_model):
    from actionft.infer import check_adapter

    assert check_adapter("tiny", adapter_for(tmp_path / "fits")) == "adapter"
    other = adapter_for(tmp_path / "e4b", in_features=2560)
    frame = tmp_path / "f.jpg"
    from PIL import Image

    Image.new("RGB", (32, 32)).save(frame)
    code, _, err = run_cli(["predict", "--adapter", other, *[frame] * 4], capsys)
    assert code == 2
    line = one_line(err)
    assert "trained for another base model" in line and "2560" in line and "google/gemma-4-e4b-it" in line
    code, _, err = run_cli(["predict", "--adapter", tmp_path / "missing", *[frame] * 4], capsys)
    assert code == 2 and "does not exist" in one_line(err)


@pytest.fixture
def eval_params(train_params, tmp_path) -> Path:
    return write_params(tmp_path / "eval.yaml", {**train_params, "test_fraction": 0.5})


def test_evaluate_checks_split_output_and_adapter_first(eval_params, tmp_path, capsys, no_model):
    adapter = adapter_for(tmp_path / "adapter")
    (tmp_path / "afile").write_text("x")
    cases = [
        (["--adapter", adapter, "--out", tmp_path / "afile" / "out"], "afile is a file"),
        (["--adapter", adapter, "--out", tmp_path / "out", "--split", "bogus"], "unknown split 'bogus'"),
        (["--adapter", tmp_path / "none", "--out", tmp_path / "out"], "does not exist"),
    ]
    for extra, words in cases:
        code, _, err = run_cli(["evaluate", "--params", eval_params, *extra], capsys)
        assert code == 2 and words in one_line(err), err


def test_evaluate_read_only_output(eval_params, tmp_path, capsys, no_model, read_only):
    adapter = adapter_for(tmp_path / "a")
    code, _, err = run_cli(["evaluate", "--params", eval_params, "--adapter", adapter, "--out", read_only / "m"],
                           capsys)
    assert code == 2 and any(w in one_line(err) for w in READ_ONLY_WORDS) and str(read_only / "m") in err


# -- 6. bad input is one line, per sample where it concerns one sample ---------------------------------------
@pytest.fixture
def small_bomb_limit(monkeypatch):
    """PIL's decompression-bomb limit lowered so that a 64x64 picture trips it, as a 14000x14000 one does."""
    from PIL import Image

    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the error comes above twice the limit


def tiny_dataset(folder: Path, sizes: list[int]) -> Path:
    from PIL import Image

    from actionft.prepare import record

    records = []
    for i, size in enumerate(sizes):
        clip = folder / "frames" / f"clip{i}"
        clip.mkdir(parents=True)
        for k in range(1, 5):
            Image.new("RGB", (size, size)).save(clip / f"frame_{k}.jpg")
        records.append(record(f"clip{i}", 4, "What happens?", "Something."))
    (folder / "data.json").write_text(json.dumps(records))
    return folder / "data.json"


def test_oversized_image_is_a_problem_of_its_sample(tmp_path, capsys, small_bomb_limit, no_model):
    data = tiny_dataset(tmp_path, [16, 64, 16])
    code, printed, err = run_cli(["validate", data, "--image-folder", tmp_path], capsys)
    assert code == 1 and "Traceback" not in err and "error" not in err
    assert "valid: 2  bad: 1" in printed and "sample 1" in printed and "too large" in printed
    code, _, err = run_cli(["predict", *sorted((tmp_path / "frames" / "clip1").glob("*.jpg"))], capsys)
    assert code == 2 and "too large" in one_line(err) and "clip1" in err
    from actionft.data import load_dataset

    with pytest.raises(ActionftError, match="sample 1 .*too large"):  # what train sees, before any model loads
        load_dataset(data, tmp_path, progress=False)


def test_non_utf8_and_folders_given_as_files(tmp_path, capsys):
    latin = tmp_path / "latin1.json"
    latin.write_bytes('[{"messages": "caf\u00e9"}]'.encode("latin-1"))
    (tmp_path / "frames").mkdir()
    folder = tmp_path / "frames"
    for args, named, words in (
        (["validate", latin, "--image-folder", tmp_path], latin, "is not UTF-8"),
        (["validate", folder, "--image-folder", tmp_path], folder, "is a folder, not a file"),
        (["train", "--params", latin], latin, "is not UTF-8"),
        (["train", "--params", folder], folder, "is a folder, not a file"),
        (["prepare", tmp_path, folder, "--out", tmp_path / "o"], folder, "is a folder, not a file"),
    ):
        code, _, err = run_cli(args, capsys)
        assert code == 2 and words in one_line(err) and str(named) in err, (args, err)


def test_os_errors_become_one_line_with_the_fix(tmp_path):
    full = os_error(OSError(errno.ENOSPC, "No space left on device", "/data/x.jpg"), "cannot write")
    assert isinstance(full, ResourceError) and full.exit_code == 1 and "/data/x.jpg" in str(full)
    read_only = os_error(OSError(errno.EROFS, "Read-only file system", "/mnt/x"))
    assert read_only.exit_code == 2 and "read-only" in str(read_only)
    (tmp_path / "f").write_text("x")
    with pytest.raises(ActionftError, match="is a file"):
        writable_folder(tmp_path / "f" / "sub")
    assert writable_folder(tmp_path / "new" / "sub").is_dir()


# -- 7. validate and --help do not load torch ----------------------------------------------------------------
@pytest.mark.parametrize("args", [["--help"], ["validate", "--help"], ["validate", "DATA", "--image-folder", "IMG"]])
def test_validate_and_help_do_not_import_torch(tmp_path, args):
    data = tiny_dataset(tmp_path, [16])
    args = [str(data) if a == "DATA" else str(tmp_path) if a == "IMG" else a for a in args]
    script = ("import sys\nfrom actionft.cli import main\ntry:\n    code = main(sys.argv[1:])\n"
              "except SystemExit as e:\n    code = e.code\nprint('RESULT', code, 'torch' in sys.modules)\n")
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=120)
    assert "RESULT 0 False" in proc.stdout, proc.stdout + proc.stderr


def test_lazy_help_matches_the_commands(monkeypatch):
    """The help `actionft --help` shows without importing the modules is each command's own."""
    parser = actionft.cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    helps = {c.dest: c.help for c in sub._choices_actions}
    assert helps == actionft.cli.HELP


def test_write_json_never_leaves_half_a_file(tmp_path, monkeypatch):
    """A disk that fills while results are written keeps the previous file whole and names the file in one line."""
    from actionft.errors import write_json

    target = tmp_path / "metrics.json"
    write_json(target, {"top1": 0.5})
    real_write = Path.write_text

    def full_disk(self, text, *a, **k):
        real_write(self, text[: len(text) // 2], *a, **k)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full_disk)
    with pytest.raises(ActionftError, match="metrics.json") as err:
        write_json(target, {"top1": 0.9, "padding": "x" * 1000})
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    assert json.loads(target.read_text()) == {"top1": 0.5}
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.json"]
