"""A tiny, complete, offline Gemma 4: config, tokenizer, processors and random weights.

The tiny model is a real `Gemma4ForConditionalGeneration` (vision tower, per-layer embeddings, K/V sharing,
sliding + full attention) at toy width, so every code path the real E4B takes runs on a laptop CPU.
It is saved to a folder and loaded back with `from_pretrained`, exactly like `google/gemma-4-e4b-it`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# Gemma 4's special tokens (ids differ from the real vocabulary; names and roles are the same).
SPECIAL_TOKENS = [
    "<pad>", "<eos>", "<bos>", "<unk>", "<mask>",
    "<|turn>", "<turn|>",
    "<|image>", "<|image|>", "<image|>",
    "<|video|>",
    "<|audio>", "<|audio|>", "<audio|>",
    "<|think|>", "<|channel>", "<channel|>", "<|tool>", "<tool|>",
]
NAMED_SPECIAL_TOKENS = {
    "image_token": "<|image|>",
    "boi_token": "<|image>",
    "eoi_token": "<image|>",
    "video_token": "<|video|>",
    "audio_token": "<|audio|>",
    "boa_token": "<|audio>",
    "eoa_token": "<audio|>",
}

# Gemma 4 turn format: `<|turn>user\n...<turn|>\n`, assistant turns are rendered with the role `model`.
# The assistant text plus its end-of-turn token sit inside {% generation %} so that
# `return_assistant_tokens_mask=True` works; the collator does not depend on it.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{ '<|turn>' + role + '\n' }}"
    "{%- if message['content'] is string -%}"
    "{%- if role == 'model' -%}{% generation %}{{ message['content'] | trim + '<turn|>' }}{% endgeneration %}"
    "{%- else -%}{{ message['content'] | trim + '<turn|>' }}{%- endif -%}"
    "{%- else -%}"
    "{%- if role == 'model' -%}{% generation %}"
    "{%- for item in message['content'] -%}{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{{ '<turn|>' }}{% endgeneration %}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<|image|>' }}"
    "{%- elif item['type'] == 'video' -%}{{ '<|video|>' }}"
    "{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}"
    "{%- endif -%}"
    "{%- endfor -%}{{ '<turn|>' }}"
    "{%- endif -%}"
    "{%- endif -%}"
    "{{ '\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|turn>model\n' }}{%- endif -%}"
)

# Default size: small enough for ~0.1 s per 4-frame sample on one CPU core, big enough to learn the demo.
TINY_DEFAULTS = {
    "vocab_size": 640,
    "text_hidden": 128,
    "text_intermediate": 384,
    "text_layers": 4,
    "text_heads": 4,
    "text_kv_heads": 2,
    "text_head_dim": 32,
    "text_global_head_dim": 64,
    "per_layer_hidden": 16,
    "kv_shared_layers": 2,
    "vision_hidden": 96,
    "vision_intermediate": 256,
    "vision_layers": 2,
    "vision_heads": 4,
    "vision_head_dim": 24,
    "patch_size": 12,
    "pooling_kernel_size": 2,
    "audio_hidden": 32,
    "audio_layers": 1,
    "audio_heads": 2,
    "audio_conv_channels": [8, 4],
    "audio_output_dims": 48,
    "init_std": 0.05,
}


def train_tokenizer(corpus: list[str], vocab_size: int):
    """Train a Gemma-style BPE (spaces as '▁', byte fallback) on `corpus` and wrap it as a `GemmaTokenizer`."""
    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer

    byte_tokens = [f"<0x{i:02X}>" for i in range(256)]
    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    # Split before every '▁' while training so merges never cross a word boundary: answers stay several tokens long.
    tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS + byte_tokens,
        show_progress=False,
        initial_alphabet=sorted(set("".join(corpus).replace(" ", "▁"))),
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    state = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in state["merges"]]
    tokenizer = GemmaTokenizer(
        vocab=state["vocab"],
        merges=merges,
        extra_special_tokens=NAMED_SPECIAL_TOKENS,
        chat_template=CHAT_TEMPLATE,
        padding_side="right",
    )
    # The turn, channel and tool markers must be matched whole before BPE, as in the real Gemma 4 tokenizer.
    registered = {t.content for t in tokenizer.added_tokens_decoder.values()}
    tokenizer.add_tokens(
        [AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS if t not in registered],
        special_tokens=True,
    )
    return tokenizer


def build_processor(tokenizer, patch_size: int, pooling_kernel_size: int, max_soft_tokens: int = 70):
    """A `Gemma4Processor` around `tokenizer` with image and video processors sized for the tiny vision tower."""
    from transformers import (
        Gemma4AudioFeatureExtractor,
        Gemma4ImageProcessor,
        Gemma4Processor,
        Gemma4VideoProcessor,
    )

    common = {"patch_size": patch_size, "pooling_kernel_size": pooling_kernel_size, "max_soft_tokens": max_soft_tokens}
    return Gemma4Processor(
        feature_extractor=Gemma4AudioFeatureExtractor(),
        image_processor=Gemma4ImageProcessor(**common),
        tokenizer=tokenizer,
        video_processor=Gemma4VideoProcessor(**common),
        chat_template=CHAT_TEMPLATE,
        image_seq_length=max_soft_tokens,
    )


def tiny_config(tokenizer, **overrides):
    """A `Gemma4Config` of the E4B family (PLE, K/V sharing, sliding/full mix, vision and audio towers, the
    published flags) at toy width."""
    from transformers import Gemma4Config

    s = {**TINY_DEFAULTS, **overrides}
    ids = {name: tokenizer.convert_tokens_to_ids(tok) for name, tok in NAMED_SPECIAL_TOKENS.items()}
    n = s["text_layers"]
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
    text = {
        "vocab_size": len(tokenizer),
        "vocab_size_per_layer_input": len(tokenizer),
        "hidden_size": s["text_hidden"],
        "intermediate_size": s["text_intermediate"],
        "num_hidden_layers": n,
        "num_attention_heads": s["text_heads"],
        "num_key_value_heads": s["text_kv_heads"],
        "head_dim": s["text_head_dim"],
        "global_head_dim": s["text_global_head_dim"],
        "hidden_size_per_layer_input": s["per_layer_hidden"],
        "num_kv_shared_layers": s["kv_shared_layers"],
        "layer_types": layer_types,
        "sliding_window": 512,
        "max_position_embeddings": 4096,
        "final_logit_softcapping": 30.0,
        # the published E2B/E4B leave this unset (bidirectional attention within images is for the larger models)
        "use_bidirectional_attention": None,
        "initializer_range": s["init_std"],
        "pad_token_id": tokenizer.pad_token_id,
        "eos_token_id": [tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<turn|>")],
        "bos_token_id": tokenizer.bos_token_id,
        "tie_word_embeddings": True,
    }
    vision = {
        "hidden_size": s["vision_hidden"],
        "intermediate_size": s["vision_intermediate"],
        "num_hidden_layers": s["vision_layers"],
        "num_attention_heads": s["vision_heads"],
        "num_key_value_heads": s["vision_heads"],
        "head_dim": s["vision_head_dim"],
        "patch_size": s["patch_size"],
        "pooling_kernel_size": s["pooling_kernel_size"],
        "position_embedding_size": 128,
        "use_clipped_linears": True,
        "initializer_range": s["init_std"],
    }
    # The published checkpoint carries an audio tower; the tiny one has the same structure and flags at toy width.
    # Nothing here feeds it audio: it is there so that loading, LoRA targeting and freezing meet what the real
    # checkpoint holds (transformers has no SDPA path for it, see `modeling.attn_implementation_for`).
    audio = {
        "hidden_size": s["audio_hidden"],
        "num_hidden_layers": s["audio_layers"],
        "num_attention_heads": s["audio_heads"],
        "subsampling_conv_channels": list(s["audio_conv_channels"]),
        "output_proj_dims": s["audio_output_dims"],
        "conv_kernel_size": 5,
        "attention_chunk_size": 12,
        "attention_context_left": 13,
        "attention_context_right": 0,
        "attention_logit_cap": 50.0,
        "residual_weight": 0.5,
        "rms_norm_eps": 1e-6,
        "use_clipped_linears": True,
        "initializer_range": s["init_std"],
    }
    return Gemma4Config(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        boi_token_id=ids["boi_token"],
        eoi_token_id=ids["eoi_token"],
        image_token_id=ids["image_token"],
        video_token_id=ids["video_token"],
        boa_token_id=ids["boa_token"],
        eoa_token_index=ids["eoa_token"],
        audio_token_id=ids["audio_token"],
        initializer_range=s["init_std"],
        tie_word_embeddings=True,
    )


def build_tiny_model(out_dir: str | Path, corpus: list[str], seed: int = 0, **overrides) -> Path:
    """Build a randomly initialised tiny Gemma 4 with its tokenizer and processors, and save it to `out_dir`.

    Deterministic for a given corpus, seed and size. Returns the folder, loadable with `from_pretrained`.
    """
    from transformers import Gemma4ForConditionalGeneration

    s = {**TINY_DEFAULTS, **overrides}
    out_dir = Path(out_dir)
    tokenizer = train_tokenizer(corpus, s["vocab_size"])
    processor = build_processor(tokenizer, s["patch_size"], s["pooling_kernel_size"])
    config = tiny_config(tokenizer, **overrides)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration(config)
    with torch.no_grad():
        # transformers initialises the vision position table to all ones, i.e. no position signal at all;
        # a random table lets the tiny tower tell where in the frame a patch is.
        table = model.model.vision_tower.patch_embedder.position_embedding_table
        table.normal_(0.0, s["init_std"] * 4)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
