"""Benchmark: training with and without the frozen vision tower's cache (`vision_cache_gb`), side by side.

Trains the embedded run (params/tiny.yaml) for `--steps` optimizer steps, in turns with the cache off and on
(`--repeats` pairs, each run a fresh `actionft train` process), and prints for each run the training time of the
steps after the first epoch (where every frame is already cached), the whole run's time, the final loss and the
cache's counts; then the median ratios off/on. The losses must match: the cache changes where a frame's features
come from, not what they are (to float rounding).

    python bench/bench_vision_cache.py                   # 150 steps (3 epochs of the embedded run), 1 pair
    python bench/bench_vision_cache.py --steps 300 --repeats 2
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(out_root: Path, name: str, steps: int, cache_gb: float) -> dict:
    cmd = [sys.executable, "-m", "actionft.cli", "train", "--params", "params/tiny.yaml", "--set", f"run_name={name}",
           "--set", f"output_root={out_root}", "--set", f"max_steps={steps}", "--set", f"vision_cache_gb={cache_gb}",
           "--set", "save_strategy=no", "--set", "report_to=none"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    run_dir = out_root / name
    summary = json.loads((run_dir / "train_summary.json").read_text())
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    cfg = json.loads((run_dir / "train_config.json").read_text())
    batch, every = summary["effective_batch"], cfg["logging_steps"]
    per_epoch = math.ceil(summary["train_samples"] / batch)
    # samples_per_s is logged every logging_steps over the steps since the last log; keep the windows after epoch 1
    later = [h for h in history if "samples_per_s" in h and h["step"] > per_epoch + every]
    seconds = sum(every * batch / h["samples_per_s"] for h in later)
    return {"name": name, "run_s": summary["train_runtime_s"], "later_steps": every * len(later),
            "later_s_per_step": seconds / (every * len(later)) if later else float("nan"),
            "final_loss": [h["loss"] for h in history if "loss" in h][-1], "cache": summary.get("vision_cache")}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=150, help="optimizer steps per run (50 per epoch)")
    p.add_argument("--repeats", type=int, default=1, help="pairs of runs (off, on)")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_vision_cache_") as tmp:
        for i in range(args.repeats):
            for gb in (0, 8):
                r = run(Path(tmp), f"cache{gb}_{i}", args.steps, gb)
                rows.append({**r, "gb": gb})
                print(f"vision_cache_gb={gb}: {r['run_s']:.1f} s for {args.steps} steps; after epoch 1 "
                      f"{r['later_s_per_step']:.3f} s/step over {r['later_steps']} steps; final loss "
                      f"{r['final_loss']}; cache {r['cache']}", flush=True)
    off = [r for r in rows if r["gb"] == 0]
    on = [r for r in rows if r["gb"] == 8]
    run_ratio = statistics.median(a["run_s"] / b["run_s"] for a, b in zip(off, on))
    step_ratio = statistics.median(a["later_s_per_step"] / b["later_s_per_step"] for a, b in zip(off, on))
    print(f"off/on: whole run {run_ratio:.2f}x, steps after epoch 1 {step_ratio:.2f}x (median of {len(on)} pair(s))")
    worst = max(abs(a["final_loss"] - b["final_loss"]) / abs(a["final_loss"]) for a, b in zip(off, on))
    same = worst < 1e-4  # features of a frame computed in another batch may differ in the last bits
    print(f"final losses with and without the cache: largest relative difference {worst:.1e} "
          + ("(the same)" if same else "(DIFFERENT: the cache changed the features)"))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
