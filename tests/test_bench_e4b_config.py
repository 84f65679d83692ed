"""The benchmark's Gemma 4 E4B is the published structure: its config against the published values, field by field.

Two sources: `actionft.e4b.PUBLISHED_*` (always) and the facts written in the shared reference notes
(`../shared/reference/gemma4.md`, parsed here; skipped with a reason when that file is not beside the checkout).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "bench_train.py"
SHARED = Path(os.environ.get("ACTIONFT_SHARED_DIR", REPO.parent / "shared"))
REFERENCE = SHARED / "reference" / "gemma4.md"




@pytest.fixture(scope="module")
def config(bench):
    return bench.e4b_config()


def field(config_dict: dict, key: str):
    """A config field as the published config.json names it. transformers 5.23 stores `global_head_dim` as per-layer
    `head_dim` overrides of the full-attention layers: read it back from there."""
    if key == "global_head_dim" and key not in config_dict:
        per_layer = {int(i): v for i, v in (config_dict.get("per_layer_config") or {}).items()}
        dims = {per_layer.get(i, {}).get("head_dim", config_dict["head_dim"])
                for i, kind in enumerate(config_dict["layer_types"]) if kind == "full_attention"}
        return dims.pop() if len(dims) == 1 else sorted(dims)
    return config_dict.get(key, "<missing>")


def _value(raw: str):
    raw = raw.strip().rstrip(",;.")
    if raw in ("true", "false"):
        return raw == "true"
    if raw == "null":
        return None
    if raw.startswith("["):
        return [_value(x) for x in raw.strip("[]").split(",")]
    number = float(raw)
    return int(number) if number.is_integer() and "." not in raw and "e" not in raw.lower() else number


def bullets(markdown: str, heading: str) -> list[str]:
    """The top-level bullets of one `## ` section, each joined onto one line."""
    section = markdown.split(f"\n## {heading}", 1)[1].split("\n## ", 1)[0]
    out: list[str] = []
    for line in section.splitlines():
        if line.startswith("- "):
            out.append(line[2:])
        elif line.startswith("  ") and out:
            out[-1] += " " + line.strip()
    return out


def reference_facts(markdown: str) -> dict[str, dict]:
    """{"text"|"vision"|"audio": {config field: value}} as the reference notes state them."""
    facts: dict[str, dict] = {"text": {}, "vision": {}, "audio": {}}
    words = {  # "<number> <word>" or "<word> <number>" as written in the prose
        r"(\d+) layers": "num_hidden_layers", r"(\d+) heads": "num_attention_heads",
        r"(\d+) KV heads": "num_key_value_heads", r"\bhidden (\d+)": "hidden_size",
        r"\bintermediate (\d+)": "intermediate_size", r"\bvocab (\d+)": "vocab_size",
        r"\bpatch (\d+)": "patch_size", r"pooling kernel (\d+)": "pooling_kernel_size",
        r"\bhidden_size (\d+)": "hidden_size",
    }
    named = r"`?\b(head_dim|global_head_dim|sliding_window|num_kv_shared_layers|hidden_size_per_layer_input|" \
            r"vocab_size_per_layer_input|final_logit_softcapping)`? (\d+(?:\.\d+)?)"
    backticked = r"`(\w+)` (\[[\d, ]+\]|true|false|null|-?\d+(?:\.\d+)?(?:e-?\d+)?)"

    def scan(sub: str, text: str, structural: bool = True) -> None:
        if structural:
            for pattern, key in words.items():
                if m := re.search(pattern, text):
                    facts[sub][key] = int(m.group(1))
            for key, raw in re.findall(named, text):
                facts[sub][key] = _value(raw)
        for key, raw in re.findall(backticked, text):
            facts[sub][key] = _value(raw)

    for line in bullets(markdown, "The real model"):
        if line.startswith("Text (E4B):"):
            scan("text", line)
            if m := re.search(r"\((\d+) x sliding_attention \+ (\d+) x full_attention\) x (\d+)", line):
                n_sliding, n_full, repeat = map(int, m.groups())
                facts["text"]["layer_types"] = (["sliding_attention"] * n_sliding + ["full_attention"] * n_full) * repeat
            facts["text"]["tie_word_embeddings"] = "tied embeddings" in line
            if m := re.search(r"sliding theta (\S+) default; full theta (\S+), proportional, partial_rotary_factor "
                              r"(\d+(?:\.\d+)?)", line):
                facts["text"]["rope_parameters"] = {
                    "sliding_attention": {"rope_type": "default", "rope_theta": float(m.group(1))},
                    "full_attention": {"rope_type": "proportional", "partial_rotary_factor": float(m.group(3)),
                                       "rope_theta": float(m.group(2).rstrip(","))},
                }
        elif line.startswith("Vision:"):
            scan("vision", line)
    for line in bullets(markdown, "The published checkpoint"):
        if "audio tower" in line and "audio_config" in line:
            scan("audio", line.split("About")[0])
        elif line.startswith("Vision:"):
            scan("vision", line.split("; image processor")[0])
        elif line.startswith("Text:"):
            scan("text", line, structural=False)
    facts["audio"].pop("model_type", None)  # written as `model_type` `gemma4_audio`: checked by name below
    return facts


def test_reference_parser_reads_what_is_written():
    """The parser on a passage shaped like the notes (so a silent parse failure cannot pass the comparison)."""
    md = ("# x\n## The real model (for configs)\n- Text (E4B): 42 layers, hidden 2560, 8 heads, 2 KV heads,\n"
          "  head_dim 256, layer_types = (5 x sliding_attention + 1 x full_attention) x 7, vocab 262144,\n"
          "  final_logit_softcapping 30, tied embeddings.\n- Vision: 16 layers, hidden 768, patch 16, pooling kernel 3\n"
          "## The published checkpoint (x)\n- It carries an **audio tower**: `audio_config` with hidden_size 1024,\n"
          "  `subsampling_conv_channels` [128, 32], `attention_logit_cap` 50.0, `rms_norm_eps` 1e-6. About 0.3 B.\n"
          "- Text: `use_bidirectional_attention` null for E2B/E4B, `enable_moe_block` false.\n")
    facts = reference_facts(md)
    assert facts["text"] == {
        "num_hidden_layers": 42, "hidden_size": 2560, "num_attention_heads": 8, "num_key_value_heads": 2,
        "head_dim": 256, "vocab_size": 262144, "final_logit_softcapping": 30,
        "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 7, "tie_word_embeddings": True,
        "use_bidirectional_attention": None, "enable_moe_block": False,
    }
    assert facts["vision"] == {"num_hidden_layers": 16, "hidden_size": 768, "patch_size": 16, "pooling_kernel_size": 3}
    assert facts["audio"] == {"hidden_size": 1024, "subsampling_conv_channels": [128, 32],
                              "attention_logit_cap": 50.0, "rms_norm_eps": 1e-6}


@pytest.mark.skipif(not REFERENCE.is_file(), reason=f"{REFERENCE} is absent (the shared reference notes are not "
                                                    "beside this checkout; set ACTIONFT_SHARED_DIR to point at them)")
def test_benchmark_config_matches_the_reference_notes(config):
    facts = reference_facts(REFERENCE.read_text())
    # enough of each sub-model was read that the comparison means something
    assert len(facts["text"]) >= 18 and len(facts["vision"]) >= 8 and len(facts["audio"]) >= 11, facts
    # read through to_dict(): Gemma 4's text config refuses attribute access to per-layer fields such as head_dim
    subs = {"text": config.text_config.to_dict(), "vision": config.vision_config.to_dict(),
            "audio": config.audio_config.to_dict()}
    wrong = [f"{sub}.{key}: benchmark {field(subs[sub], key)!r}, published {value!r}"
             for sub, values in facts.items() for key, value in values.items() if field(subs[sub], key) != value]
    assert not wrong, "\n".join(wrong)
    assert config.audio_config.model_type == "gemma4_audio"


def test_benchmark_config_matches_the_published_values(config):
    from actionft import e4b

    for sub, published in (("text_config", e4b.PUBLISHED_TEXT), ("vision_config", e4b.PUBLISHED_VISION),
                           ("audio_config", e4b.PUBLISHED_AUDIO), (None, e4b.PUBLISHED_TOKEN_IDS)):
        part = (getattr(config, sub) if sub else config).to_dict()
        for key, value in published.items():
            assert field(part, key) == value, f"{sub or 'config'}.{key}: {field(part, key)!r} != {value!r}"


def test_benchmark_model_has_every_tower_with_attention_per_sub_model(bench):
    """Built on the meta device as the GPU run builds it: SDPA for text and vision, eager for the audio tower."""
    model = bench.build_e4b("meta")
    cfg = model.config
    assert cfg.text_config._attn_implementation == "sdpa"
    assert cfg.vision_config._attn_implementation == "sdpa"
    assert cfg.audio_config._attn_implementation == "eager"
    names = {name.split(".")[1] for name, _ in model.named_parameters() if name.startswith("model.")}
    assert {"language_model", "vision_tower", "audio_tower", "embed_vision", "embed_audio"} <= names
    # the synthetic inputs end the answer with the published `<turn|>` id
    assert bench.E4B_END_OF_TURN_ID in cfg.text_config.eos_token_id
