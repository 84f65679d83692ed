"""Benchmark: LoRA training throughput and memory of three configurations, through the project's training code.

Every configuration trains with `actionft.train` (its `build_model`, `training_arguments` and Trainer subclass with
`supervised_loss`) on Kinetics-3K-shaped samples: 4 frames of 336x336 at 280 soft tokens per frame, the reference
prompt and short captions, about 1,070 tokens per sample. The configurations have the same effective batch (8) and
the same LoRA math (r=16, alpha 32, dropout 0.05 on the 7 projections of every text layer, lr 2e-4, 8-bit AdamW):

  reference  batch 1 x accumulation 8, gradient checkpointing, DeepSpeed ZeRO-2, paged_adamw_8bit, bf16, logits on
             every position (`supervised_logits_only=False`), right padding: the reference run's setup
  fastest    the fastest measured of a few candidates: micro-batch 8 x 1 or 4 x 2, left padding + logits only where
             supervised (the LM head and Gemma 4's K/V-shared last layers skip the prompt), SDPA, no checkpointing
  lowmem     the lowest peak memory measured: checkpointing, micro-batch 1 x 8, supervised-only logits, 8-bit AdamW
  qlora      params/gemma4_e4b_qlora.yaml: lowmem's ZeRO-2 candidate on a 4-bit base (the language model's linear
             layers in NF4 with double quantization, bf16 matmuls; towers, embeddings and LM head in bf16). Needs
             bitsandbytes with a native library for the device; without one it is recorded as skipped

Modes:
  --mode tiny  the packaged tiny Gemma 4 (`model_id: tiny`) on the CPU (or GPU); about a minute; CI smoke-tests it.
               Its numbers are CPU numbers of a toy model, not comparable with anything on a GPU.
  --mode e4b   the full Gemma 4 E4B architecture (built from its published configuration, random weights) on a GPU,
               with synthetic token/pixel tensors of the exact shapes the real processor produces.

Each variant runs in a fresh subprocess (honest peak memory, no state shared between DeepSpeed engines), takes
`--warmup` untimed optimizer steps and then `--steps` timed ones. Printed: a markdown table and `--out` (JSON list of
records), plus the analytic FLOP/memory estimate for E4B (`--estimate` prints only that; no GPU needed).

    python bench/bench_train.py                       # tiny on CPU (make bench)
    python bench/bench_train.py --mode e4b            # on a GPU: E4B, 1 + 6 optimizer steps per variant
    python bench/bench_train.py --estimate            # analytic E4B memory/FLOPs only
    python bench/bench_train.py --mode e4b --dry-run  # check the E4B config, inputs and plan without training

FLOP model (per sample, "model FLOPs": what the configuration's math requires, excluding padding, the recomputation
of gradient checkpointing and elementwise ops). With frozen base weights and LoRA, backward computes gradients with
respect to activations only (one matmul per frozen linear instead of two), so per token:
  frozen text linears      2*MACs forward + 2*MACs backward (dX only)            = 4 * MACs
  LoRA adapters (r=16)     2*r*(in+out) forward, 2x that backward (dX, dA, dB)   = 6 * r*(in+out)
  attention scores         4*heads*head_dim per (query, key) pair forward, 2x backward = 12 * heads*head_dim * pairs
                           pairs: causal (sliding layers: at most `sliding_window` keys); image blocks both ways
                           only where `use_bidirectional_attention` is "vision" (not in the published E4B)
  LM head (tied, frozen)   4 * hidden * vocab per position that gets logits
  K/V-shared layers        (the last 18 of E4B) run only on the kept positions when logits are supervised-only
  per-layer-input projection, vision tower (valid patches), vision->text projection: forward only (frozen, no grad)
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

with contextlib.suppress(ImportError):  # lib/ on the path: its import silences known harmless library messages
    import actionft  # noqa: F401  (e.g. bitsandbytes' note on an optional CPU kernel, printed at its import)

REPO = Path(__file__).resolve().parents[1]
PROMPT = "Please analyze the sequence of frames from this video. What specific action or event is happening?"
REFERENCE_SAMPLES_PER_S = 1.859  # seed_run.md: 5,026.56 s for 3 epochs of 3,115 samples, GPU not stated
TARGET_SPEEDUP = 5.0
LOWMEM_BUDGET_GIB = 24.0
ASSUMED_PEAK_TFLOPS = 989.0  # H100 SXM dense bf16; an assumption: the reference GPU is unknown
NUM_FRAMES = 4
FRAME_SIZE = 336
MAX_SOFT_TOKENS = 280
E4B_PROMPT_TOKENS = 1051  # gemma4.md: four square frames + the Kinetics prompt at 280 soft tokens per frame
E4B_END_OF_TURN_ID = 106  # `<turn|>` in the published tokenizer (the second eos id of the published config)
ZERO2 = "params/deepspeed/zero2.json"

# Dense bf16 peak (TFLOP/s) by device name, for MFU; override with --peak-tflops.
PEAK_TFLOPS = {"H200": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0,
               "L4": 121.0, "RTX 4090": 165.0}

# -- configurations -------------------------------------------------------------------------------------------
# Same LoRA math and optimizer for all; only batching, memory savers, padding side and logits differ.
COMMON = {
    "use_lora": True, "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "image_encoder_lr": 0.0,
    "projector_lr": 0.0, "learning_rate": 2e-4, "weight_decay": 0.0, "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine", "max_grad_norm": 1.0, "optim": "paged_adamw_8bit", "bf16": True,
    "attn_implementation": "sdpa", "seed": 42, "max_soft_tokens": MAX_SOFT_TOKENS, "num_frames": NUM_FRAMES,
}


def _variant(micro: int, accum: int, ckpt: bool, deepspeed: str | None, kept: bool, side: str) -> dict:
    return {"per_device_train_batch_size": micro, "gradient_accumulation_steps": accum,
            "gradient_checkpointing": ckpt, "deepspeed": deepspeed, "supervised_logits_only": kept,
            "padding_side": side}


# configuration -> candidate variants (name, overrides); the first is what `--variants first` runs.
CONFIGURATIONS: dict[str, list[tuple[str, dict]]] = {
    "reference": [("b1x8 ckpt zero2 full-logits right", _variant(1, 8, True, ZERO2, False, "right"))],
    "fastest": [
        ("b8x1 left kept", _variant(8, 1, False, None, True, "left")),
        ("b4x2 left kept", _variant(4, 2, False, None, True, "left")),
        ("b8x1 left kept zero2", _variant(8, 1, False, ZERO2, True, "left")),
        ("b8x1 ckpt left kept", _variant(8, 1, True, None, True, "left")),
    ],
    "lowmem": [
        ("b1x8 ckpt left kept", _variant(1, 8, True, None, True, "left")),
        ("b1x8 ckpt left kept zero2", _variant(1, 8, True, ZERO2, True, "left")),
    ],
    "qlora": [("b1x8 ckpt left kept zero2 nf4", {**_variant(1, 8, True, ZERO2, True, "left"), "load_in_4bit": True})],
}


# -- E4B architecture -----------------------------------------------------------------------------------------
def e4b_config():
    """`Gemma4Config` of google/gemma-4-e4b-it as published (`actionft.e4b`): text, vision and audio towers with the
    release's flags (causal attention over images, clipped linears). One source of truth with the smoke run."""
    from actionft.e4b import e4b_config as published

    return published()


def attn_per_submodel(value: str | dict | None = "sdpa", has_audio: bool = True):
    """Per sub-model, as the project loads real checkpoints: text and vision `value`, the audio tower eager (it has
    no SDPA path)."""
    from actionft.modeling import attn_implementation_for

    return attn_implementation_for(value, has_audio)


def build_e4b(device: str | torch.device, dtype=torch.bfloat16, attn_implementation: str | dict | None = "sdpa"):
    """Gemma4ForConditionalGeneration with E4B's published structure and random weights, built directly on `device`."""
    from transformers import Gemma4ForConditionalGeneration

    config = e4b_config()
    with torch.device(device):
        return Gemma4ForConditionalGeneration._from_config(
            config, dtype=dtype,
            attn_implementation=attn_per_submodel(attn_implementation, config.audio_config is not None),
        )


def quantize_text_linears(model, compute_dtype=torch.bfloat16) -> int:
    """The language model's linear layers to bitsandbytes NF4 with double quantization, in place on the device they
    are on: what `load_model(..., load_in_4bit=True)` does while loading a checkpoint (`modeling.quantization_config`,
    the modules of `modeling.NOT_QUANTIZED` left as they are), for a model built with random weights, which has no
    checkpoint to load from. Returns how many layers were quantized."""
    import bitsandbytes as bnb

    from actionft.modeling import NOT_QUANTIZED

    def kept(name: str) -> bool:
        return any(name == skip or name.startswith(skip + ".") for skip in NOT_QUANTIZED)

    n = 0
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if type(child) is not torch.nn.Linear or kept(name):
                continue
            q = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                  compute_dtype=compute_dtype, compress_statistics=True, quant_type="nf4",
                                  device="meta")
            q.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, compress_statistics=True,
                                         quant_type="nf4", module=q).to(child.weight.device)
            if child.bias is not None:
                q.bias = torch.nn.Parameter(child.bias.data, requires_grad=False)
            setattr(parent, child_name, q)
            n += 1
    model.is_loaded_in_4bit = True  # what peft reads to wrap these layers with its 4-bit LoRA
    return n


# -- samples --------------------------------------------------------------------------------------------------
def answer_lengths(n: int, seed: int) -> list[int]:
    """Caption lengths in words like Kinetics-3K's (8-43 words, mean ~15): 8 + Gamma(1.5, 4.67), rounded, clipped."""
    import numpy as np

    rng = np.random.default_rng(seed)
    return [int(w) for w in np.clip(np.round(8 + rng.gamma(1.5, 4.67, n)), 8, 43)]


def e4b_pool(n: int, seed: int, prompt_tokens: int = E4B_PROMPT_TOKENS, soft_tokens: int = 256,
             patches: int = 2520, valid_side: int = 48, patch_dim: int = 768, pixels: bool = True) -> list[dict]:
    """Encoded samples with exactly the shapes Gemma 4's processor gives a 4 x 336x336-frame Kinetics sample.

    Measured with `Gemma4ImageProcessor(patch_size=16, pooling_kernel_size=3)` at max_soft_tokens=280: a 336x336 frame
    is resized to 768x768 = 48x48 patches (2,304 valid, 256 soft tokens after 3x3 pooling), padded to 2,520 patch
    rows of 768 values; padding rows have position (-1, -1). Prompt: bos, `<|turn>user\\n`, 4 x (begin + 256 soft
    tokens + end), prompt text, `<turn|>\\n<|turn>model\\n`, 1,051 tokens in all; completion: ~1.3 tokens per caption
    word + `<turn|>`, supervised. Text ids are random ordinary ids (the model has random weights anyway).
    pixels=False gives pixel_values of the right shape without memory (for counting only).
    """
    cfg = e4b_config()
    gen = torch.Generator().manual_seed(seed)
    words = answer_lengths(n, seed)
    image_block = [cfg.boi_token_id] + [cfg.image_token_id] * soft_tokens + [cfg.eoi_token_id]
    head = [2, 105, 2364, 107]  # bos, <|turn>, "user", "\n" (ordinary ids stand in for the text)
    tail = [E4B_END_OF_TURN_ID, 107, 105, 4368, 107]
    n_text = prompt_tokens - len(head) - len(tail) - NUM_FRAMES * len(image_block)
    ys, xs = torch.meshgrid(torch.arange(valid_side), torch.arange(valid_side), indexing="ij")
    valid = torch.stack([xs.reshape(-1), ys.reshape(-1)], -1)
    positions = torch.full((patches, 2), -1, dtype=torch.long)
    positions[: len(valid)] = valid
    pool = []
    for i in range(n):
        text = torch.randint(1000, 250000, (n_text,), generator=gen).tolist()
        prompt = head + image_block * NUM_FRAMES + text + tail
        answer = torch.randint(1000, 250000, (math.ceil(1.3 * words[i]),), generator=gen).tolist()
        completion = answer + [E4B_END_OF_TURN_ID]
        ids = torch.tensor(prompt + completion)
        labels = torch.tensor([-100] * len(prompt) + completion)
        mm = (ids == cfg.image_token_id).long()
        if pixels:
            pixel_values = torch.rand((NUM_FRAMES, patches, patch_dim), generator=gen)
            pixel_values[:, len(valid):] = 0.0
        else:
            pixel_values = torch.zeros(()).expand(NUM_FRAMES, patches, patch_dim)
        pool.append({"input_ids": ids, "mm_token_type_ids": mm, "labels": labels, "pixel_values": pixel_values,
                     "image_position_ids": positions.expand(NUM_FRAMES, -1, -1).clone()})
    return pool


def tiny_pool(n: int, seed: int, max_soft_tokens: int = MAX_SOFT_TOKENS) -> list[dict]:
    """Encoded samples for the tiny model through the project's Collator and the tiny processor: 4 noise frames of
    336x336 each, the reference prompt, captions built from the tiny tokenizer's words (lengths like Kinetics-3K's)."""
    import numpy as np
    from PIL import Image

    from actionft.collate import Collator
    from actionft.data import Sample
    from actionft.modeling import load_processor
    from actionft.synth import corpus

    processor = load_processor("tiny")
    collator = Collator(processor, max_soft_tokens=max_soft_tokens, num_frames=NUM_FRAMES)
    vocab = sorted({w for line in corpus() for w in line.replace(".", "").replace("?", "").split()})
    rng = np.random.default_rng(seed)
    pool = []
    for i, n_words in enumerate(answer_lengths(n, seed)):
        frames = [Image.fromarray(rng.integers(0, 256, (FRAME_SIZE, FRAME_SIZE, 3), dtype=np.uint8))
                  for _ in range(NUM_FRAMES)]
        answer = " ".join(rng.choice(vocab, n_words))
        pool.append(collator.encode(Sample(index=i, clip_id=f"bench{i}", prompt=PROMPT, answer=answer,
                                           frames=frames)))
    return pool


def pool_stats(pool: list[dict]) -> dict:
    n = len(pool)
    tokens = [len(e["input_ids"]) for e in pool]
    sup = [int((e["labels"] != -100).sum()) for e in pool]
    return {"samples": n, "tokens_mean": sum(tokens) / n, "tokens_min": min(tokens), "tokens_max": max(tokens),
            "supervised_mean": sum(sup) / n, "soft_tokens_per_sample": int(pool[0]["mm_token_type_ids"].sum()),
            "pixel_values": list(pool[0]["pixel_values"].shape)}


class PoolDataset(torch.utils.data.Dataset):
    """`length` items cycling through a pool of pre-encoded samples (the processor is not what is measured)."""

    def __init__(self, pool: list[dict], length: int):
        self.pool, self.length = pool, length

    def __len__(self):
        return self.length

    def __getitem__(self, i):
        return self.pool[i % len(self.pool)]


# -- FLOPs ----------------------------------------------------------------------------------------------------
@dataclass
class TextLayer:
    linear_macs: int  # per token: q, k, v (if not K/V-shared), o, gate, up, down, per-layer-input gate/projection
    lora_macs: int  # per token: r * (in + out) over the LoRA-adapted projections
    heads_x_dim: int  # attention heads * head dim (score + value matmuls)
    window: int | None  # sliding window or None (full attention)
    shared: bool  # K/V-shared: runs only on kept positions when logits are supervised-only


@dataclass
class FlopModel:
    """Per-sample model FLOPs of a Gemma 4 with LoRA on its text projections (see the module docstring)."""

    layers: list[TextLayer]
    hidden: int
    vocab: int
    ple_macs: int  # per token: hidden -> layers * per-layer hidden
    vision_patch_macs: int  # per valid patch: patch projection + all encoder linears
    vision_pair_flops: int  # per (patch, patch) pair, all encoder layers: 4 * hidden * layers
    embed_vision_macs: int  # per soft token
    lora_r: int = 16
    bidirectional_images: bool = False  # use_bidirectional_attention "vision" (larger Gemma 4); E4B: causal

    @classmethod
    def from_model(cls, model, lora_r: int = 16, targets=("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                            "up_proj", "down_proj")) -> FlopModel:
        """Shapes read off a (meta or real, LoRA-free) Gemma4ForConditionalGeneration."""
        inner = model.model
        lm = inner.language_model
        layers = []
        for layer in lm.layers:
            attn, mlp = layer.self_attn, layer.mlp
            linears = {"q_proj": attn.q_proj, "o_proj": attn.o_proj, "gate_proj": mlp.gate_proj,
                       "up_proj": mlp.up_proj, "down_proj": mlp.down_proj}
            if not attn.is_kv_shared_layer:
                linears["k_proj"] = attn.k_proj
                if attn.v_proj is not None:
                    linears["v_proj"] = attn.v_proj
            macs = sum(m.in_features * m.out_features for m in linears.values())
            if getattr(layer, "hidden_size_per_layer_input", 0):
                macs += 2 * layer.per_layer_input_gate.in_features * layer.per_layer_input_gate.out_features
            lora = sum(lora_r * (m.in_features + m.out_features) for k, m in linears.items() if k in targets)
            layers.append(TextLayer(macs, lora, attn.q_proj.out_features, attn.sliding_window,
                                    attn.is_kv_shared_layer))
        v = model.config.vision_config
        vh, vi, vl = v.hidden_size, v.intermediate_size, v.num_hidden_layers
        q_dim = v.num_attention_heads * v.head_dim
        kv_dim = v.num_key_value_heads * v.head_dim
        per_layer = vh * q_dim + 2 * vh * kv_dim + q_dim * vh + 3 * vh * vi
        ple = lm.per_layer_model_projection
        return cls(
            layers=layers, hidden=lm.config.hidden_size, vocab=lm.config.vocab_size,
            ple_macs=ple.in_features * ple.out_features if ple is not None else 0,
            vision_patch_macs=3 * v.patch_size**2 * vh + vl * per_layer,
            vision_pair_flops=4 * q_dim * vl,
            embed_vision_macs=inner.embed_vision.embedding_projection.in_features
            * inner.embed_vision.embedding_projection.out_features,
            lora_r=lora_r,
            bidirectional_images=getattr(lm.config, "use_bidirectional_attention", None) == "vision",
        )

    @staticmethod
    def pairs(first: int, last: int, window: int | None) -> int:
        """Causal (query, key) pairs for queries at 0-based positions first..last-1."""
        if last <= first:
            return 0
        if window is None:
            return (last * (last + 1) - first * (first + 1)) // 2
        # query p sees min(p + 1, window) keys
        total = 0
        lo, hi = first, min(last, window)
        if hi > lo:
            total += (hi * (hi + 1) - lo * (lo + 1)) // 2
        total += max(0, last - max(first, window)) * window
        return total

    def sample(self, length: int, kept: int, image_blocks: list[int], valid_patches: list[int],
               kept_shared: int | None = None) -> dict:
        """FLOPs of one sample of `length` real tokens whose last `kept` positions get logits and whose last
        `kept_shared` (default: `kept`) go through the K/V-shared layers. image_blocks: lengths of the soft-token runs
        (attended both ways only with `bidirectional_images`); valid_patches: valid patches per frame."""
        kept = max(0, min(kept, length))
        kept_shared = kept if kept_shared is None else max(0, min(kept_shared, length))
        bidir = sum(n * (n - 1) // 2 for n in image_blocks) if self.bidirectional_images else 0
        parts = {"text_linear": 0, "lora": 0, "attention": 0}
        for layer in self.layers:
            tokens = kept_shared if layer.shared else length
            first = length - tokens
            pairs = self.pairs(first, length, layer.window) + (0 if layer.shared else bidir)
            parts["text_linear"] += 4 * layer.linear_macs * tokens
            parts["lora"] += 6 * layer.lora_macs * tokens
            parts["attention"] += 12 * layer.heads_x_dim * pairs
        parts["lm_head"] = 4 * self.hidden * self.vocab * kept
        parts["per_layer_projection"] = 2 * self.ple_macs * length
        parts["vision"] = sum(2 * self.vision_patch_macs * p + self.vision_pair_flops * p * p for p in valid_patches)
        parts["embed_vision"] = 2 * self.embed_vision_macs * sum(image_blocks)
        parts["total"] = sum(parts.values())
        return parts

    def active_macs_per_token(self) -> int:
        return sum(layer.linear_macs for layer in self.layers) + self.hidden * self.vocab


def image_runs(mm: torch.Tensor) -> list[int]:
    runs, count = [], 0
    for v in mm.tolist() + [0]:
        if v:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    return runs


def sample_flops(flop_model: FlopModel, encoded: dict, kept: int, kept_shared: int) -> int:
    """FLOPs of one encoded sample: `kept` positions get logits, `kept_shared` run through the K/V-shared layers."""
    length = len(encoded["input_ids"])
    valid = [int((pos >= 0).all(-1).sum()) for pos in encoded["image_position_ids"]]
    return flop_model.sample(length, kept, image_runs(encoded["mm_token_type_ids"]), valid, kept_shared)["total"]


# -- batching with token and FLOP accounting ------------------------------------------------------------------
class CountingCollator:
    """Pads pre-encoded samples with the project's `Collator.pad` and counts tokens and model FLOPs per batch."""

    def __init__(self, pad_token_id: int, padding_side: str, flop_model: FlopModel, supervised_only: bool):
        from actionft.collate import Collator

        self._pad = Collator.pad
        self.tokenizer = SimpleNamespace(pad_token_id=pad_token_id)
        self.padding_side, self.for_generation = padding_side, False
        self.flop_model, self.supervised_only = flop_model, supervised_only
        self.totals = {"samples": 0, "tokens": 0, "padded_tokens": 0, "supervised_tokens": 0, "flops": 0}
        self.history: list[dict] = []

    def __call__(self, encoded: list[dict]) -> dict:
        batch = self._pad(self, list(encoded))
        labels, attention = batch["labels"], batch["attention_mask"]
        length = labels.shape[1]
        supervised = labels[:, 1:] != -100
        if self.supervised_only and supervised.any():
            # exactly supervised_loss's choice of logits_to_keep
            kept_padded = length - (int(supervised.any(0).nonzero()[0]) + 1) + 1
        else:
            kept_padded = length
        # transformers 5.23 only slices the K/V-shared layers' inputs when every SDPA mask is materialised; without
        # any padding in the micro-batch (always so at micro-batch 1) the full-attention mask is None (is_causal
        # fast path) and the shared layers run on every position: only the LM head is cut then
        shortcut = kept_padded < length and bool((attention == 0).any())
        shared_padded = kept_padded if shortcut else length
        flops = 0
        for row, e in enumerate(encoded):
            real = attention[row].nonzero().flatten()
            start, end = int(real[0]), int(real[-1]) + 1
            kept = max(0, end - max(start, length - kept_padded))  # real positions inside the kept window
            kept_shared = max(0, end - max(start, length - shared_padded))
            flops += sample_flops(self.flop_model, e, kept, kept_shared)
        counts = {"samples": len(encoded), "tokens": int(attention.sum()), "padded_tokens": labels.numel(),
                  "supervised_tokens": int(supervised.sum()), "flops": flops, "kept": kept_padded,
                  "kept_shared": shared_padded, "length": length}
        for k in self.totals:
            self.totals[k] += counts[k]
        self.history.append(counts)
        return batch


# -- device and memory ----------------------------------------------------------------------------------------
def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    """This process's RSS high-water mark. VmHWM, not ru_maxrss: Linux keeps ru_maxrss across fork + exec, so a
    worker would inherit the parent's peak."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    name = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"CPU: {name} ({os.cpu_count()} threads)"


def peak_tflops(name: str, override: float | None) -> float | None:
    if override:
        return override
    if not torch.cuda.is_available():
        return None
    for key, value in PEAK_TFLOPS.items():  # "H100 PCIe" before "H100" by insertion order
        if key in name:
            return value
    return None


def header() -> str:
    import transformers

    lines = [f"torch {torch.__version__}, transformers {transformers.__version__}, "
             f"CUDA available: {torch.cuda.is_available()}"
             + (f" (CUDA {torch.version.cuda}, {torch.cuda.device_count()} device(s))" if torch.cuda.is_available()
                else ""),
             f"device: {device_name()}"]
    return "\n".join(lines)


# -- the software stack actually present -----------------------------------------------------------------------
OPTIONAL = ("deepspeed", "bitsandbytes")
PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "huggingface_hub", "pydantic",
            "numpy", *OPTIONAL)


def importable(name: str) -> str | None:
    """None when `import name` works, else why not (a missing package or a failing import, e.g. no CUDA build)."""
    import importlib

    try:
        importlib.import_module(name)
    except Exception as err:  # noqa: BLE001  (bitsandbytes/deepspeed fail in many ways on an unusual machine)
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]
    return None


def environment() -> dict:
    """Python, device, CUDA and the version and location of every package the benchmark uses (None = absent)."""
    import importlib.metadata as md
    import importlib.util

    versions, where = {}, {}
    for name in PACKAGES:
        spec = importlib.util.find_spec(name)
        if spec is None:
            versions[name] = None
            continue
        try:
            versions[name] = md.version(name.replace("_", "-"))
        except md.PackageNotFoundError:
            versions[name] = "unknown"
        if name in ("transformers", "peft", "accelerate", "torch"):
            where[name] = str(Path(spec.origin).parent.parent)
    return {"python": platform.python_version(), "device": device_name(), "torch_cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.cuda.is_available() else None,
            "packages": versions, "package_dirs": where}


def zero_stage(deepspeed_config: str | None) -> int | None:
    if not deepspeed_config:
        return None
    path = Path(deepspeed_config) if Path(deepspeed_config).is_absolute() else REPO / deepspeed_config
    return json.loads(path.read_text()).get("zero_optimization", {}).get("stage")


def bitsandbytes_unusable() -> str | None:
    """None when bitsandbytes imports and its native library quantizes a tensor on this process's device (a wheel
    without a library for the device's CUDA still imports), else why not."""
    why = importable("bitsandbytes")
    if why:
        return why
    try:
        import bitsandbytes.functional as bnbf

        device = "cuda" if torch.cuda.is_available() else "cpu"
        bnbf.quantize_4bit(torch.ones(64, 64, device=device, dtype=torch.bfloat16), quant_type="nf4")
    except Exception as err:  # noqa: BLE001  (a missing or mismatched native library fails in many ways)
        return f"its native library does not run here: {type(err).__name__}: {str(err).splitlines()[0][:150]}"
    return None


def fit_to_machine(params: dict) -> tuple[dict, list[str]]:
    """What this machine can run of `params`: without DeepSpeed no ZeRO, without bitsandbytes a torch AdamW instead
    of an 8-bit one. Returns the params and one line per substitution (recorded, not a failure). A 4-bit base
    without bitsandbytes has no substitute: `run_variant` records the variant as skipped."""
    params, notes = dict(params), []
    if params.get("deepspeed"):
        why = importable("deepspeed")
        if why:
            notes.append(f"deepspeed unavailable ({why}): ZeRO-{zero_stage(params['deepspeed'])} off")
            params["deepspeed"] = None
    if "8bit" in params.get("optim", "") or params.get("optim", "").startswith("paged_"):
        why = bitsandbytes_unusable()
        if why:
            notes.append(f"bitsandbytes unavailable ({why}): adamw_torch instead of {params['optim']}")
            params["optim"] = "adamw_torch"
    return params, notes


def optimizer_class(optimizer) -> str:
    """The optimizer doing the update, under the Accelerate/DeepSpeed wrappers."""
    for _ in range(4):
        if not hasattr(optimizer, "optimizer"):
            break
        optimizer = optimizer.optimizer
    return f"{type(optimizer).__module__}.{type(optimizer).__qualname__}"


class SdpaProbe:
    """Counts, per head dim, the SDPA kernel PyTorch picks for every call (`torch._fused_sdp_choice` on the call's
    own arguments: the same choice the dispatcher makes), so the record says what ran on E4B's 512-wide
    full-attention heads (flash attention stops at 256 on most GPUs)."""

    def __init__(self):
        from torch.nn.attention import SDPBackend

        self.names = {int(b.value): name for name, b in SDPBackend.__members__.items()}
        self.calls: dict[int, dict[str, int]] = {}

    def __enter__(self):
        import torch.nn.functional as F

        self._original = original = F.scaled_dot_product_attention

        def probe(*args, **kwargs):
            try:
                name = self.names.get(int(torch._fused_sdp_choice(*args, **kwargs)), "unknown")
            except Exception as err:  # noqa: BLE001  (an older torch: record that we could not tell)
                name = f"unknown ({type(err).__name__})"
            counts = self.calls.setdefault(int(args[0].shape[-1]), {})
            counts[name] = counts.get(name, 0) + 1
            return original(*args, **kwargs)

        F.scaled_dot_product_attention = probe
        return self

    def __exit__(self, *exc):
        import torch.nn.functional as F

        F.scaled_dot_product_attention = self._original

    def backends(self, head_dims) -> list[str]:
        return sorted({name for d in head_dims for name in self.calls.get(int(d), {})})


# -- one variant (runs in its own process) --------------------------------------------------------------------
def run_variant(spec: dict) -> dict:
    """Train one variant for warmup + steps optimizer steps with the project's Trainer; return its record."""
    from transformers import TrainerCallback, set_seed

    from actionft.modeling import load_model
    from actionft.train import build_model, make_trainer_class, resolve_config, training_arguments

    on_gpu = torch.cuda.is_available()
    import peft  # noqa: F401

    requested = {**COMMON, **spec["overrides"], "run_name": spec["run_name"], "output_root": spec["work_dir"],
                 "model_id": "tiny" if spec["mode"] == "tiny" else "e4b-random", "data_path": "<synthetic pool>",
                 "max_steps": spec["warmup"] + spec["steps"], "save_strategy": "no", "logging_steps": 1,
                 "dataloader_num_workers": 0}
    # imports bitsandbytes/deepspeed where present, before the baseline: their import is not training memory
    params, substitutions = fit_to_machine(requested)
    for note in substitutions:
        print(f"on this machine: {note}", flush=True)
    if params.get("load_in_4bit") and (why := bitsandbytes_unusable()):
        return {"configuration": spec["configuration"], "variant": spec["variant"],
                "skipped": f"bitsandbytes unavailable ({why}): a 4-bit base needs it"}
    baseline_rss = rss_bytes()
    stages = {"after_imports": baseline_rss}
    cfg = resolve_config(params)
    set_seed(cfg["seed"])
    if spec["mode"] == "tiny":
        base = load_model("tiny", bf16=cfg["bf16"], attn_implementation=cfg["attn_implementation"],
                          load_in_4bit=cfg["load_in_4bit"])
        pad_id = base.config.text_config.pad_token_id
    else:
        base = build_e4b("cuda" if on_gpu else "cpu", attn_implementation=cfg["attn_implementation"])
        if cfg["load_in_4bit"]:
            quantize_text_linears(base, torch.bfloat16)
            gc.collect()
            if on_gpu:
                torch.cuda.empty_cache()
        pad_id = 0
    linears_4bit = sum(type(m).__name__ == "Linear4bit" for m in base.modules())
    flop_model = FlopModel.from_model(base, cfg["lora_r"])
    first_shared = len(flop_model.layers) - sum(layer.shared for layer in flop_model.layers)
    full_head_dims = sorted({layer.self_attn.head_dim for layer in base.model.language_model.layers
                             if layer.self_attn.sliding_window is None})
    model = build_model(cfg, base)
    stages["model_built"] = rss_bytes()

    # how many positions the first K/V-shared layer really runs on (checks the supervised-only shortcut happens)
    seen = {}
    layers = model.get_base_model().model.language_model.layers
    hook = None
    if first_shared < len(layers):
        def record(module, args, kwargs):
            hs = args[0] if args else kwargs["hidden_states"]
            seen.setdefault("positions", set()).add(int(hs.shape[1]))
        hook = layers[first_shared].register_forward_pre_hook(record, with_kwargs=True)

    pool = torch.load(spec["pool_file"], weights_only=True)
    eff = cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"]
    dataset = PoolDataset(pool, (spec["warmup"] + spec["steps"]) * eff)
    collator = CountingCollator(pad_id, cfg["padding_side"], flop_model, cfg["supervised_logits_only"])

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.marks: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            if on_gpu:
                torch.cuda.synchronize()
            self.marks.append(time.perf_counter())

    timer = StepTimer()
    args = training_arguments(cfg, Path(spec["work_dir"]) / spec["run_name"], 0)
    args.disable_tqdm = True
    class BenchTrainer(make_trainer_class()):
        """The project's Trainer, reading the data in order: with a pool of `effective batch` samples every optimizer
        step of every variant sees the same 8 samples, so losses compare across variants (and across DeepSpeed,
        whose data loader would otherwise shuffle differently)."""

        def _get_train_sampler(self, train_dataset=None):
            dataset = train_dataset if train_dataset is not None else self.train_dataset
            return torch.utils.data.SequentialSampler(dataset)

    trainer = BenchTrainer(model=model, args=args, data_collator=collator, train_dataset=dataset, cfg=cfg,
                           callbacks=[timer])
    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    stages["before_train"] = rss_bytes()
    stages["peak_before_train"] = peak_rss_bytes()
    t0 = time.perf_counter()
    with SdpaProbe() as sdpa:
        trainer.train()
    wall = time.perf_counter() - t0
    if hook is not None:
        hook.remove()

    seconds = timer.marks[-1] - timer.marks[spec["warmup"] - 1]
    samples = spec["steps"] * eff
    # the dataset holds exactly (warmup + steps) optimizer steps of data: the timed steps used the last batches
    # (counting by batch, not by time, because the data loader fetches a batch ahead)
    timed = collator.history[-spec["steps"] * cfg["gradient_accumulation_steps"]:]
    window = {k: sum(h[k] for h in timed) for k in ("samples", "tokens", "padded_tokens", "supervised_tokens",
                                                      "flops")}
    per_sample = {k: window[k] / max(1, window["samples"]) for k in window}
    flops_per_sample = per_sample["flops"]
    samples_per_s = samples / seconds
    peak = peak_tflops(device_name(), spec.get("peak_tflops"))
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if on_gpu:
        peak_mem = torch.cuda.max_memory_allocated() / 2**30
        reserved = torch.cuda.max_memory_reserved() / 2**30
        mem_kind = "torch.cuda.max_memory_allocated (GiB)"
    else:
        peak_mem, reserved = (peak_rss_bytes() - baseline_rss) / 2**30, None
        mem_kind = "peak RSS minus RSS after imports (GiB)"
    timed_losses = losses[spec["warmup"]:]
    return {
        "device": device_name(), "mode": spec["mode"], "configuration": spec["configuration"],
        "variant": spec["variant"], "samples_per_s": round(samples_per_s, 4),
        "supervised_tokens_per_s": round(samples_per_s * per_sample["supervised_tokens"], 2),
        "tokens_per_s": round(samples_per_s * per_sample["tokens"], 2),
        "padded_tokens_per_s": round(samples_per_s * per_sample["padded_tokens"], 2),
        "peak_mem_gb": round(peak_mem, 4), "peak_reserved_gb": None if reserved is None else round(reserved, 4),
        "peak_mem_kind": mem_kind,
        "mfu": None if peak is None else round(samples_per_s * flops_per_sample / (peak * 1e12), 5),
        "peak_tflops_assumed": peak, "achieved_tflops": round(samples_per_s * flops_per_sample / 1e12, 5),
        "flops_per_sample": round(flops_per_sample), "loss": losses[-1] if losses else None,
        "loss_mean_timed": round(sum(timed_losses) / len(timed_losses), 4) if timed_losses else None,
        "losses": losses, "steps": spec["steps"], "warmup_steps": spec["warmup"], "effective_batch": eff,
        "micro_batch": cfg["per_device_train_batch_size"], "grad_accum": cfg["gradient_accumulation_steps"],
        "gradient_checkpointing": cfg["gradient_checkpointing"], "deepspeed": cfg["deepspeed"],
        "supervised_logits_only": cfg["supervised_logits_only"], "padding_side": cfg["padding_side"],
        "optim": cfg["optim"], "bf16": cfg["bf16"], "attn_implementation": cfg["attn_implementation"],
        "load_in_4bit": cfg["load_in_4bit"], "linears_4bit": linears_4bit,
        # what really ran where the machine lacks a package of the reference stack (recorded, not a failure)
        "optimizer": cfg["optim"], "optimizer_class": optimizer_class(trainer.optimizer),
        "zero_stage": zero_stage(cfg["deepspeed"]), "requested_optim": requested["optim"],
        "requested_zero_stage": zero_stage(requested["deepspeed"]), "substitutions": substitutions,
        "attn_per_submodel": {k: getattr(getattr(base.config, k, None), "_attn_implementation", None)
                              for k in ("text_config", "vision_config", "audio_config")},
        # SDPA kernel per head dim, as PyTorch chose it for each call; full attention = the 512-wide global heads
        "sdpa_backends": {str(d): c for d, c in sorted(sdpa.calls.items())},
        "full_attention_head_dims": full_head_dims,
        "sdpa_backend_full_attention": sdpa.backends(full_head_dims),
        "tokens_per_sample": round(per_sample["tokens"], 1),
        "supervised_tokens_per_sample": round(per_sample["supervised_tokens"], 2),
        # positions the first K/V-shared layer ran on (observed by a hook) and what the FLOP count assumed
        "kv_shared_positions": sorted(seen.get("positions", [])),
        "kv_shared_positions_assumed": sorted({h["kept_shared"] for h in collator.history}),
        "first_batch_length": collator.history[0]["length"] if collator.history else None,
        "timed_seconds": round(seconds, 3), "train_wall_s": round(wall, 2),
        "rss_gib": None if on_gpu else {k: round(v / 2**30, 3)
                                        for k, v in {**stages, "peak": peak_rss_bytes()}.items()},
        "torch": torch.__version__, "environment": environment(),
    }


def _worker(spec_json: str) -> int:
    spec = json.loads(spec_json)
    try:
        record = run_variant(spec)
    except torch.cuda.OutOfMemoryError as err:
        record = {"error": f"CUDA out of memory: {str(err).splitlines()[0]}"}
    Path(spec["record_file"]).write_text(json.dumps(record))
    return 0


# -- analytic estimate (meta device, no GPU) ------------------------------------------------------------------
def _trace_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """Stand-in for transformers' SDPA path with a mask on a GPU (repeat K/V, boolean mask -> additive bias, the
    memory-efficient kernel), so that autograd saves what it saves there; meta tensors only."""
    from transformers.integrations.sdpa_attention import repeat_kv

    groups = getattr(module, "num_key_value_groups", 1)
    if groups > 1:  # without a mask transformers uses SDPA's enable_gqa: same bytes saved per query head
        key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    bias = None
    if attention_mask is not None:
        bias = torch.zeros(attention_mask.shape, dtype=query.dtype, device=query.device)
        bias = bias.expand(query.shape[0], query.shape[1], query.shape[2], key.shape[2])
    out = torch.ops.aten._scaled_dot_product_efficient_attention(query, key, value, bias, True, 0.0,
                                                                 attention_mask is None, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


@contextlib.contextmanager
def _sdpa_replaced(fn):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    ALL_ATTENTION_FUNCTIONS["sdpa"] = fn
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]


def trace_saved_bytes(peft_model, batch: int, length: int, kept: int, inputs_require_grad: bool = False,
                      shortcut: bool = True) -> dict:
    """Bytes autograd keeps for backward in one micro-batch of the LoRA-wrapped text model + LM head + loss, traced
    on the meta device (no memory, no compute). Vision tower and embeddings run without grad (frozen) and keep
    nothing. shortcut=False mirrors an unpadded micro-batch: no full-attention mask, so the K/V-shared layers run on
    every position. Returns {"layers": [bytes per decoder layer], "outside", "logits", "layer_inputs": [...]}"""
    import torch.nn.functional as F

    base = peft_model.get_base_model()
    lm = base.model.language_model
    cfg = lm.config
    dtype = lm.embed_tokens.weight.dtype
    param_storages = {p.untyped_storage()._cdata for p in peft_model.parameters()}
    seen: set[int] = set()
    where = {"now": "outside"}
    per_layer = [0] * len(lm.layers)
    inputs = [0] * len(lm.layers)
    totals = {"outside": 0, "logits": 0}

    def pack(t):
        storage = t.untyped_storage()
        key = storage._cdata
        if key not in seen and key not in param_storages:
            seen.add(key)
            nbytes = storage.nbytes()
            if isinstance(where["now"], int):
                per_layer[where["now"]] += nbytes
            else:
                totals[where["now"]] += nbytes
        return t

    hooks = []
    for i, layer in enumerate(lm.layers):
        def pre(module, args, kwargs, i=i):
            where["now"] = i
            hs = args[0] if args else kwargs["hidden_states"]
            inputs[i] = hs.numel() * hs.element_size()

        def post(module, args, output):
            where["now"] = "outside"

        hooks += [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
    meta = torch.device("meta")
    embeds = torch.empty(batch, length, cfg.hidden_size, dtype=dtype, device=meta, requires_grad=inputs_require_grad)
    per_layer_inputs = torch.empty(batch, length, cfg.num_hidden_layers, cfg.hidden_size_per_layer_input,
                                   dtype=dtype, device=meta)
    masks = {t: torch.empty(batch, 1, length, length, dtype=torch.bool, device=meta) for t in set(cfg.layer_types)}
    if not shortcut:
        masks["full_attention"] = None
    try:
        with _sdpa_replaced(_trace_attention), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = lm(inputs_embeds=embeds, per_layer_inputs=per_layer_inputs, attention_mask=masks,
                     logits_to_keep=kept if shortcut else 0, use_cache=False)
            where["now"] = "logits"
            hidden = out.last_hidden_state[:, -kept:]
            logits = base.lm_head(hidden)
            cap = cfg.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
            targets = torch.empty(batch * (kept - 1), dtype=torch.long, device=meta)
            F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets, reduction="sum")
    finally:
        for h in hooks:
            h.remove()
    return {"layers": per_layer, "layer_inputs": inputs, **totals}


# bitsandbytes NF4 with double quantization: 4 bits per weight, an 8-bit absmax per block of 64, and an fp32 scale
# per 256 of those blocks
NF4_BYTES_PER_PARAM = 0.5 + 1 / 64 + 4 / (64 * 256)


def memory_estimate(peft_model, n_params: int, n_lora: int, batch: int, length: int, kept: int, ckpt: bool,
                    zero2: bool, shortcut: bool = True, weight_bytes: float | None = None) -> dict:
    """Analytic peak-memory estimate (GiB) of one configuration; see `estimate()` for the assumptions.
    `weight_bytes`: the stored weights when they are not all bf16 (a 4-bit base)."""
    trace = trace_saved_bytes(peft_model, batch, length, kept, inputs_require_grad=ckpt, shortcut=shortcut)
    vocab = peft_model.get_base_model().config.text_config.vocab_size
    weights = n_params * 2 if weight_bytes is None else weight_bytes
    lora_state = n_lora * (2 + 4 + 4 + 2 + 2 * 4 / 256)  # bf16 copy, fp32 master, fp32 grad, 8-bit m and v + absmax
    if ckpt:
        # kept: every layer's input (hidden states); transient: one layer's activations during its recomputation
        layers = sum(trace["layer_inputs"]) + max(trace["layers"])
    else:
        layers = sum(trace["layers"])
    activations = trace["outside"] + trace["logits"] + layers
    # backward working set: gradients of the fp32 logits (x2: log-softmax grad + its input grad) and of the
    # largest layer's activations
    transient = 2 * batch * kept * vocab * 4 + max(trace["layers"])
    buffers = (5e7 * 2 + n_lora * 2) if zero2 else 0  # reduce bucket (bf16) + contiguous gradient buffer
    total = weights + lora_state + activations + transient + buffers
    g = 2**30
    return {"weights_gib": weights / g, "lora_and_optimizer_gib": lora_state / g, "activations_gib": activations / g,
            "logits_saved_gib": trace["logits"] / g, "decoder_layers_gib": layers / g,
            "outside_layers_gib": trace["outside"] / g, "backward_transient_gib": transient / g,
            "deepspeed_buffers_gib": buffers / g, "total_gib": total / g,
            "saved_per_layer_mib_max": max(trace["layers"]) / 2**20,
            "saved_all_layers_no_ckpt_gib": sum(trace["layers"]) / g}


def e4b_meta_peft(ckpt: bool):
    """E4B on the meta device with LoRA attached by the project's `build_model`."""
    from actionft.train import build_model, resolve_config

    model = build_e4b("meta")
    cfg = resolve_config({**COMMON, "data_path": "<meta>", "gradient_checkpointing": ckpt})
    # peft keeps adapters in fp32; DeepSpeed's bf16 engine casts them to bf16, and under the Trainer's bf16 autocast
    # the adapters' matmuls save bf16 copies too: trace with bf16 adapters
    return build_model(cfg, model).to(torch.bfloat16)


def estimate(peak_tflops_assumed: float = ASSUMED_PEAK_TFLOPS, seed: int = 0) -> dict:
    """Parameter counts, memory and FLOPs per sample for E4B, without a GPU (meta device)."""
    model = build_e4b("meta")
    counts: dict[str, int] = {}
    for name, p in model.named_parameters():
        part = name.split(".")[1] if name.startswith("model.") else name.split(".")[0]
        if part == "language_model":
            sub = name.split(".")[2]
            part = {"embed_tokens": "text embed_tokens (tied LM head)",
                    "embed_tokens_per_layer": "text per-layer embeddings (PLE table)"}.get(sub, "text decoder + PLE "
                                                                                          "projection + norms")
        counts[part] = counts.get(part, 0) + p.numel()
    n_params = sum(counts.values())
    # QLoRA (load_in_4bit): the language model's linear layers in NF4, everything else bf16 (modeling.NOT_QUANTIZED)
    n_4bit = sum(m.weight.numel() for n, m in model.named_modules()
                 if isinstance(m, torch.nn.Linear) and n.startswith("model.language_model."))
    qlora_parts = {"4-bit text linears": n_4bit * NF4_BYTES_PER_PARAM,
                   "per-layer embedding table (bf16)": counts.get("text per-layer embeddings (PLE table)", 0) * 2,
                   "embed_tokens / LM head (bf16)": counts.get("text embed_tokens (tied LM head)", 0) * 2}
    qlora_parts["the rest in bf16 (towers, norms, projections)"] = (
        (n_params - n_4bit) * 2 - qlora_parts["per-layer embedding table (bf16)"]
        - qlora_parts["embed_tokens / LM head (bf16)"])
    qlora_weights = sum(qlora_parts.values())
    flop_model = FlopModel.from_model(model)
    n_shared = sum(layer.shared for layer in flop_model.layers)
    pool = e4b_pool(64, seed, pixels=False)
    stats = pool_stats(pool)
    length = round(stats["tokens_mean"])
    kept1 = round(stats["supervised_mean"]) + 1  # supervised_loss keeps the position before the first label too
    # micro-batch 8, left padded: kept = the longest completion of the batch + 1; mean over the pool's batches
    kept8 = round(sum(max(int((e["labels"] != -100).sum()) for e in pool[i:i + 8]) + 1
                      for i in range(0, len(pool), 8)) / (len(pool) // 8))
    e0 = pool[0]
    runs, valid = image_runs(e0["mm_token_type_ids"]), [int((p >= 0).all(-1).sum()) for p in e0["image_position_ids"]]
    flops_full = flop_model.sample(length, length, runs, valid)
    # micro-batch 1 (no padding): only the LM head is cut; left-padded micro-batch 8: K/V-shared layers too
    flops_b1 = flop_model.sample(length, kept1, runs, valid, kept_shared=length)
    flops_kept = flop_model.sample(length, kept8, runs, valid)
    del model
    peft_ckpt = e4b_meta_peft(ckpt=True)
    n_lora = sum(p.numel() for p in peft_ckpt.parameters() if p.requires_grad)
    memory = {
        "reference (b1 x 8, ckpt, ZeRO-2, full logits)":
            memory_estimate(peft_ckpt, n_params, n_lora, 1, length, length, ckpt=True, zero2=True, shortcut=False),
        "lowmem (b1 x 8, ckpt, supervised-only logits)":
            memory_estimate(peft_ckpt, n_params, n_lora, 1, length, kept1, ckpt=True, zero2=False, shortcut=False),
    }
    memory["qlora: params/gemma4_e4b_qlora.yaml (b1 x 8, ckpt, ZeRO-2, supervised-only logits)"] = memory_estimate(
        peft_ckpt, n_params, n_lora, 1, length, kept1, ckpt=True, zero2=True, shortcut=False,
        weight_bytes=qlora_weights)
    memory["qlora with full logits (b1 x 8, ckpt, ZeRO-2)"] = memory_estimate(
        peft_ckpt, n_params, n_lora, 1, length, length, ckpt=True, zero2=True, shortcut=False,
        weight_bytes=qlora_weights)
    peft_plain = e4b_meta_peft(ckpt=False)
    memory["fastest candidate (b8 x 1, no ckpt, supervised-only)"] = memory_estimate(
        peft_plain, n_params, n_lora, 8, length, kept8, ckpt=False, zero2=False)
    memory["fastest candidate (b8 x 1, ckpt, supervised-only)"] = memory_estimate(
        peft_ckpt, n_params, n_lora, 8, length, kept8, ckpt=True, zero2=False)
    memory["fastest candidate (b4 x 2, no ckpt, supervised-only)"] = memory_estimate(
        peft_plain, n_params, n_lora, 4, length, kept8, ckpt=False, zero2=False)
    memory["reference without ckpt (b1 x 8, full logits)"] = memory_estimate(
        peft_plain, n_params, n_lora, 1, length, length, ckpt=False, zero2=True, shortcut=False)
    ref_tflops = REFERENCE_SAMPLES_PER_S * flops_full["total"] / 1e12
    target = REFERENCE_SAMPLES_PER_S * TARGET_SPEEDUP
    return {
        "model": "Gemma 4 E4B (meta device, random-weight architecture from gemma4.md)",
        "parameters_total": n_params, "parameters_by_part": counts, "lora_parameters": n_lora,
        "kv_shared_layers": n_shared, "active_macs_per_token": flop_model.active_macs_per_token(),
        "sample": {"tokens": length, "supervised_tokens": round(stats["supervised_mean"], 2),
                   "kept_positions_b1": kept1, "kept_positions_b8": kept8,
                   "soft_tokens": stats["soft_tokens_per_sample"], "pixel_values": stats["pixel_values"]},
        "flops_per_sample_full_logits": flops_full, "flops_per_sample_supervised_only_b1": flops_b1,
        "flops_per_sample_supervised_only": flops_kept,
        "memory": memory,
        "qlora_weights_gib_by_part": {k: v / 2**30 for k, v in qlora_parts.items()},
        "qlora_4bit_parameters": n_4bit,
        "reference": {
            "samples_per_s": REFERENCE_SAMPLES_PER_S, "model_tflops_per_s": ref_tflops,
            "assumed_peak_tflops": peak_tflops_assumed, "implied_mfu": ref_tflops / peak_tflops_assumed,
            # checkpointing recomputes the decoder's forward once more: + half the linear, a third of LoRA/attention
            "hardware_tflops_per_s_with_recompute": REFERENCE_SAMPLES_PER_S * (
                flops_full["total"] + flops_full["text_linear"] / 2 + (flops_full["lora"] + flops_full["attention"]) / 3
            ) / 1e12,
        },
        "target": {
            "samples_per_s": target,
            "tflops_per_s_full_logits": target * flops_full["total"] / 1e12,
            "mfu_full_logits": target * flops_full["total"] / 1e12 / peak_tflops_assumed,
            "tflops_per_s_supervised_only": target * flops_kept["total"] / 1e12,
            "mfu_supervised_only": target * flops_kept["total"] / 1e12 / peak_tflops_assumed,
            "mfu_supervised_only_vision_cached": target * (flops_kept["total"] - flops_kept["vision"]
                                                           - flops_kept["embed_vision"]) / 1e12 / peak_tflops_assumed,
        },
    }


def format_estimate(est: dict) -> str:
    g = est["parameters_by_part"]
    s = est["sample"]
    lines = ["## Analytic estimate: Gemma 4 E4B (no GPU needed)", "",
             f"parameters stored: {est['parameters_total'] / 1e9:.3f} B  (bf16 weights "
             f"{est['parameters_total'] * 2 / 2**30:.2f} GiB)"]
    lines += [f"  {k}: {v / 1e9:.3f} B" for k, v in sorted(g.items(), key=lambda kv: -kv[1])]
    lines += [f"LoRA parameters (r=16, 7 projections, {42 - est['kv_shared_layers']} layers with k/v, "
              f"{est['kv_shared_layers']} K/V-shared without): {est['lora_parameters'] / 1e6:.2f} M",
              f"compute per token (text linears + LM head, MACs): {est['active_macs_per_token'] / 1e9:.2f} B",
              f"sample: {s['tokens']} tokens ({s['soft_tokens']} image soft tokens, {s['supervised_tokens']} "
              f"supervised), pixel_values {s['pixel_values']}; kept positions with supervised-only logits: "
              f"{s['kept_positions_b1']} (micro-batch 1), {s['kept_positions_b8']} (micro-batch 8, left padded)", ""]
    lines += ["FLOPs per sample (TFLOP)     full logits   supervised-only b1   supervised-only b8 left-padded",
              "                             (reference)   (LM head cut only)   (LM head + K/V-shared layers cut)"]
    for k in est["flops_per_sample_full_logits"]:
        lines.append(f"  {k:<26} {est['flops_per_sample_full_logits'][k] / 1e12:>11.3f}   "
                     f"{est['flops_per_sample_supervised_only_b1'][k] / 1e12:>18.3f}   "
                     f"{est['flops_per_sample_supervised_only'][k] / 1e12:>18.3f}")
    lines += ["", "memory (GiB)  weights | LoRA+opt | activations (logits) | bwd transient | DS buffers | total"]
    for name, m in est["memory"].items():
        lines.append(f"  {name}: {m['weights_gib']:.2f} | {m['lora_and_optimizer_gib']:.2f} | "
                     f"{m['activations_gib']:.2f} ({m['logits_saved_gib']:.2f}) | {m['backward_transient_gib']:.2f} | "
                     f"{m['deepspeed_buffers_gib']:.2f} | {m['total_gib']:.1f}")
    lines.append("  QLoRA weights (GiB): " + ", ".join(f"{k} {v:.2f}"
                                                      for k, v in est["qlora_weights_gib_by_part"].items())
                 + f" ({est['qlora_4bit_parameters'] / 1e9:.3f} B parameters in NF4)")
    m = next(iter(est["memory"].values()))
    lines.append(f"  (saved activations per decoder layer: up to {m['saved_per_layer_mib_max']:.0f} MiB per sample; "
                 f"all 42 layers without checkpointing: {m['saved_all_layers_no_ckpt_gib']:.2f} GiB per sample)")
    r, t = est["reference"], est["target"]
    lines += ["", f"reference: {r['samples_per_s']} samples/s x "
              f"{est['flops_per_sample_full_logits']['total'] / 1e12:.1f} TFLOP = {r['model_tflops_per_s']:.1f} "
              f"TFLOP/s of model FLOPs -> MFU {r['implied_mfu']:.1%} ASSUMING an H100 ({r['assumed_peak_tflops']:.0f} "
              f"TFLOP/s dense bf16; the reference GPU is not stated); with checkpoint recomputation "
              f"~{r['hardware_tflops_per_s_with_recompute']:.1f} TFLOP/s executed",
              f"target 5x = {t['samples_per_s']:.2f} samples/s needs {t['tflops_per_s_full_logits']:.0f} TFLOP/s with "
              f"full logits (MFU {t['mfu_full_logits']:.1%}), {t['tflops_per_s_supervised_only']:.0f} TFLOP/s with "
              f"supervised-only logits at micro-batch 8 (MFU {t['mfu_supervised_only']:.1%}; "
              f"{t['mfu_supervised_only_vision_cached']:.1%} if the frozen vision tower's outputs were cached)"]
    return "\n".join(lines)


# -- orchestration --------------------------------------------------------------------------------------------
def markdown_table(records: list[dict]) -> str:
    cols = ["configuration", "variant", "samples/s", "supervised tok/s", "tokens/s", "peak mem GiB", "MFU",
            "TFLOP/sample", "loss", "steps", "optimizer", "ZeRO", "SDPA on full attention"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['configuration']} | {r.get('variant', '')} | failed: {r['error'][:60]} |"
                         + " |" * (len(cols) - 3))
            continue
        mfu = "n/a" if r["mfu"] is None else f"{r['mfu']:.1%}"
        lines.append(f"| {r['configuration']} | {r['variant']} | {r['samples_per_s']:.3f} | "
                     f"{r['supervised_tokens_per_s']:.1f} | {r['tokens_per_s']:.0f} | {r['peak_mem_gb']:.3f} | {mfu} | "
                     f"{r['flops_per_sample'] / 1e12:.4g} | {r['loss']} | {r['steps']} | {r.get('optimizer')} | "
                     f"{r.get('zero_stage') or 'off'} | {', '.join(r.get('sdpa_backend_full_attention') or ['n/a'])} |")
    return "\n".join(lines)


def choose(configuration: str, results: list[dict]) -> dict:
    ok = [r for r in results if "error" not in r]
    if not ok:
        return results[0]
    if configuration == "fastest":
        best = max(ok, key=lambda r: r["samples_per_s"])
    elif configuration == "lowmem":
        best = min(ok, key=lambda r: r["peak_reserved_gb"] or r["peak_mem_gb"])
    else:
        best = ok[0]
    best = dict(best)
    if len(results) > 1:
        best["candidates"] = [{k: r.get(k) for k in ("variant", "samples_per_s", "peak_mem_gb", "peak_reserved_gb",
                                                     "loss", "error")} for r in results]
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mode", choices=("tiny", "e4b"), default=None,
                   help="tiny (default without CUDA) or e4b (default with CUDA)")
    p.add_argument("--steps", type=int, default=None, help="timed optimizer steps per variant (tiny 3, e4b 6)")
    p.add_argument("--warmup", type=int, default=None, help="untimed optimizer steps first, >= 1 (default 1)")
    p.add_argument("--configs", default="reference,fastest,lowmem,qlora", help="comma-separated configurations")
    p.add_argument("--variants", choices=("first", "all"), default=None,
                   help="candidates per configuration: first only (tiny default) or all (e4b default)")
    p.add_argument("--out", default="outputs/bench/bench_train.json", help="JSON list of records")
    p.add_argument("--estimate-out", default="outputs/bench/bench_estimate.json")
    p.add_argument("--estimate", action="store_true", help="print the analytic E4B estimate and exit")
    p.add_argument("--no-estimate", action="store_true", help="skip the analytic estimate")
    p.add_argument("--dry-run", action="store_true", help="check config, inputs and plan; train nothing")
    p.add_argument("--peak-tflops", type=float, default=None, help="device peak for MFU (default: by GPU name)")
    p.add_argument("--pool", type=int, default=8,
                   help="distinct pre-encoded samples, read in order and cycled (8 = one optimizer step's worth)")
    p.add_argument("--max-soft-tokens", type=int, default=MAX_SOFT_TOKENS,
                   help="soft tokens per frame (tiny mode only; 70 makes a quicker smoke test)")
    p.add_argument("--timeout", type=int, default=900, help="seconds per variant")
    p.add_argument("--budget", type=int, default=None,
                   help="seconds for all variants: each gets at most what is left, none starts with less than "
                        "--min-variant-s left (records are written after every variant)")
    p.add_argument("--min-variant-s", type=int, default=60, help="see --budget")
    p.add_argument("--md-out", default=None, help="also write the markdown table here")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return _worker(args.worker)

    mode = args.mode or ("e4b" if torch.cuda.is_available() else "tiny")
    # e4b: 7 variants x (start-up + 7 steps of 8 samples) stays under 10 minutes on an H100
    steps = args.steps or (6 if mode == "e4b" else 3)
    warmup = args.warmup if args.warmup is not None else 1
    variants = args.variants or ("all" if mode == "e4b" else "first")
    if warmup < 1 or steps < 1:
        p.error("--warmup and --steps must be >= 1 (the timer starts at the end of the last warm-up step)")
    out = Path(args.out) if Path(args.out).is_absolute() else REPO / args.out
    est_out = Path(args.estimate_out) if Path(args.estimate_out).is_absolute() else REPO / args.estimate_out
    print(header(), flush=True)
    if mode == "e4b" and not torch.cuda.is_available() and not (args.dry_run or args.estimate):
        print("--mode e4b needs a CUDA GPU (about 40 GB free for the candidates without checkpointing); "
              "use --dry-run or --estimate here", file=sys.stderr)
        return 2

    if not args.no_estimate or args.estimate:
        est = estimate(args.peak_tflops or ASSUMED_PEAK_TFLOPS)
        print("\n" + format_estimate(est) + "\n", flush=True)
        est_out.parent.mkdir(parents=True, exist_ok=True)
        est_out.write_text(json.dumps(est, indent=1))
        if args.estimate:
            return 0

    print(f"mode {mode}: {warmup} warm-up + {steps} timed optimizer steps per variant, effective batch 8, "
          f"pool of {args.pool} distinct samples", flush=True)
    if mode == "e4b" and args.max_soft_tokens != MAX_SOFT_TOKENS:
        print("--mode e4b builds inputs for 280 soft tokens per frame only", file=sys.stderr)
        return 2
    pool = tiny_pool(args.pool, 0, args.max_soft_tokens) if mode == "tiny" else e4b_pool(args.pool, 0)
    stats = pool_stats(pool)
    print(f"samples: {stats['tokens_mean']:.0f} tokens on average ({stats['tokens_min']}-{stats['tokens_max']}), "
          f"{stats['supervised_mean']:.1f} supervised, {stats['soft_tokens_per_sample']} image soft tokens, "
          f"pixel_values {stats['pixel_values']} per sample", flush=True)
    configs = args.configs.split(",")
    if unknown := [c for c in configs if c not in CONFIGURATIONS]:
        p.error(f"unknown configuration(s) {', '.join(unknown)}; choose from {', '.join(CONFIGURATIONS)}")
    # the first candidate of every configuration first (reference, fastest, lowmem), the others as time allows
    plan = [(c, *CONFIGURATIONS[c][0]) for c in configs]
    if variants == "all":
        plan += [(c, name, ov) for c in configs for name, ov in CONFIGURATIONS[c][1:]]
    if args.dry_run:
        for c, name, ov in plan:
            print(f"  would run {c}: {name}  {ov}")
        if mode == "e4b":
            model = build_e4b("meta")
            n = sum(p.numel() for p in model.parameters())
            print(f"E4B on meta: {n / 1e9:.3f} B parameters; first K/V-shared layer "
                  f"{model.config.text_config.num_hidden_layers - model.config.text_config.num_kv_shared_layers}")
        return 0

    results: dict[str, list[dict]] = {}
    skipped: list[dict] = []
    deadline = time.monotonic() + args.budget if args.budget else None
    md_out = Path(args.md_out) if args.md_out and Path(args.md_out).is_absolute() else (
        REPO / args.md_out if args.md_out else None)

    def write_records() -> list[dict]:
        """Written after every variant, so a run stopped from outside keeps what it measured."""
        records = [choose(c, rs) for c, rs in results.items()] + skipped
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(records, indent=1))
        if md_out:
            md_out.parent.mkdir(parents=True, exist_ok=True)
            md_out.write_text(markdown_table([r for r in records if "skipped" not in r]) + "\n")
        return records

    no_deepspeed = importable("deepspeed") if any(ov.get("deepspeed") for _, _, ov in plan) else None
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        pool_file = Path(tmp) / "pool.pt"
        torch.save(pool, pool_file)
        del pool
        gc.collect()
        for i, (configuration, name, overrides) in enumerate(plan):
            first = name == CONFIGURATIONS[configuration][0][0]
            left = None if deadline is None else deadline - time.monotonic()
            why_skip = None
            if no_deepspeed and overrides.get("deepspeed") and not first:
                why_skip = "DeepSpeed unavailable: the same as the candidate without ZeRO"
            elif left is not None and left < args.min_variant_s:
                why_skip = f"time budget: {max(0, left):.0f} s left of {args.budget} s"
            if why_skip:
                print(f"  {configuration:<9} {name:<28} skipped ({why_skip})", flush=True)
                skipped.append({"configuration": configuration, "variant": name, "skipped": why_skip})
                write_records()
                continue
            spec = {"mode": mode, "configuration": configuration, "variant": name, "overrides": overrides,
                    "steps": steps, "warmup": warmup, "pool_file": str(pool_file), "work_dir": tmp,
                    "run_name": f"v{i}", "record_file": str(Path(tmp) / f"record{i}.json"),
                    "peak_tflops": args.peak_tflops}
            log = Path(tmp) / f"variant{i}.log"
            timeout = args.timeout if left is None else max(1, min(args.timeout, int(left)))
            t0 = time.perf_counter()
            with open(log, "w") as fh:
                env = {**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
                       "TOKENIZERS_PARALLELISM": "false"}
                try:
                    rc = subprocess.run([sys.executable, __file__, "--worker", json.dumps(spec)], stdout=fh,
                                        stderr=subprocess.STDOUT, env=env, cwd=REPO, timeout=timeout).returncode
                except subprocess.TimeoutExpired:
                    rc = f"timeout after {timeout} s"
            record_file = Path(spec["record_file"])
            if rc == 0 and record_file.is_file():
                record = json.loads(record_file.read_text())
                if "skipped" in record:
                    print(f"  {configuration:<9} {name:<28} skipped ({record['skipped']})", flush=True)
                    skipped.append(record)
                    write_records()
                    continue
            else:
                tail = "\n".join(log.read_text().splitlines()[-30:])
                print(f"variant {configuration}/{name} failed ({rc}):\n{tail}", file=sys.stderr)
                record = {"error": f"exit {rc}: {tail.splitlines()[-1] if tail else ''}"}
            record.setdefault("configuration", configuration)
            record.setdefault("variant", name)
            results.setdefault(configuration, []).append(record)
            status = record.get("error") or (f"{record['samples_per_s']:.3f} samples/s, "
                                             f"peak {record['peak_mem_gb']:.3f} GiB, loss {record['loss']}")
            print(f"  {configuration:<9} {name:<28} {status}  ({time.perf_counter() - t0:.0f} s)", flush=True)
            write_records()

    records = [r for r in write_records() if "skipped" not in r]
    print("\n" + markdown_table(records))
    ok = {r["configuration"]: r for r in records if "error" not in r}
    if "reference" in ok:
        ref = ok["reference"]
        for r in ok.values():
            if r is not ref:
                print(f"{r['configuration']}: {r['samples_per_s'] / ref['samples_per_s']:.2f}x the reference's "
                      f"samples/s on this device; final loss {r['loss']} vs reference {ref['loss']}")
    if mode == "tiny":
        print("(tiny model on this device: a smoke test of the code paths; not comparable with GPU numbers)")
    print(f"wrote {out.relative_to(REPO) if out.is_relative_to(REPO) else out}")
    if not records:
        print("no variant was measured", file=sys.stderr)
    return 0 if records and all("error" not in r for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
