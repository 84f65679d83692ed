"""Model loading: a missing real model is a clear error that says how to get it; the packaged tiny model loads by
alias or by path and has a working vision tower."""

from __future__ import annotations

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
