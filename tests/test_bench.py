"""bench/bench_train.py: FLOP and input models against the real processor, the E4B estimate, and a tiny CPU run."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_train.py"




def test_causal_pairs_match_brute_force(bench):
    for length in (1, 7, 40):
        for window in (None, 1, 5, 64):
            for first in (0, 3, length - 1):
                brute = sum(min(p + 1, window or p + 1) for p in range(max(first, 0), length))
                assert bench.FlopModel.pairs(max(first, 0), length, window) == brute


def test_e4b_inputs_have_the_processors_shapes(bench):
    """The synthetic E4B samples match what Gemma4ImageProcessor gives four 336x336 frames at 280 soft tokens."""
    from PIL import Image
    from transformers import Gemma4ImageProcessor

    proc = Gemma4ImageProcessor(patch_size=16, pooling_kernel_size=3, max_soft_tokens=280)
    real = proc(images=[Image.new("RGB", (336, 336))] * 4, max_soft_tokens=280, return_tensors="pt")
    pool = bench.e4b_pool(3, seed=0)
    cfg = bench.e4b_config()
    for e in pool:
        assert e["pixel_values"].shape == real["pixel_values"].shape == (4, 2520, 768)
        assert torch.equal(e["image_position_ids"], real["image_position_ids"])
        assert bench.image_runs(e["mm_token_type_ids"]) == [int(n) for n in real["num_soft_tokens_per_image"]]
        prompt = int((e["labels"] == -100).sum())
        assert prompt == bench.E4B_PROMPT_TOKENS
        assert int((e["input_ids"] == cfg.boi_token_id).sum()) == int((e["input_ids"] == cfg.eoi_token_id).sum()) == 4
        completion = e["labels"][prompt:]
        assert (completion != -100).all() and completion[-1] == bench.E4B_END_OF_TURN_ID
    stats = bench.pool_stats(bench.e4b_pool(32, seed=0))
    assert 1055 <= stats["tokens_mean"] <= 1090 and 14 <= stats["supervised_mean"] <= 30


def test_e4b_estimate_is_sane(bench):
    """Meta-device E4B as published: ~7.94 B stored parameters with the audio tower (~0.31 B) and the vision tower."""
    est = bench.estimate()
    assert 7.85e9 < est["parameters_total"] < 8.05e9
    assert 0.29e9 < est["parameters_by_part"]["audio_tower"] < 0.32e9
    assert 0.16e9 < est["parameters_by_part"]["vision_tower"] < 0.18e9
    assert 2.7e9 < est["parameters_by_part"]["text per-layer embeddings (PLE table)"] < 2.9e9
    # r * (in + out) over 7 projections in 24 layers and 5 (no k/v) in the 18 K/V-shared ones
    assert est["lora_parameters"] == 34_881_536
    assert 3.8e9 < est["active_macs_per_token"] < 4.8e9  # "about 4B effective" + the LM head
    full, kept = est["flops_per_sample_full_logits"], est["flops_per_sample_supervised_only"]
    assert 2e13 < full["total"] < 3e13 and kept["total"] < 0.7 * full["total"]
    assert est["flops_per_sample_supervised_only_b1"]["text_linear"] == full["text_linear"]
    assert 0.02 < est["reference"]["implied_mfu"] < 0.1
    mem = est["memory"]
    ref = mem["reference (b1 x 8, ckpt, ZeRO-2, full logits)"]["total_gib"]
    low = mem["lowmem (b1 x 8, ckpt, supervised-only logits)"]["total_gib"]
    assert 14 < low < ref < 24
    assert est["target"]["samples_per_s"] == pytest.approx(5 * 1.859)  # 5x the reference's throughput


def test_counting_collator_predicts_the_kv_shared_shortcut(bench):
    """Logits only where supervised: the K/V-shared layers skip the prompt only when the micro-batch is padded."""
    from actionft.modeling import load_model

    model = load_model("tiny")
    flop_model = bench.FlopModel.from_model(model)
    pool = bench.tiny_pool(3, seed=0, max_soft_tokens=70)
    collator = bench.CountingCollator(0, "left", flop_model, supervised_only=True)
    one = collator(pool[:1])
    two = collator(pool[:3])
    h1, h2 = collator.history
    assert h1["kept_shared"] == h1["length"] and h1["kept"] < h1["length"]
    assert h2["kept_shared"] == h2["kept"] < h2["length"]
    assert h1["supervised_tokens"] == int((one["labels"][:, 1:] != -100).sum())
    assert h2["tokens"] == int(two["attention_mask"].sum())
    full = bench.CountingCollator(0, "right", flop_model, supervised_only=False)
    full(pool[:1])
    assert full.history[0]["flops"] > h1["flops"]


# three training subprocesses (DeepSpeed, 8-bit AdamW) on CPU: ~35 s on 2 idle cores (much longer if they are busy)
def test_tiny_benchmark_runs_all_four_configurations(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(  # the E4B estimate printed before the runs has its own test (test_e4b_estimate_is_sane)
        [sys.executable, str(SCRIPT), "--mode", "tiny", "--steps", "2", "--warmup", "1", "--max-soft-tokens", "70",
         "--out", str(out), "--no-estimate"],
        capture_output=True, text=True, env=env, cwd=REPO, timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = {r["configuration"]: r for r in json.loads(out.read_text())}
    assert set(records) == {"reference", "fastest", "lowmem", "qlora"}
    assert records["qlora"]["load_in_4bit"] and records["qlora"]["linears_4bit"] > 0
    assert not records["reference"]["load_in_4bit"] and records["reference"]["linears_4bit"] == 0
    for r in records.values():
        assert r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and r["supervised_tokens_per_s"] > 0
        assert math.isfinite(r["loss"]) and r["flops_per_sample"] > 0 and r["steps"] == 2
        # the FLOP count assumed what transformers really ran through the K/V-shared layers
        assert r["kv_shared_positions"] == r["kv_shared_positions_assumed"]
    assert records["fastest"]["kv_shared_positions"][0] < 100  # left padded micro-batch 8: prompt skipped
    assert records["reference"]["flops_per_sample"] > records["fastest"]["flops_per_sample"]
    assert "| reference |" in proc.stdout


def test_random_weights_are_quantized_as_transformers_quantizes_a_checkpoint(bench):
    """The benchmark's 4-bit E4B has no checkpoint to load; its hand quantization must pick the same layers as
    `load_model(..., load_in_4bit=True)` (transformers' bitsandbytes path), and peft must wrap them as 4-bit LoRA."""
    import bitsandbytes as bnb
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from actionft.modeling import load_model
    from actionft.train import lora_target_regex

    def four_bit(model):
        return {name for name, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}

    reference = four_bit(load_model("tiny", load_in_4bit=True))
    model = load_model("tiny")
    n = bench.quantize_text_linears(model, torch.float32)
    assert n == len(reference) > 0 and four_bit(model) == reference
    assert all(".language_model." in name for name in reference)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=lora_target_regex(["q_proj", "down_proj"])))
    wrapped = [m for m in peft_model.modules() if isinstance(m, LoraLinear4bit)]
    assert len(wrapped) == 2 * model.config.text_config.num_hidden_layers
    x = torch.randint(0, 100, (1, 8))
    assert torch.isfinite(peft_model(input_ids=x).logits).all()


def test_dry_run_e4b_needs_no_gpu():
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "e4b", "--dry-run", "--no-estimate", "--pool", "2"],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "would run fastest: b8x1 left kept" in proc.stdout
    assert "pixel_values [4, 2520, 768]" in proc.stdout


def test_bench_prepare_runs_and_compares_the_same_frames(tmp_path):
    """A small run of bench/bench_prepare.py on two keyframe layouts: both methods pick the same frames, each layout's
    table and ratios are printed, and the summary repeats them."""
    script = REPO / "bench" / "bench_prepare.py"
    cmd = [sys.executable, str(script), "--clips", "2", "--seconds", "2", "--size", "320x180", "--repeat", "1",
           "--layouts", "25:250,25:10", "--preset", "veryfast", "--dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    layouts = out.stdout.split("\n== ")[1:]
    assert [part.split(":")[0] for part in layouts] == ["25 fps, GOP 250", "25 fps, GOP 10"]
    assert "one keyframe per clip" in layouts[0] and "a keyframe every 0.4 s" in layouts[1]
    assert all("H.264 (libx264 veryfast," in part for part in layouts)
    clips = sorted(tmp_path.glob("*/clip_*.mp4"))
    assert len(clips) == 4 and all(b" ref=1 " in c.read_bytes() for c in clips)  # x264's settings SEI: veryfast
    summary = out.stdout.split("\nsummary ")[1].splitlines()
    for part, name in zip(layouts, ["25 fps, GOP 250", "25 fps, GOP 10"]):
        assert "both methods pick the same 4 frames of each clip (checked on all 2)" in part
        rows = {line.split("  ")[0]: line.split() for line in part.splitlines() if line.startswith("(")}
        seek, naive = rows["(a) read_frames, seek (this)"], rows["(b) decode all, then subsample"]
        decode, worker = rows["(c) (a) without the RGB pictures"], rows["(d) (a) with one decoder thread"]
        # columns from the end: clips/s, best, s/clip, CPU s/clip, faults/clip, peak RSS, RSS rise
        assert min(float(r[-7]) for r in (seek, naive, decode, worker)) > 0
        ratio = float(part.split("speed-up of (a) over (b): ")[1].split("x")[0])
        assert ratio == pytest.approx(float(seek[-7]) / float(naive[-7]), rel=0.05)  # one round: ratio of the passes
        bound = float(part.split("speed-up with the decoding alone, (b) over (c): ")[1].split("x")[0])
        assert bound == pytest.approx(float(decode[-7]) / float(naive[-7]), rel=0.05)
        cpu = float(part.split("CPU time per clip, (b) over (d): ")[1].split("x")[0])
        assert cpu == pytest.approx(float(naive[-4]) / float(worker[-4]), rel=0.15)  # CPU s/clip has 3 decimals
        assert float(naive[-3]) < 2000  # the measuring processes keep freed memory: no page fault per frame
        line = next(row for row in summary if row.startswith(name + ":")).split()
        assert line[-6:] == [seek[-7], naive[-7], f"{ratio:.1f}x", line[-3], f"{bound:.1f}x", f"{cpu:.1f}x"]


def test_bench_prepare_rejects_a_bad_layout(tmp_path):
    cmd = [sys.executable, str(REPO / "bench" / "bench_prepare.py"), "--layouts", "25-250", "--dir", str(tmp_path)]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "'25-250' is not FPS:GOP" in out.stderr
    assert not list(tmp_path.iterdir())  # nothing generated


def test_bench_prepare_refuses_different_picks(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_prepare", REPO / "bench" / "bench_prepare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    clip = tmp_path / "clip_000.mp4"
    module.make_clip(clip, 1.0, 25, 160, 96, 250, seed=0)
    assert b" ref=3 " in clip.read_bytes()  # ffmpeg's default libx264 preset, medium, unless told otherwise
    module.check_same_picks([str(clip)])
    monkeypatch.setattr(module, "read_all_frames_then_sample", lambda p, n, s: (None, [0.0, 0.5, 1.0, 1.5]))
    with pytest.raises(SystemExit, match="picked different frames"):
        module.check_same_picks([str(clip)])
