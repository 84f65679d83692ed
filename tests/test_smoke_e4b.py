"""Full-width smoke run of the reference recipe on CPU (`make smoke-e4b`; about 6 minutes on 2 cores, CI runs it).

A checkpoint of the published google/gemma-4-e4b-it structure (full width and 262,144-token vocabulary, vision and
audio towers, the release's flags) at reduced depth (4 text layers: sliding and full ones, the last two reusing K/V;
2 layers in each tower) with random bf16 weights, and a processor at the real image settings (patch 16, pooling 3,
280 soft tokens per frame), is written to a temporary folder, never into the repository. `actionft train` runs the
reference params unchanged except the model, the data (real frames of the Kinetics-3K sample in ../shared), the step
count and the output folder: bf16, gradient checkpointing, ZeRO-2, paged 8-bit AdamW, left padding, one optimizer
step over the reference batch of 8 clips. That step is the reference schedule's warm-up step (ceil(0.03 x steps) = 1
warm-up step, learning rate 0, as the reference run's first step was): it runs the whole optimizer path but leaves
LoRA's B matrices at zero, which the test checks. That the same recipe moves them and learns is checked on the tiny
base (tests/test_train.py, test_reference_params_train_the_tiny_base). Then the adapter is reloaded the way the
reference model card does it (`PeftModel.from_pretrained`) and generates an answer. Wall time and peak memory of
each stage are printed (run with -s to see them).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.smoke

REPO = Path(__file__).resolve().parents[1]
SAMPLE = (REPO / "../shared/data/kinetics3k_sample").resolve()
SAMPLE_JSON = SAMPLE / "kinetic_3K_sample.json"
REFERENCE_PARAMS = REPO / "params" / "gemma4_e4b_kinetics3k.yaml"

BUILD = """
import sys
from actionft.e4b import SMOKE_KV_SHARED_LAYERS, SMOKE_LAYER_TYPES, SMOKE_TOWER_LAYERS, build_standin
build_standin(sys.argv[1], SMOKE_LAYER_TYPES, SMOKE_KV_SHARED_LAYERS, SMOKE_TOWER_LAYERS)
"""

# The reference model card's loading code, as a user runs it, then one greedy answer for a clip of the sample.
MODEL_CARD = """
import json, sys
from peft import PeftModel
from transformers import AutoProcessor, Gemma4ForConditionalGeneration

model_id, adapter_dir, frames, prompt = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), sys.argv[4]
base = Gemma4ForConditionalGeneration.from_pretrained(model_id, torch_dtype="auto", device_map="auto")
model = PeftModel.from_pretrained(base, adapter_dir)
processor = AutoProcessor.from_pretrained(model_id)

messages = [{"role": "user", "content": [{"type": "image", "image": f} for f in frames]
             + [{"type": "text", "text": prompt}]}]
inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                       return_tensors="pt").to(model.device)
out = model.generate(**inputs, max_new_tokens=8, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:]
lora = sorted({n.rsplit(".lora_", 1)[0] for n, _ in model.named_parameters() if ".lora_A." in n})
print("RESULT " + json.dumps({"dtype": str(base.dtype), "prompt_tokens": inputs["input_ids"].shape[1],
                              "image_tokens": int((inputs["input_ids"] == base.config.image_token_id).sum()),
                              "new_tokens": len(new), "answer": processor.decode(new, skip_special_tokens=True),
                              "lora_modules": len(lora)}))
"""


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    out.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu", CUDA_VISIBLE_DEVICES="")
    return out


def stage(name: str, cmd: list[str], log: Path, timeout: int = 1200) -> tuple[str, dict]:
    """Run one stage in its own process; returns its output and {seconds, peak_rss_gib} (the largest process)."""
    start = time.time()
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env(), cwd=REPO)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = log.read_text()
    assert proc.returncode == 0, f"{name} failed ({proc.returncode}):\n{text[-5000:]}"
    figures = {"seconds": round(time.time() - start, 1), "peak_rss_gib": round(usage.ru_maxrss / 2**20, 2)}
    print(f"smoke-e4b {name}: {figures['seconds']} s, peak RSS {figures['peak_rss_gib']} GiB", flush=True)
    return text, figures


@pytest.fixture
def checkpoint(tmp_path):
    """The stand-in's folder (3.6 GB), removed after the test: pytest keeps the temporary folders of recent runs."""
    import shutil

    folder = tmp_path / "gemma4-e4b-standin"
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


def test_reference_recipe_at_full_width_on_cpu(tmp_path, checkpoint):
    if not SAMPLE_JSON.is_file():
        pytest.skip(f"the Kinetics-3K sample is not here ({SAMPLE_JSON}): the smoke run trains on its real frames")
    from safetensors.torch import load_file

    from actionft import DEFAULT_PROMPT
    from actionft.e4b import SMOKE_KV_SHARED_LAYERS, SMOKE_LAYER_TYPES, SMOKE_TOWER_LAYERS
    from actionft.params import load_params

    started = time.time()
    _, build = stage("build checkpoint", [sys.executable, "-c", BUILD, str(checkpoint)], tmp_path / "build.log")
    config = json.loads((checkpoint / "config.json").read_text())
    assert config["text_config"]["hidden_size"] == 2560 and config["text_config"]["vocab_size"] == 262144
    assert config["audio_config"]["hidden_size"] == 1024 and config["vision_config"]["hidden_size"] == 768
    assert config["vision_config"]["num_hidden_layers"] == config["audio_config"]["num_hidden_layers"] == SMOKE_TOWER_LAYERS

    overrides = {"model_id": str(checkpoint), "data_path": str(SAMPLE_JSON), "image_folder": str(SAMPLE),
                 "max_steps": 1, "output_root": str(tmp_path / "outputs"), "run_name": "smoke_e4b"}
    sets = [a for k, v in overrides.items() for a in ("--set", f"{k}={json.dumps(v)}")]
    reference = load_params(REFERENCE_PARAMS)
    assert reference["bf16"] and reference["gradient_checkpointing"] and reference["optim"] == "paged_adamw_8bit"
    assert "zero2" in reference["deepspeed"] and reference["max_soft_tokens"] == 280
    _, train = stage("train (1 optimizer step of 8 clips)",
                       [sys.executable, "-m", "actionft.cli", "train", "--params", str(REFERENCE_PARAMS), *sets],
                       tmp_path / "train.log")
    run = tmp_path / "outputs" / "smoke_e4b"
    summary = json.loads((run / "train_summary.json").read_text())
    assert summary["global_step"] == 1 and summary["effective_batch"] == 8
    assert 0 < summary["train_loss"] < 30, summary  # random weights: about ln(262144) = 12.5 and up
    used = json.loads((run / "train_config.json").read_text())
    assert {k: used[k] for k in reference if k not in overrides} == {k: v for k, v in reference.items()
                                                                       if k not in overrides}
    assert summary["zero_stage"] == 2 and summary["optimizer"].endswith("bitsandbytes.AdamW 8-bit paged"), summary

    weights = load_file(str(run / "adapter" / "adapter_model.safetensors"))
    assert all(".language_model.layers." in k and "lora_" in k for k in weights)
    lora_b = {k: v for k, v in weights.items() if "lora_B" in k}
    # 7 projections per layer, minus k/v on the 2 K/V-shared layers
    assert len(lora_b) == 7 * len(SMOKE_LAYER_TYPES) - 2 * SMOKE_KV_SHARED_LAYERS
    # the warm-up step at learning rate 0: B stays at its zero init (a positive rate would have moved every one)
    assert all(v.float().abs().sum() == 0 for v in lora_b.values()), "the warm-up step moved a LoRA B matrix"
    assert all(v.float().abs().sum() > 0 for k, v in weights.items() if "lora_A" in k)

    clip = next(p for p in sorted((SAMPLE / "frames").iterdir()) if p.is_dir())
    frames = [str(p) for p in sorted(clip.glob("*.jpg"))][:4]
    out, reload = stage("model-card reload + generate",
                        [sys.executable, "-c", MODEL_CARD, str(checkpoint), str(run / "adapter"), json.dumps(frames),
                         DEFAULT_PROMPT], tmp_path / "reload.log")
    result = json.loads(out.split("RESULT ", 1)[1].splitlines()[0])
    assert result["dtype"] == "torch.bfloat16" and result["new_tokens"] > 0
    assert result["image_tokens"] == 4 * 256  # 336x336 frames at 280 soft tokens: 256 each
    assert result["lora_modules"] == len(lora_b)
    total = round(time.time() - started, 1)
    peak = max(build["peak_rss_gib"], train["peak_rss_gib"], reload["peak_rss_gib"])
    print(f"smoke-e4b total: {total} s, peak RSS {peak} GiB; loss {summary['train_loss']}; "
          f"answer {result['answer']!r}", flush=True)
