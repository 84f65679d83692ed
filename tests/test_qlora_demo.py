"""The embedded run on a 4-bit base (QLoRA): it learns, and its adapter serves on the full-precision base.

`make qlora-demo` (by hand, not part of `make test`: the 4-bit layers run bitsandbytes' generic CPU path, about
twice as slow as the fp32 run on a quiet machine and more on a busy one, so the 500 steps take 12-40 minutes on 2 CPU
cores). It runs what the README tells a
user to run: `actionft train --params params/tiny_qlora.yaml`, then `actionft evaluate` with that adapter on the
unquantized tiny base, into outputs/tiny_qlora/ (replaced), and checks held-out top-1 against chance.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.qlora

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "outputs" / "tiny_qlora"


def actionft(*args: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    subprocess.run([sys.executable, "-m", "actionft.cli", *args], cwd=REPO, env=env, check=True)


def test_qlora_demo_learns_far_above_chance():
    shutil.rmtree(RUN, ignore_errors=True)
    start = time.time()
    actionft("train", "--params", "params/tiny_qlora.yaml")
    trained = time.time()
    actionft("evaluate", "--params", "params/tiny_qlora.yaml", "--adapter", str(RUN / "adapter"),
             "--out", str(RUN / "eval"))
    metrics = json.loads((RUN / "eval" / "metrics.json").read_text())
    chance = 1 / metrics["classes"]
    base, tuned = metrics["base"], metrics["finetuned"]
    print(f"\nQLoRA tiny run: train {trained - start:.0f} s, evaluate {time.time() - trained:.0f} s; held-out n="
          f"{metrics['n']}: top-1 base {base['top1']:.3f} -> fine-tuned {tuned['top1']:.3f} (chance {chance:.3f}), "
          f"top-5 {base['top5']:.3f} -> {tuned['top5']:.3f}")
    assert json.loads((RUN / "train_config.json").read_text())["load_in_4bit"] is True  # it trained on 4 bits
    assert tuned["top1"] >= 3 * chance, f"the QLoRA run did not learn: top-1 {tuned['top1']:.3f}, chance {chance:.3f}"
    assert tuned["top1"] > base["top1"] + 0.2
