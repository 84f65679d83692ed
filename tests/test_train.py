"""actionft.train: dry-run step counts, the honest per-token loss, kill + resume, launchers on CPU, per-module learning
rates and LoRA targets.

Training runs use the packaged tiny Gemma 4 on CPU, fp32, LoRA dropout 0, through the real `actionft train` command
(DeepSpeed ZeRO-2, `paged_adamw_8bit`, cosine schedule: the reference setup) in their own processes. Each process gets
one thread: on two shared cores more threads only fight each other (measured beside another training job: a
micro-step of one clip took 0.07 s with one thread, 2 to 10 s with two). Runs that use DeepSpeed never run inside the pytest process, because DeepSpeed and accelerate keep
process-wide state (process group, AcceleratorState) that would leak into other tests.
"""

from __future__ import annotations

import base64
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
REFERENCE_PARAMS = REPO / "params" / "gemma4_e4b_kinetics3k.yaml"
SAMPLE_PARAMS = REPO / "params" / "kinetics3k_sample.yaml"
HOSTFILE = REPO / "params" / "deepspeed" / "hostfile.example"
ZERO2 = "params/deepspeed/zero2.json"
# set by launchers; a parent that has them (e.g. after an in-process DeepSpeed run) must not hand them down
LAUNCH_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "MASTER_ADDR",
               "MASTER_PORT", "TORCHELASTIC_RUN_ID")

# Shared by every training run here: small, deterministic and comparable across runs.
TRAIN_BASE = {
    "model_id": "tiny", "max_soft_tokens": 70, "bf16": False, "lora_dropout": 0.0, "dataloader_num_workers": 0,
    "logging_steps": 1, "save_steps": 100, "warmup_ratio": 0.0, "gradient_checkpointing": False,
    "deepspeed": ZERO2, "seed": 42,
}
LOSS_STEPS = 6


# -- helpers --------------------------------------------------------------------------------------------------
def cpu_env(**extra: str) -> dict[str, str]:
    """Environment for a training subprocess: offline, CPU only, one thread, no inherited launcher variables."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    env.update(extra)
    return env


def actionft_cmd(*args: str) -> list[str]:
    """The `actionft` entry point of this environment (as a user types it), else `python -m actionft.cli`."""
    exe = BIN / "actionft"
    return [str(exe), *args] if exe.is_file() else [sys.executable, "-m", "actionft.cli", *args]


def sets(**overrides) -> list[str]:
    """`--set key=value` pairs; JSON literals are valid YAML, which is how `--set` reads values."""
    out = []
    for key, value in overrides.items():
        out += ["--set", f"{key}={json.dumps(str(value) if isinstance(value, Path) else value)}"]
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(proc_or_text, n: int = 4000) -> str:
    text = proc_or_text if isinstance(proc_or_text, str) else (proc_or_text.stdout or "") + (proc_or_text.stderr or "")
    return text[-n:]


def run_checked(cmd: list[str], env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    assert proc.returncode == 0, f"{shlex.join(cmd)} failed ({proc.returncode}):\n{tail(proc)}"
    return proc


def losses(state: dict) -> dict[int, float]:
    """{step: logged training loss} from a trainer_state.json; a step logged twice is an error."""
    out: dict[int, float] = {}
    for entry in state["log_history"]:
        if "loss" in entry:
            assert entry["step"] not in out, f"step {entry['step']} logged twice: {state['log_history']}"
            out[entry["step"]] = entry["loss"]
    return out


def grad_norms(state: dict) -> dict[int, float]:
    return {e["step"]: e["grad_norm"] for e in state["log_history"] if "grad_norm" in e}


@pytest.fixture
def one_thread():
    """In-process model work with one thread (see the module docstring), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- data -----------------------------------------------------------------------------------------------------
def reference_records(n: int, answer_words=(5, 9, 14)) -> list[dict]:
    """`n` records in the Kinetics-3K format (4 image items + the question, one answer); no image files exist."""
    from actionft import DEFAULT_PROMPT

    records = []
    for i in range(n):
        clip = f"clip{i:05d}_000000_000010"
        answer = " ".join(["someone"] * answer_words[i % len(answer_words)]) + "."
        records.append({"messages": [
            {"role": "user", "content": [{"type": "image", "image": f"frames/{clip}/frame_{k}.jpg"} for k in range(1, 5)]
             + [{"type": "text", "text": DEFAULT_PROMPT}]},
            {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        ]})
    return records


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A small generated dataset (9 classes x 3 clips: 9 train, 9 val, 9 test, 48x48 frames, no videos) and
    `varied.json`: 8 of its clips whose answers are 1, 3, 5 or 7 copies of the clip's sentence (4 to 35 words), so
    that a per-sample mean and a per-token mean of the loss differ."""
    from actionft.synth import generate_dataset

    root = tmp_path_factory.mktemp("train_data")
    synth = root / "synth"
    generate_dataset(synth, clips_per_class=3, val_per_class=1, test_per_class=1, frame_size=48, videos=False,
                     progress=False)
    records = json.loads((synth / "data.json").read_text())[:8]
    for i, record in enumerate(records):
        answer = record["messages"][1]["content"][0]
        answer["text"] = " ".join([answer["text"]] * (1 + 2 * (i % 4)))
    varied = synth / "varied.json"
    varied.write_text(json.dumps(records, indent=1))
    base = dict(TRAIN_BASE, output_root=str(root / "outputs"), image_folder=str(synth))
    params = root / "params.yaml"
    params.write_text(json.dumps(base))  # JSON is YAML
    return SimpleNamespace(
        root=root, synth=synth, varied=varied, params=params, outputs=root / "outputs",
        # the 8 varied clips, all in the training split: one optimizer step of 8 samples sees all of them
        varied_params={"data_path": varied, "metadata_path": None, "val_fraction": 0.0, "test_fraction": 0.0},
        # the generated set with its own splits (9 train, 9 val)
        synth_params={"data_path": synth / "data.json", "metadata_path": synth / "metadata.csv"},
    )


def launch(data, run_name: str, **overrides) -> subprocess.Popen:
    cmd = actionft_cmd("train", "--params", str(data.params), *sets(run_name=run_name, **overrides))
    with open(data.root / f"{run_name}.log", "w") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=cpu_env(), cwd=REPO,
                                start_new_session=True)


def finish(data, run_name: str, proc: subprocess.Popen, timeout: int = 600) -> dict:
    """Wait for a run; return its trainer_state.json (with the run folder under "run_dir")."""
    try:
        proc.wait(timeout=timeout)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    log = (data.root / f"{run_name}.log").read_text()
    assert proc.returncode == 0, f"run {run_name} failed ({proc.returncode}):\n{tail(log)}"
    run = data.outputs / run_name
    state = json.loads((run / "trainer_state.json").read_text())
    state["run_dir"] = run
    return state


@pytest.fixture(scope="module")
def loss_runs(data):
    """Three runs on the 8 varied clips, started together: micro-batch 1 x accumulation 8 and 8 x 1 (checkpointing
    off), and 8 x 1 with gradient checkpointing on. 6 optimizer steps each; every step sees all 8 clips."""
    specs = {
        "b1x8": {"per_device_train_batch_size": 1, "gradient_accumulation_steps": 8},
        "b8x1": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1},
        "b8x1_ckpt": {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1,
                      "gradient_checkpointing": True},
    }
    procs = {name: launch(data, name, max_steps=LOSS_STEPS, **data.varied_params, **spec)
             for name, spec in specs.items()}
    try:
        return {name: finish(data, name, proc) for name, proc in procs.items()}
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)


# -- 1. dry run -----------------------------------------------------------------------------------------------
@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if anything tries to load a model or a processor."""
    import actionft.modeling
    import actionft.train

    def refuse(*args, **kwargs):
        raise AssertionError("a dry run must not load weights or a processor")

    for module, name in ((actionft.modeling, "load_model"), (actionft.modeling, "load_processor"),
                         (actionft.train, "build_model")):
        monkeypatch.setattr(module, name, refuse)
    for var in LAUNCH_VARS:
        monkeypatch.delenv(var, raising=False)


def dry_run_cli(capsys, params_file: Path, *overrides: str) -> dict:
    """`actionft train --params FILE --dry-run [--set ...]` in process; the printed numbers as a dict."""
    from actionft.cli import main

    assert main(["train", "--params", str(params_file), *overrides, "--dry-run"]) == 0
    out = capsys.readouterr().out
    found = {}
    for key, pattern in {"train": r"train samples: (\d+)", "val": r"val: (\d+)", "test": r"test: (\d+)",
                         "processes": r"processes: (\d+)", "effective_batch": r"effective batch: (\d+)",
                         "steps": r"optimizer steps: (\d+)"}.items():
        match = re.search(pattern, out)
        assert match, f"dry run output lacks {pattern!r}:\n{out}"
        found[key] = int(match.group(1))
    found["out"] = out
    return found


def test_dry_run_reference_params_give_1170_steps_and_batch_8(tmp_path, capsys, no_weights):
    """seed_run.md: 3,115 clips, 3 epochs, micro-batch 1 x accumulation 8 on 1 GPU -> effective batch 8 and
    ceil(3115 / 8) = 390 steps per epoch, 1,170 in all. The frames do not exist: a dry run opens no file."""
    data_json = tmp_path / "kinetic_3K.json"
    data_json.write_text(json.dumps(reference_records(3115)))
    images = tmp_path / "no_such_image_folder"
    got = dry_run_cli(capsys, REFERENCE_PARAMS, *sets(data_path=data_json, image_folder=images,
                                                      output_root=tmp_path / "outputs"))
    assert (got["train"], got["val"], got["test"]) == (3115, 0, 0)
    assert got["processes"] == 1 and got["effective_batch"] == 8 and got["steps"] == 1170
    assert "model_id: google/gemma-4-e4b-it" in got["out"] and "num_train_epochs: 3" in got["out"]
    assert not images.exists() and not (tmp_path / "outputs").exists()  # nothing read, nothing written

    # the same data on 2 processes: each reads ceil(3115 / 2) = 1558 micro-batches an epoch -> 195 steps
    got = dry_run_cli(capsys, REFERENCE_PARAMS, *sets(data_path=data_json, image_folder=images, num_processes=2))
    assert got["processes"] == 2 and got["effective_batch"] == 16 and got["steps"] == 3 * 195


def test_dry_run_real_sample_counts(capsys, no_weights):
    """The real 200-clip sample: its params hold out 10% val + 10% test (by a hash of the clip id), leaving 167
    training clips -> 3 * ceil(167 / 8) = 63 steps. With every clip in training, 3 * 200 / 8 = 75."""
    from actionft.paths import resolve_path
    from actionft.params import load_params

    params = load_params(SAMPLE_PARAMS)
    if not resolve_path(params["data_path"]).is_file():
        pytest.skip(f"the Kinetics-3K sample is not here ({params['data_path']})")
    got = dry_run_cli(capsys, SAMPLE_PARAMS)
    assert (got["train"], got["val"], got["test"]) == (167, 13, 20)
    assert got["effective_batch"] == 8 and got["steps"] == 63
    got = dry_run_cli(capsys, SAMPLE_PARAMS, *sets(val_fraction=0.0, test_fraction=0.0))
    assert (got["train"], got["val"], got["test"]) == (200, 0, 0)
    assert got["effective_batch"] == 8 and got["steps"] == 75


# -- 4a. launcher arguments and the multi-node hostfile (no training) -----------------------------------------
def test_strip_launcher_args():
    from actionft.cli import strip_launcher_args

    rest = ["train", "--params", "p.yaml"]
    assert strip_launcher_args(["--local_rank=1", *rest]) == rest
    assert strip_launcher_args(["--local-rank=0", *rest]) == rest
    assert strip_launcher_args(["--local_rank", "3", *rest]) == rest
    assert strip_launcher_args(rest) == rest


def documented_commands(text: str) -> list[str]:
    """`deepspeed --hostfile ...` command lines in a text (comment markers and line continuations removed)."""
    lines = [re.sub(r"^\s*#\s?", "", line) for line in text.splitlines()]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [m.group(0).strip().rstrip("`") for m in re.finditer(r"deepspeed --hostfile[^\n`]*", joined)]


def test_hostfile_example_and_its_command_dry_run(tmp_path, capsys, no_weights, monkeypatch):
    """Launch mode (c): DeepSpeed reads the example hostfile; the command documented beside it (and in the README
    or docs, where they show one) parses with DeepSpeed's runner and with `actionft`; the runner would start 2 x 8
    processes through pdsh; and the dry run that each of those 16 processes would do counts the steps for 16."""
    from deepspeed.launcher import runner
    from deepspeed.launcher.multinode_runner import PDSHRunner

    from actionft.cli import build_parser, strip_launcher_args

    pool = runner.fetch_hostfile(str(HOSTFILE))
    assert dict(pool) == {"node-1": 8, "node-2": 8}

    texts = {HOSTFILE: HOSTFILE.read_text()}
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if doc.is_file() and "--hostfile" in doc.read_text():
            texts[doc] = doc.read_text()
    commands = {(path, cmd) for path, text in texts.items() for cmd in documented_commands(text)}
    assert any(path == HOSTFILE for path, _ in commands), "hostfile.example should show its deepspeed command"
    for path, command in commands:
        argv = shlex.split(command)
        assert argv[0] == "deepspeed", f"{path.name}: {command}"
        args = runner.parse_args(argv[1:])
        if path == HOSTFILE:
            assert Path(args.hostfile).resolve() == HOSTFILE.resolve(), command
        assert args.module and args.user_script == "actionft.cli", f"{path.name}: {command}"
        assert args.master_addr, f"{path.name}: without --master_addr the runner asks node 1 over ssh"
        cli_args = build_parser().parse_args(strip_launcher_args(["--local_rank=0", *args.user_args]))
        assert cli_args.command == "train" and Path(REPO / cli_args.params).is_file(), f"{path.name}: {command}"

    # What the runner would launch for the hostfile command (pdsh itself is not needed to build the command).
    _, command = sorted(c for c in commands if c[0] == HOSTFILE)[0]
    args = runner.parse_args(shlex.split(command)[1:])
    cli_args = build_parser().parse_args(args.user_args)
    active = runner.apply_num_nodes_and_gpus(runner.parse_inclusion_exclusion(pool, "", ""), args.num_nodes,
                                             args.num_gpus)
    world_info = runner.encode_world_info(active)
    cmd, _, _ = PDSHRunner(args, world_info).get_cmd({}, active)
    assert cmd[0] == "pdsh" and cmd[cmd.index("-w") + 1] == "node-1,node-2"
    assert "--node_rank=%n" in cmd and "--master_addr=node-1" in cmd and "--module" in cmd
    assert cmd[-len(args.user_args) - 1:] == ["actionft.cli", *args.user_args]
    world = json.loads(base64.urlsafe_b64decode(world_info))
    n_processes = sum(len(slots) for slots in world.values())
    assert n_processes == 16

    # each launched process sees WORLD_SIZE=16: 3 epochs of ceil(ceil(3115 / 16) / 8) = 25 steps, batch 128
    data_json = tmp_path / "kinetic_3K.json"
    data_json.write_text(json.dumps(reference_records(3115)))
    monkeypatch.setenv("WORLD_SIZE", str(n_processes))
    got = dry_run_cli(capsys, REPO / cli_args.params, *sets(data_path=data_json, image_folder=tmp_path / "none"))
    assert got["processes"] == 16 and got["effective_batch"] == 128 and got["steps"] == 3 * 25


# -- 2. honest loss -------------------------------------------------------------------------------------------
# Same data, same seed: the curves of different micro-batching agree to float rounding (measured: < 1e-6).
LOSS_TOL = 2e-4


@pytest.mark.slow
def test_loss_is_the_same_for_micro_batch_1_x_8_and_8_x_1(loss_runs):
    a, b = loss_runs["b1x8"], loss_runs["b8x1"]
    la, lb = losses(a), losses(b)
    assert sorted(la) == sorted(lb) == list(range(1, LOSS_STEPS + 1))
    for step in la:
        assert la[step] == pytest.approx(lb[step], abs=LOSS_TOL), (step, la, lb)
    # the gradients agree too (a loss divided by the accumulation steps once too often would shrink them 8x)
    ga, gb = grad_norms(a), grad_norms(b)
    for step in ga:
        assert ga[step] == pytest.approx(gb[step], rel=1e-3), (step, ga, gb)
    assert la[LOSS_STEPS] < la[1] - 0.05  # and the runs learn: these are not 6 copies of one number
    # every step sees the same 8 clips: from step 2 on, the frozen vision tower's outputs come from its cache
    for run in (a, b):
        cache = json.loads((run["run_dir"] / "train_summary.json").read_text())["vision_cache"]
        assert cache["frames_computed"] + cache["frames_reused"] == LOSS_STEPS * 8 * 4
        assert cache["frames_computed"] <= 8 * 4 and cache["frames_kept"] == cache["frames_computed"]


@pytest.mark.slow
def test_gradient_checkpointing_leaves_the_loss_unchanged(loss_runs):
    on, off = loss_runs["b8x1_ckpt"], loss_runs["b8x1"]
    args = torch.load(on["run_dir"] / "adapter" / "training_args.bin", weights_only=False)
    assert args.activation_checkpointing  # the run really had it on (gradient_checkpointing in our params)
    lon, loff = losses(on), losses(off)
    assert sorted(lon) == sorted(loff)
    for step in lon:
        assert lon[step] == pytest.approx(loff[step], rel=1e-6, abs=1e-6), (step, lon, loff)
    gon, goff = grad_norms(on), grad_norms(off)
    for step in gon:
        assert gon[step] == pytest.approx(goff[step], rel=1e-5), (step, gon, goff)


@pytest.mark.slow
def test_runs_log_to_tensorboard_and_line_up_in_compare(loss_runs, tmp_path, capsys):
    """Every run writes TensorBoard event files under <run>/tensorboard/ holding the losses of trainer_state.json;
    `actionft compare` lines runs up: the settings that differ (and only those), steps, losses, and a plot."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from actionft.cli import main

    a, b = loss_runs["b1x8"]["run_dir"], loss_runs["b8x1"]["run_dir"]
    events = EventAccumulator(str(a / "tensorboard"))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("train/loss")}
    assert logged == pytest.approx(losses(loss_runs["b1x8"]), rel=1e-6)

    plot = tmp_path / "losses.png"
    assert main(["compare", str(a), str(b), str(a / "train_config.json"), "--plot", str(plot)]) == 0
    table = capsys.readouterr().out.splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    assert header[:3] == ["run", "gradient_accumulation_steps", "per_device_train_batch_size"], header
    assert "learning_rate" not in header and "train_loss" in header
    rows = {line.split("|")[1].strip(): line for line in table[2:4]}
    assert set(rows) == {"b1x8", "b8x1"} and "| 8 | 1 |" in rows["b1x8"] and "| 1 | 8 |" in rows["b8x1"]
    assert plot.stat().st_size > 10_000


def test_compare_refuses_a_folder_that_is_not_a_run(tmp_path):
    from actionft.compare import compare_runs
    from actionft.errors import ActionftError

    with pytest.raises(ActionftError, match="not a training run folder"):
        compare_runs([tmp_path])


@pytest.mark.slow
def test_logged_loss_is_the_mean_cross_entropy_per_supervised_token(loss_runs, data, one_thread):
    """Before the first update LoRA is the identity (B = 0), so step 1's logged loss must equal the base model's
    cross-entropy summed over every supervised token of the 8 clips and divided by their number."""
    import torch.nn.functional as F

    from actionft.collate import Collator
    from actionft.modeling import load_processor
    from actionft.train import build_model, load_splits, resolve_config, supervised_loss

    cfg = resolve_config({**TRAIN_BASE, "output_root": str(data.outputs), "image_folder": str(data.synth),
                          **{k: str(v) if isinstance(v, Path) else v for k, v in data.varied_params.items()}})
    samples = load_splits(cfg, progress=False)["train"]
    assert len(samples) == 8
    collator = Collator(load_processor("tiny"), max_soft_tokens=70, num_frames=4, padding_side="left")
    model = build_model(cfg).train()
    total, count, per_sample = 0.0, 0, []
    with torch.no_grad():
        for sample in samples:  # one clip at a time: no padding involved
            batch = collator([sample])
            labels = batch.pop("labels")[0, 1:]
            logits = model(**batch, use_cache=False).logits[0, :-1].float()
            keep = labels != -100
            nll = F.cross_entropy(logits[keep], labels[keep], reduction="none")
            total, count = total + nll.sum().item(), count + int(keep.sum())
            per_sample.append(nll.mean().item())
        by_hand = total / count
        # the library's loss (logits only where supervised, left padding, one batch) is the same number
        library, n_tokens = supervised_loss(model, collator(samples))
    assert int(n_tokens) == count
    assert library.item() == pytest.approx(by_hand, abs=1e-5)
    for run in ("b1x8", "b8x1"):
        assert losses(loss_runs[run])[1] == pytest.approx(by_hand, abs=LOSS_TOL), run
    # the test can tell: the mean of per-clip means differs by far more than the tolerance
    assert abs(sum(per_sample) / len(per_sample) - by_hand) > 10 * LOSS_TOL
    # and it is a per-token cross-entropy, not one multiplied by the accumulation steps (the reference's 14.45)
    assert by_hand < 1.2 * math.log(model.config.get_text_config().vocab_size)


# -- 3. kill and resume ---------------------------------------------------------------------------------------
@pytest.mark.slow
def test_killed_run_resumes_from_the_latest_checkpoint(data, loss_runs):
    """A run of 6 steps saving every 2 (keep 2) is killed (SIGKILL) once checkpoint-2 is written, then resumed
    with `--set resume_from_checkpoint=latest`: it ends at step 6, keeps checkpoints 4 and 6, and its loss curve
    continues where it stopped and matches the uninterrupted run (`b8x1`, same settings, no checkpoints) step by
    step."""
    name = "killed"
    run = data.outputs / name
    overrides = dict(max_steps=LOSS_STEPS, save_steps=2, save_total_limit=2, per_device_train_batch_size=8,
                     gradient_accumulation_steps=1, **data.varied_params)
    proc = launch(data, name, **overrides)
    marker = run / "checkpoints" / "checkpoint-2" / "trainer_state.json"  # written last in a checkpoint
    deadline = time.time() + 600
    try:
        while proc.poll() is None and time.time() < deadline:
            if marker.is_file():
                try:
                    json.loads(marker.read_text())
                    break
                except ValueError:  # being written
                    pass
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    log = (data.root / f"{name}.log").read_text()
    assert proc.returncode == -signal.SIGKILL, f"the run ended on its own ({proc.returncode}):\n{tail(log)}"
    assert not (run / "adapter").exists() and not (run / "trainer_state.json").exists()
    killed_at = sorted(int(p.name.split("-")[1]) for p in (run / "checkpoints").glob("checkpoint-*"))
    assert killed_at and max(killed_at) < LOSS_STEPS, killed_at

    # A kill while the next checkpoint is being written leaves a partial folder; `latest` must skip it. Fake one.
    partial = run / "checkpoints" / f"checkpoint-{max(killed_at) + overrides['save_steps']}"
    partial.mkdir(exist_ok=True)
    (partial / "adapter_config.json").write_text("{}")

    resumed = finish(data, name, launch(data, name, resume_from_checkpoint="latest", **overrides))
    assert resumed["global_step"] == LOSS_STEPS
    assert sorted(p.name for p in (run / "checkpoints").glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    got, whole = losses(resumed), losses(loss_runs["b8x1"])
    assert sorted(got) == list(range(1, LOSS_STEPS + 1))  # steps before the kill (from the checkpoint) and after
    for step in got:
        assert got[step] == pytest.approx(whole[step], rel=1e-5), (step, got, whole)


def test_latest_checkpoint_is_the_newest_complete_one(tmp_path):
    from actionft.errors import ActionftError
    from actionft.train import latest_checkpoint

    with pytest.raises(ActionftError, match="no complete checkpoint"):
        latest_checkpoint(tmp_path)
    for step, complete in ((2, True), (10, True), (12, False), (9, True)):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        if complete:
            (folder / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-final").mkdir()
    assert latest_checkpoint(tmp_path) == str(tmp_path / "checkpoint-10")  # by number, skipping the partial 12


# -- 4b. launchers on CPU -------------------------------------------------------------------------------------
def check_two_step_run(run: Path, n_processes: int, cfg_overrides: dict) -> dict:
    """The run ended after the optimizer steps `optimizer_steps` predicts, with an adapter of trained LoRA weights."""
    from safetensors.torch import load_file

    from actionft.train import effective_batch, optimizer_steps, resolve_config

    summary = json.loads((run / "train_summary.json").read_text())
    cfg = resolve_config({**TRAIN_BASE, "data_path": "unused.json", **cfg_overrides})
    assert summary["global_step"] == optimizer_steps(summary["train_samples"], cfg, n_processes) == 2
    assert summary["effective_batch"] == effective_batch(cfg, n_processes)
    tensors = load_file(run / "adapter" / "adapter_model.safetensors")
    assert len(tensors) == 2 * 24  # A and B of the 24 LoRA-wrapped projections
    assert all(t.numel() > 0 for t in tensors.values())  # not ZeRO-3 placeholders
    assert sum(t.abs().sum().item() for k, t in tensors.items() if "lora_B" in k) > 0  # B starts at 0: it trained
    assert (run / "adapter" / "adapter_config.json").is_file() and (run / "adapter" / "tokenizer.json").is_file()
    return summary


# 9 training clips on 2 processes, micro-batch 2 x accumulation 2: each process reads ceil(9 / 4) = 3 micro-batches
# (the sampler pads the last), so the epoch ends after ceil(3 / 2) = 2 optimizer steps: the last one is short.
LAUNCH_SETTINGS = {"per_device_train_batch_size": 2, "gradient_accumulation_steps": 2, "max_steps": -1,
                   "num_train_epochs": 1, "deepspeed": ZERO2}


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["torchrun", "deepspeed"])
def test_two_process_launch_on_cpu(data, launcher):
    """Launch mode (b): `torchrun --nproc_per_node 2` / `deepspeed --num_gpus 2` (with DS_ACCELERATOR=cpu) running
    `actionft.cli train` as a module, ZeRO-2, 2 optimizer steps, adapter saved."""
    name = f"launch_{launcher}"
    train_args = ["-m" if launcher == "torchrun" else "--module", "actionft.cli", "train", "--params",
                  str(data.params), *sets(run_name=name, **LAUNCH_SETTINGS, **data.synth_params)]
    port = str(free_port())
    if launcher == "torchrun":
        cmd = [str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_port", port, *train_args]
    else:
        cmd = [str(BIN / "deepspeed"), "--num_nodes", "1", "--num_gpus", "2", "--master_port", port, *train_args]
    proc = run_checked(cmd, cpu_env())
    summary = check_two_step_run(data.outputs / name, 2, LAUNCH_SETTINGS)
    assert summary["train_samples"] == 9 and summary["effective_batch"] == 8
    if launcher == "deepspeed":
        assert "dist_world_size=2" in tail(proc, 10**6)


def test_deepspeed_builds_no_shared_memory_op_on_cpu(monkeypatch):
    """Training on a CPU marks DeepSpeed's shared-memory all-reduce op unavailable, so that DeepSpeed's own
    `build_shm_op` (called when its process group starts) returns None instead of compiling it (45 s here)."""
    import deepspeed.ops
    from deepspeed.comm.torch import build_shm_op

    from actionft.train import skip_deepspeed_shm_op

    monkeypatch.setitem(deepspeed.ops.__compatible_ops__, "deepspeed_shm_comm", True)  # restored afterwards
    skip_deepspeed_shm_op()
    assert build_shm_op() is None


@pytest.mark.slow
@pytest.mark.parametrize("zero", ["zero2", "zero3"])
def test_notebook_style_deepspeed_run(data, zero):
    """Launch mode (a): `prepare` + `fit` called from a plain Python process, as notebook 04's kernel does: no
    launcher, DeepSpeed gets a world of one from `ensure_distributed_env`. 9 clips at 2 x 3 -> 2 steps."""
    name = f"notebook_{zero}"
    settings = {**LAUNCH_SETTINGS, "gradient_accumulation_steps": 3, "deepspeed": f"params/deepspeed/{zero}.json"}
    params = {**json.loads(data.params.read_text()), "run_name": name, **settings,
              **{k: str(v) for k, v in data.synth_params.items()}}
    script = (
        "import json, os, sys\n"
        "from actionft.train import fit, prepare\n"
        "trainer, info = prepare(json.loads(sys.argv[1]), progress=False)\n"
        "summary = fit(trainer, info)\n"
        "summary['engine'] = type(trainer.model_wrapped).__name__\n"
        "summary['zero_stage'] = trainer.accelerator.state.deepspeed_plugin.zero_stage\n"
        "summary['world_size'] = os.environ['WORLD_SIZE']\n"
        "print('RESULT ' + json.dumps(summary))\n"
    )
    proc = run_checked([sys.executable, "-c", script, json.dumps(params)], cpu_env())
    result = json.loads(proc.stdout.split("RESULT ", 1)[1].splitlines()[0])
    assert result["engine"] == "DeepSpeedEngine" and result["world_size"] == "1"
    assert result["zero_stage"] == int(zero[-1])
    assert ("vision_cache" in result) == (zero == "zero2")  # ZeRO-3 partitions the tower: no cache
    check_two_step_run(data.outputs / name, 1, settings)


# -- 5. per-module learning rates -----------------------------------------------------------------------------
def module_parameters(model, module: str) -> dict[str, torch.nn.Parameter]:
    """Parameters of a tower or projector (the trainable copy where peft keeps one, else the original)."""
    return {n: p for n, p in model.named_parameters()
            if f".{module}." in n and ".original_module." not in n}


@pytest.fixture(scope="module")
def base_counts():
    from actionft.modeling import load_model

    model = load_model("tiny")
    return {mod: sum(p.numel() for p in getattr(model.model, mod).parameters())
            for mod in ("vision_tower", "embed_vision")}


@pytest.mark.slow
def test_zero_module_lrs_freeze_the_towers(data, tmp_path, one_thread, base_counts):
    from actionft.train import prepare, trainable_parameters

    params = {**json.loads(data.params.read_text()), **data.varied_params, "deepspeed": None,
              "output_root": str(tmp_path), "run_name": "frozen", "image_encoder_lr": 0.0, "projector_lr": 0.0,
              "max_steps": 1, "save_strategy": "no"}
    params = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    trainer, info = prepare(params, progress=False)
    counts = trainable_parameters(trainer.model)
    assert counts["vision_tower"] == {"trainable": 0, "total": base_counts["vision_tower"]}
    assert counts["embed_vision"] == {"trainable": 0, "total": base_counts["embed_vision"]}
    assert counts["language_model"]["trainable"] == 0
    assert counts["language_model (LoRA)"]["trainable"] == counts["language_model (LoRA)"]["total"] > 0
    groups = trainer.create_optimizer().param_groups
    assert {g["name"] for g in groups} == {"language_model (LoRA)"}
    assert [g["lr"] for g in groups] == [info["cfg"]["learning_rate"]] * len(groups)
    before = {n: p.detach().clone() for n, p in module_parameters(trainer.model, "vision_tower").items()}
    trainer.train()
    after = module_parameters(trainer.model, "vision_tower")
    assert all(torch.equal(before[n], after[n]) for n in before)


@pytest.mark.slow
def test_positive_module_lrs_get_their_own_param_groups(data, tmp_path, one_thread, base_counts):
    from actionft.train import prepare, trainable_parameters

    lrs = {"image_encoder_lr": 1e-5, "projector_lr": 3e-5}
    params = {**json.loads(data.params.read_text()), **data.varied_params, "deepspeed": None,
              "output_root": str(tmp_path), "run_name": "towers", **lrs, "max_steps": 1, "save_strategy": "no"}
    params = {k: str(v) if isinstance(v, Path) else v for k, v in params.items()}
    trainer, info = prepare(params, progress=False)
    counts = trainable_parameters(trainer.model)
    # peft keeps a frozen original beside the trainable copy of each module; it is not counted
    assert counts["vision_tower"] == {"trainable": base_counts["vision_tower"], "total": base_counts["vision_tower"]}
    assert counts["embed_vision"] == {"trainable": base_counts["embed_vision"], "total": base_counts["embed_vision"]}
    assert counts["language_model"]["trainable"] == 0

    optimizer = trainer.create_optimizer()
    by_module: dict[str, set] = {}
    for group in optimizer.param_groups:
        by_module.setdefault(group["name"], set()).add(group["lr"])
    assert by_module == {"language_model (LoRA)": {info["cfg"]["learning_rate"]},
                         "vision_tower": {lrs["image_encoder_lr"]}, "embed_vision": {lrs["projector_lr"]}}
    in_groups = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for module in ("vision_tower", "embed_vision"):
        module_params = module_parameters(trainer.model, module)
        assert module_params and all(p.requires_grad and id(p) in in_groups for p in module_params.values())
    # the scheduler and the logged learning rate follow the LoRA group (the Trainer logs group 0)
    assert optimizer.param_groups[0]["name"] == "language_model (LoRA)"

    before = {m: {n: p.detach().clone() for n, p in module_parameters(trainer.model, m).items()}
              for m in ("vision_tower", "embed_vision")}
    trainer.train()
    for module, old in before.items():
        new = module_parameters(trainer.model, module)
        assert any(not torch.equal(old[n], new[n]) for n in old), f"{module} did not train"
    logged = [e["learning_rate"] for e in trainer.state.log_history if "learning_rate" in e]
    assert logged == [info["cfg"]["learning_rate"]]  # one step, no warm-up: the peak LoRA rate


# -- 6. LoRA targets ------------------------------------------------------------------------------------------
def test_lora_wraps_only_the_text_layers_projections(one_thread):
    """Every q/k/v/o/gate/up/down projection of every text layer gets LoRA (the tiny model's last 2 layers share
    K/V and have no k/v projections: 7 + 7 + 5 + 5 = 24) and nothing else: not the vision tower's projections of
    the same names, not embed_vision, not the per-layer-input projections, not lm_head."""
    from peft.tuners.lora import LoraLayer

    from actionft.modeling import load_model
    from actionft.train import DEFAULTS, build_model, lora_target_regex, resolve_config

    targets = DEFAULTS["lora_target_modules"]
    assert targets == ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    base = load_model("tiny")
    expected = {
        name for name, module in base.named_modules()
        if isinstance(module, torch.nn.Linear) and re.fullmatch(r"model\.language_model\.layers\.\d+\.\w+\.(\w+)", name)
        and name.rsplit(".", 1)[1] in targets
    }
    assert len(expected) == 24
    vision_namesakes = [n for n, m in base.named_modules()
                        if "vision_tower" in n and n.split(".")[-2 if n.endswith(".linear") else -1] in targets]
    assert vision_namesakes  # the trap the regex must avoid is really there

    model = build_model(resolve_config({"synth": True, "bf16": False, "lora_dropout": 0.0}), base)
    wrapped = {name.removeprefix("base_model.model.") for name, module in model.named_modules()
               if isinstance(module, LoraLayer)}
    assert wrapped == expected
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n and ".language_model.layers." in n for n in trainable)

    audio_namesakes = [n for n, m in base.named_modules() if "audio_tower" in n and n.split(".")[-1] in targets]
    assert audio_namesakes  # the audio tower has q/k/v/o projections of its own
    assert not any(".audio_tower." in n or ".embed_audio." in n for n in wrapped)

    # E4B's names: the audio tower and its projector stay out too
    regex = re.compile(lora_target_regex(targets))
    assert regex.fullmatch("model.language_model.layers.41.mlp.down_proj")
    for name in ("model.audio_tower.layers.0.self_attn.q_proj", "model.audio_tower.layers.0.feed_forward1.up_proj",
                 "model.embed_audio.embedding_projection", "model.vision_tower.encoder.layers.0.mlp.up_proj.linear",
                 "model.embed_vision.embedding_projection", "lm_head"):
        assert not regex.fullmatch(name), name


def test_full_finetune_trains_text_weights_and_leaves_lr0_towers_frozen():
    """use_lora: false trains every text weight; a tower with lr 0 stays frozen, as under LoRA."""
    from actionft.train import build_model, resolve_config, trainable_parameters

    cfg = resolve_config({"synth": True, "bf16": False, "use_lora": False, "image_encoder_lr": 0.0,
                          "projector_lr": 1e-4})
    counts = trainable_parameters(build_model(cfg))
    assert counts["language_model"]["trainable"] == counts["language_model"]["total"] > 0
    assert counts["vision_tower"]["trainable"] == 0 < counts["vision_tower"]["total"]
    assert counts["embed_vision"]["trainable"] == counts["embed_vision"]["total"] > 0


# -- 7. the reference recipe on a checkpoint of the published structure ----------------------------------------
@pytest.mark.slow
def test_reference_params_train_the_tiny_base(data, tmp_path):
    """The reference params as they are (bf16, gradient checkpointing, ZeRO-2, paged 8-bit AdamW, 280 soft tokens,
    `attn_implementation` as the file sets it), with only the model, the data and the step count changed, train the
    packaged tiny base, which carries an audio tower like the published checkpoint (a plain `sdpa` for every
    sub-model would refuse to load it). The adapter holds LoRA weights of the text layers only, all updated. Two
    steps: with the reference's warm-up ratio the first step runs at learning rate 0 (ceil(0.03 x steps) = 1)."""
    from safetensors.torch import load_file

    from actionft.modeling import TINY_BASE_DIR

    assert json.loads((TINY_BASE_DIR / "config.json").read_text())["audio_config"] is not None
    cmd = actionft_cmd("train", "--params", str(REFERENCE_PARAMS), *sets(
        model_id="tiny", data_path=data.synth / "data.json", image_folder=data.synth, metadata_path=None,
        max_steps=2, output_root=tmp_path, run_name="reference"))
    run_checked(cmd, cpu_env())
    run = tmp_path / "reference"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 2 and summary["effective_batch"] == 8
    assert math.isfinite(summary["train_loss"])
    assert summary["zero_stage"] == 2 and summary["optimizer"].endswith("bitsandbytes.AdamW 8-bit paged"), summary
    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert weights and all(".language_model.layers." in k and "lora_" in k for k in weights)
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    assert len(lora_b) == 24 and all(v.abs().sum() > 0 for v in lora_b.values())  # B starts at zero: all trained


# -- 7. QLoRA: a 4-bit base ----------------------------------------------------------------------------------
def test_4bit_base_quantizes_only_the_language_models_linear_layers(one_thread):
    """NF4 with double quantization on the text layers' linears, nothing else: the towers, their projections,
    the embeddings and the LM head keep their precision."""
    import bitsandbytes as bnb

    from actionft.modeling import NOT_QUANTIZED, load_model

    full = load_model("tiny")
    linears = {n for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {n for n in linears if not any(n == p or n.startswith(p + ".") for p in NOT_QUANTIZED)}
    assert expected and all(n.startswith("model.language_model.") for n in expected)
    del full
    model = load_model("tiny", load_in_4bit=True)
    quantized = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    assert quantized == expected
    weight = model.get_submodule(sorted(quantized)[0]).weight
    assert weight.quant_state.quant_type == "nf4" and weight.quant_state.nested  # double quantization
    assert all(m.weight.dtype == torch.float32 for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and n not in quantized)


@pytest.mark.parametrize("change, message", [
    ({"use_lora": False}, "needs use_lora: true"),
    ({"deepspeed": "params/deepspeed/zero3.json"}, "ZeRO-3"),
])
def test_4bit_base_refuses_what_it_cannot_train(change, message):
    from actionft.errors import ActionftError
    from actionft.train import resolve_config

    with pytest.raises(ActionftError, match=message):
        resolve_config({"synth": True, "load_in_4bit": True, **change})


@pytest.mark.slow
def test_4bit_base_answers_in_eval_mode(data, one_thread):
    """Evaluation and generation run the 4-bit model in eval mode without gradients: on CPUs with AVX512-BF16,
    bitsandbytes' fast path there cannot take the tiny model's 16-row layers (modeling._generic_cpu_4bit_path)."""
    from actionft.collate import Collator
    from actionft.data import load_dataset
    from actionft.modeling import load_model, load_processor

    model = load_model("tiny", load_in_4bit=True).eval()
    processor = load_processor("tiny")
    batch = Collator(processor, max_soft_tokens=70, num_frames=4)(load_dataset(data.varied, data.synth,
                                                                                progress=False)[:2])
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)


def test_qlora_run_learns_and_its_adapter_loads_on_the_full_precision_base(data, one_thread):
    """`actionft train` on the 4-bit tiny base with ZeRO-2, paged 8-bit AdamW and gradient checkpointing: the loss
    goes down as in the full-precision run, and the adapter loads onto the unquantized base (as users serve it)
    and moves its answers' likelihood the same way."""
    from actionft.infer import load_for_inference

    spec = {"per_device_train_batch_size": 8, "gradient_accumulation_steps": 1, "gradient_checkpointing": True,
            "load_in_4bit": True}
    state = finish(data, "qlora", launch(data, "qlora", max_steps=LOSS_STEPS, **data.varied_params, **spec))
    summary = json.loads((state["run_dir"] / "train_summary.json").read_text())
    assert summary["zero_stage"] == 2 and summary["optimizer"].endswith("bitsandbytes.AdamW 8-bit paged"), summary
    got = losses(state)
    assert sorted(got) == list(range(1, LOSS_STEPS + 1)) and got[LOSS_STEPS] < got[1] - 0.05, got

    adapter = state["run_dir"] / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["r"] == 64  # the embedded default
    model, processor = load_for_inference("tiny", adapter, device="cpu")
    base, _ = load_for_inference("tiny", None, device="cpu")
    assert not any("4bit" in type(m).__name__ for m in model.modules())
    from actionft.collate import Collator
    from actionft.data import load_dataset

    samples = load_dataset(data.varied, data.synth, progress=False)[:4]
    batch = Collator(processor, max_soft_tokens=70, num_frames=4)(samples)
    with torch.no_grad():
        tuned_loss = model(**batch).loss.item()
        base_loss = base(**batch).loss.item()
    # the adapter, trained against 4-bit weights, still lowers the loss of its training clips on the fp32 base
    assert tuned_loss < base_loss - 0.05, (tuned_loss, base_loss)
