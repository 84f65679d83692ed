"""Model loading: a missing real model is a clear error that says how to get it; the packaged tiny model loads by
alias or by path and has a working vision tower."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from actionft.errors import ActionftError
from actionft.modeling import REAL_MODEL_ID, TINY_BASE_DIR, load_model, load_processor, resolve_model_id

ROOT = Path(__file__).parents[1]


@pytest.fixture
def empty_hf_cache(tmp_path, monkeypatch):
    """Offline, with an empty Hugging Face cache. huggingface_hub reads its env at import, so patch it too."""
    import huggingface_hub.constants as hub

    home = tmp_path / "hf_home"
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "HF_HOME", str(home))
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(home / "hub"))
    monkeypatch.setattr(hub, "HUGGINGFACE_HUB_CACHE", str(home / "hub"))
    return home


@pytest.mark.parametrize("loader", [load_model, load_processor], ids=lambda f: f.__name__)
def test_missing_real_model_says_how_to_get_it(empty_hf_cache, loader):
    with pytest.raises(ActionftError) as err:
        loader(REAL_MODEL_ID)
    message = str(err.value)
    assert REAL_MODEL_ID in message
    assert f"hf download {REAL_MODEL_ID}" in message  # the fix
    assert "licence" in message and "model_id" in message  # the licence step and the local-folder alternative
    assert str(empty_hf_cache) in message and "HF_HUB_OFFLINE=1" in message  # where it looked, and why not online
    assert not (empty_hf_cache / "hub" / "models--google--gemma-4-e4b-it" / "blobs").exists()


@pytest.fixture(scope="module")
def tiny_model():
    return load_model("tiny").eval()


def test_tiny_model_has_vision_tower(tiny_model):
    assert type(tiny_model).__name__ == "Gemma4ForConditionalGeneration"
    tower = tiny_model.model.vision_tower
    assert tower is not None and sum(p.numel() for p in tower.parameters()) > 0
    assert tiny_model.config.vision_config is not None
    assert tiny_model.dtype == torch.float32


def test_tiny_model_sees_the_frames(tiny_model, processor, synth_samples):
    """A forward pass on a collated batch gives a finite loss, and the logits depend on the pixels."""
    from actionft.collate import Collator

    batch = Collator(processor, max_soft_tokens=70)(synth_samples[:1])
    with torch.no_grad():
        out = tiny_model(**batch)
        blank = tiny_model(**{**batch, "pixel_values": torch.zeros_like(batch["pixel_values"])})
    assert out.logits.shape[:2] == batch["input_ids"].shape
    assert torch.isfinite(out.loss)
    assert not torch.allclose(out.logits[0, -1], blank.logits[0, -1])


# Structure flags the tiny stand-in must share with google/gemma-4-e4b-it (sizes differ, these do not).
SHARED_FLAGS = {
    "text_config": ("use_bidirectional_attention", "use_double_wide_mlp", "attention_k_eq_v", "enable_moe_block",
                    "final_logit_softcapping", "tie_word_embeddings", "sliding_window", "hidden_activation",
                    "rope_parameters"),
    "vision_config": ("use_clipped_linears", "standardize", "hidden_activation"),
    "audio_config": ("use_clipped_linears", "conv_kernel_size", "attention_chunk_size", "attention_context_left",
                     "attention_context_right", "attention_logit_cap", "residual_weight", "rms_norm_eps",
                     "hidden_act"),
}


def test_tiny_base_has_the_published_structure(tiny_model):
    """Same sub-models (text, vision and audio towers and their projectors) and the same flags as the published
    checkpoint, with every kind of text layer (sliding, full, K/V-shared) and per-layer inputs."""
    from actionft.e4b import e4b_config

    published = e4b_config()
    assert published.text_config.use_bidirectional_attention is None  # the release's value for E2B/E4B
    for sub, flags in SHARED_FLAGS.items():
        tiny_sub, real_sub = getattr(tiny_model.config, sub), getattr(published, sub)
        differ = {f: (getattr(tiny_sub, f), getattr(real_sub, f)) for f in flags
                  if getattr(tiny_sub, f) != getattr(real_sub, f)}
        assert not differ, f"{sub}: tiny (left) vs published (right): {differ}"
    for module in ("language_model", "vision_tower", "embed_vision", "audio_tower", "embed_audio"):
        assert sum(p.numel() for p in getattr(tiny_model.model, module).parameters()) > 0, module
    text = tiny_model.config.text_config
    assert set(text.layer_types) == {"sliding_attention", "full_attention"}
    assert 0 < text.num_kv_shared_layers < text.num_hidden_layers and text.hidden_size_per_layer_input > 0


def test_audio_tower_needs_per_sub_model_attention():
    """transformers has no SDPA path for the audio tower: one `sdpa` for every sub-model refuses the checkpoint,
    the per-sub-model choice loads it with SDPA for text and vision."""
    from transformers import Gemma4ForConditionalGeneration

    from actionft.modeling import attn_implementation_for
    from actionft.params import load_params

    with pytest.raises(ValueError, match="Gemma4AudioModel"):
        Gemma4ForConditionalGeneration.from_pretrained(TINY_BASE_DIR, attn_implementation="sdpa")
    for value in ("sdpa", load_params(ROOT / "params" / "gemma4_e4b_kinetics3k.yaml")["attn_implementation"]):
        cfg = load_model("tiny", attn_implementation=value).config
        assert (cfg.text_config._attn_implementation, cfg.vision_config._attn_implementation,
                cfg.audio_config._attn_implementation) == ("sdpa", "sdpa", "eager")
    assert attn_implementation_for("sdpa", has_audio=False) == {"text_config": "sdpa", "vision_config": "sdpa"}
    assert attn_implementation_for(None, has_audio=True) is None
    with pytest.raises(ActionftError, match="attn_implementation"):
        attn_implementation_for({"text": "sdpa"}, has_audio=True)


def test_processor_at_the_published_settings_gives_256_soft_tokens_per_frame():
    """Patch 16, pooling 3, 280 soft tokens: a 336x336 Kinetics-3K frame becomes 256 soft tokens (48x48 patches
    pooled 3x3), as with the real processor; the tiny one (patch 12, pooling 2) is sized for the tiny tower."""
    from actionft.collate import soft_tokens_per_image
    from actionft.e4b import standin_processor

    processor = standin_processor()
    assert (processor.image_processor.patch_size, processor.image_processor.pooling_kernel_size) == (16, 3)
    assert soft_tokens_per_image(processor, 336, 336, 280) == 256
    assert soft_tokens_per_image(processor, 336, 336, 70) == 64


@pytest.mark.parametrize("model_id", [str(TINY_BASE_DIR), str(TINY_BASE_DIR.relative_to(ROOT))],
                         ids=["absolute", "relative-to-repo"])
def test_model_id_as_local_path(tiny_model, model_id):
    assert Path(resolve_model_id(model_id)).resolve() == TINY_BASE_DIR.resolve()
    model = load_model(model_id)
    assert type(model) is type(tiny_model)
    state, reference = model.state_dict(), tiny_model.state_dict()
    assert state.keys() == reference.keys()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_processor_from_local_path(processor):
    local = load_processor(str(TINY_BASE_DIR))
    assert local.tokenizer.get_vocab() == processor.tokenizer.get_vocab()
    assert local.chat_template == processor.chat_template


def test_bad_local_model_ids(tmp_path):
    with pytest.raises(ActionftError, match="does not exist"):
        resolve_model_id(str(tmp_path / "no_such_model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ActionftError, match="no config.json"):
        resolve_model_id(str(tmp_path / "empty"))
    assert resolve_model_id(REAL_MODEL_ID) == REAL_MODEL_ID  # a hub id passes through untouched


@pytest.mark.parametrize("with_adapter", [False, True], ids=["base", "adapter-loaded-for-inference"])
def test_training_signal_checks_agree(tmp_path, processor, synth_samples, with_adapter):
    """Notebook 06's loss sanity table: every check holds on the base and on an adapter loaded for inference
    (nothing requires grad there, yet the checkpointing check needs a backward pass)."""
    from peft import LoraConfig, get_peft_model

    from actionft.evaluate import training_signal_checks
    from actionft.infer import load_for_inference
    from actionft.train import lora_target_regex

    if with_adapter:
        config = LoraConfig(r=4, lora_alpha=8, target_modules=lora_target_regex(["q_proj", "v_proj"]),
                            init_lora_weights=False)
        lora = get_peft_model(load_model("tiny"), config)
        lora.save_pretrained(tmp_path / "adapter")
        model, _ = load_for_inference("tiny", tmp_path / "adapter", device="cpu")
        assert not any(p.requires_grad for p in model.parameters())
    else:
        model = load_model("tiny").eval()
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    rows = training_signal_checks(model, processor, synth_samples[:3], max_soft_tokens=70)
    assert len(rows) == 5 and all(r["ok"] for r in rows), rows
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags  # grad flags restored
    assert all(p.grad is None for p in model.parameters())
    assert not getattr(model, "is_activation_checkpointing", False)


def test_tiny_base_rebuild_has_the_packaged_structure(tmp_path):
    """`actionft tiny-base` (what `make tiny-base` runs) builds and trains a model whose config is the packaged
    base's, audio tower included; the audio tower, which no pretraining task feeds, stays as initialised."""
    from safetensors.torch import load_file

    from actionft.pretrain import corpus, pretrain_tiny_base
    from actionft.tiny import build_tiny_model

    out = tmp_path / "tiny"
    summary = pretrain_tiny_base(out, steps=2, batch_size=2, warmup_steps=1, eval_every=0, progress=False,
                                 frame_size=48)
    assert summary["steps"] == 2

    def structure(folder):
        config = json.loads((folder / "config.json").read_text())
        for sub in (config, config["text_config"], config["vision_config"], config["audio_config"]):
            for volatile in ("dtype", "transformers_version"):
                sub.pop(volatile, None)
        return config

    assert structure(out) == structure(TINY_BASE_DIR)
    trained = load_model(str(out))
    assert trained.model.audio_tower is not None
    weights = load_file(str(out / "model.safetensors"))
    assert set(weights) == set(load_file(str(TINY_BASE_DIR / "model.safetensors")))
    initial = load_file(str(build_tiny_model(tmp_path / "initial", corpus(), seed=0) / "model.safetensors"))
    audio = [k for k in weights if ".audio_tower." in k or ".embed_audio." in k]
    assert audio and all(torch.equal(weights[k], initial[k]) for k in audio)
    assert not torch.equal(weights["model.language_model.norm.weight"], initial["model.language_model.norm.weight"])


def test_incomplete_local_folder_names_what_is_missing(tmp_path):
    """A folder with the model's config but no processor files is not a cache problem: say what the folder lacks."""
    import shutil

    folder = tmp_path / "model"
    folder.mkdir()
    shutil.copy(TINY_BASE_DIR / "config.json", folder / "config.json")
    with pytest.raises(ActionftError) as err:
        load_processor(str(folder))
    message = str(err.value)
    assert str(folder) in message and "processor_config.json" in message
    assert "hf download" not in message and "Hugging Face cache" not in message
