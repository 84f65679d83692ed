"""The published google/gemma-4-e4b-it structure, for checks that cannot download it.

`e4b_config()` is the released checkpoint's configuration from its public numbers (text, vision and audio towers and
their flags; `../shared/reference/gemma4.md`), optionally at reduced depth. `build_standin()` saves a checkpoint
folder of that structure with random weights and a processor at the real image settings (patch 16, pooling 3, 280
soft tokens per frame), loadable with `from_pretrained` like the real one: the full-width smoke run trains the
reference recipe on it.
"""

from __future__ import annotations

from pathlib import Path

# Special-token ids of the published tokenizer (the stand-in uses its own tokenizer's ids instead).
PUBLISHED_TOKEN_IDS = {
    "boi_token_id": 255999, "eoi_token_id": 258882, "image_token_id": 258880, "video_token_id": 258884,
    "boa_token_id": 256000, "eoa_token_index": 258883, "audio_token_id": 258881,
}
PUBLISHED_TEXT = {
    "vocab_size": 262144, "vocab_size_per_layer_input": 262144, "hidden_size": 2560, "intermediate_size": 10240,
    "num_hidden_layers": 42, "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 256,
    "global_head_dim": 512, "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7,
    "sliding_window": 512, "num_kv_shared_layers": 18, "hidden_size_per_layer_input": 256,
    "final_logit_softcapping": 30.0, "tie_word_embeddings": True, "use_bidirectional_attention": None,
    "use_double_wide_mlp": False, "attention_k_eq_v": False, "enable_moe_block": False,
    "rope_parameters": {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
        "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25, "rope_theta": 1e6},
    },
    "pad_token_id": 0, "eos_token_id": [1, 106], "bos_token_id": 2,
}
PUBLISHED_VISION = {
    "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 16, "num_attention_heads": 12,
    "num_key_value_heads": 12, "head_dim": 64, "patch_size": 16, "pooling_kernel_size": 3,
    "position_embedding_size": 10240, "use_clipped_linears": True,
}
PUBLISHED_AUDIO = {
    "hidden_size": 1024, "num_hidden_layers": 12, "num_attention_heads": 8, "output_proj_dims": 1536,
    "subsampling_conv_channels": [128, 32], "conv_kernel_size": 5, "attention_chunk_size": 12,
    "attention_context_left": 13, "attention_context_right": 0, "attention_logit_cap": 50.0,
    "residual_weight": 0.5, "rms_norm_eps": 1e-6, "use_clipped_linears": True,
}
# The image processor of the release: 16-pixel patches pooled 3x3, 280 soft tokens per image by default.
PUBLISHED_IMAGE_PROCESSOR = {"patch_size": 16, "pooling_kernel_size": 3, "max_soft_tokens": 280}

# Reduced depth for CPU smoke runs: sliding and full layers, the last two reusing the K/V of the first two. The
# towers keep their width at 2 layers each: at 16 layers the frozen vision tower alone costs ~4.3 TFLOP of forward
# per clip of 4 frames (2,304 patches each), about 30 s on 2 CPU cores, three quarters of a training micro-batch.
SMOKE_LAYER_TYPES = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
SMOKE_KV_SHARED_LAYERS = 2
SMOKE_TOWER_LAYERS = 2


def e4b_config(layer_types: list[str] | None = None, num_kv_shared_layers: int | None = None,
               token_ids: dict[str, int] | None = None, text_overrides: dict | None = None,
               tower_layers: int | None = None):
    """`Gemma4Config` of google/gemma-4-e4b-it. With `layer_types`, the same width at that depth (and
    `num_kv_shared_layers` of them reusing earlier K/V); with `tower_layers`, vision and audio towers of that many
    layers at their full width. `token_ids` replaces the published special-token ids."""
    from transformers import Gemma4Config

    text = {**PUBLISHED_TEXT, **(text_overrides or {})}
    if layer_types is not None:
        text.update(layer_types=list(layer_types), num_hidden_layers=len(layer_types),
                    num_kv_shared_layers=num_kv_shared_layers if num_kv_shared_layers is not None else 0)
    depth = {} if tower_layers is None else {"num_hidden_layers": tower_layers}
    return Gemma4Config(
        text_config=text, vision_config={**PUBLISHED_VISION, **depth}, audio_config={**PUBLISHED_AUDIO, **depth},
        tie_word_embeddings=True, **{**PUBLISHED_TOKEN_IDS, **(token_ids or {})},
    )


def standin_processor(max_soft_tokens: int = 280):
    """The packaged tiny tokenizer and chat template with the release's image/video settings."""
    from actionft.modeling import load_processor
    from actionft.tiny import build_processor

    tokenizer = load_processor("tiny").tokenizer
    settings = {**PUBLISHED_IMAGE_PROCESSOR, "max_soft_tokens": max_soft_tokens}
    return build_processor(tokenizer, **settings)


def build_standin(out_dir: str | Path, layer_types: list[str] | None = None,
                  num_kv_shared_layers: int | None = None, tower_layers: int | None = None, seed: int = 0) -> Path:
    """Save a random-weight bf16 checkpoint of the published structure (full width and vocab, vision and audio
    towers, the release's flags) at the given depth, with a processor at the real image settings."""
    import torch
    from transformers import Gemma4ForConditionalGeneration

    processor = standin_processor()
    tok = processor.tokenizer
    ids = {
        "boi_token_id": tok.convert_tokens_to_ids("<|image>"), "eoi_token_id": tok.convert_tokens_to_ids("<image|>"),
        "image_token_id": tok.convert_tokens_to_ids("<|image|>"),
        "video_token_id": tok.convert_tokens_to_ids("<|video|>"),
        "boa_token_id": tok.convert_tokens_to_ids("<|audio>"), "eoa_token_index": tok.convert_tokens_to_ids("<audio|>"),
        "audio_token_id": tok.convert_tokens_to_ids("<|audio|>"),
    }
    special = {"pad_token_id": tok.pad_token_id, "bos_token_id": tok.bos_token_id,
               "eos_token_id": [tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")]}
    config = e4b_config(layer_types, num_kv_shared_layers, token_ids=ids, text_overrides=special,
                        tower_layers=tower_layers)
    torch.manual_seed(seed)
    model = Gemma4ForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir
