"""Loading Gemma 4 (tiny or real) and its processor through one `from_pretrained` code path."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from actionft.errors import ActionftError
from actionft.paths import resolve_path

REAL_MODEL_ID = "google/gemma-4-e4b-it"
TINY_ALIAS = "tiny"
# The pretrained tiny base ships with the package (a few MB); `actionft tiny-base` regenerates it.
TINY_BASE_DIR = Path(__file__).parent / "assets" / "tiny-gemma4"


def resolve_model_id(model_id: str) -> str:
    """'tiny' -> the packaged tiny base; an existing folder -> itself; anything else is a hub id."""
    if model_id == TINY_ALIAS:
        if not (TINY_BASE_DIR / "config.json").is_file():
            raise ActionftError(
                f"the tiny base model is missing from {TINY_BASE_DIR}; rebuild it with "
                "`make tiny-base` (about an hour on 2 CPU cores)"
            )
        return str(TINY_BASE_DIR)
    local = resolve_path(model_id)
    if local is not None and local.exists():
        if not any((local / name).is_file() for name in ("config.json", "processor_config.json")):
            raise ActionftError(f"{local} exists but holds no config.json; point model_id at a model folder")
        return str(local)
    if model_id.startswith((".", "/", "~")) or model_id.count("/") > 1:
        raise ActionftError(f"model folder {model_id} does not exist")
    return model_id


def _missing_weights_error(model_id: str, err: Exception) -> ActionftError:
    local = resolve_path(model_id)
    if model_id != TINY_ALIAS and local is not None and local.is_dir():
        return ActionftError(
            f"cannot load the model folder {local}: {str(err).splitlines()[0] if str(err) else type(err).__name__}\n"
            "  A model folder needs the files `save_pretrained` writes for the model and its processor (config.json,"
            " the weights, processor_config.json or preprocessor_config.json, the tokenizer files); copy the whole"
            " downloaded folder."
        )
    cache = os.environ.get("HF_HUB_CACHE") or os.environ.get("HF_HOME") or "~/.cache/huggingface"
    return ActionftError(
        f"cannot load {model_id!r}: its files are not in the local Hugging Face cache ({cache}) and could not be "
        "downloaded" + (" (HF_HUB_OFFLINE=1 is set)" if os.environ.get("HF_HUB_OFFLINE") == "1" else "") + ".\n"
        "  To get them, on a machine with internet: accept the Gemma licence on huggingface.co, then\n"
        f"    hf auth login && hf download {model_id}\n"
        "  or copy a downloaded model folder here and set model_id to its path.\n"
        f"  ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
    )


def load_processor(model_id: str):
    """The model's processor (tokenizer, chat template, image and video processors)."""
    from transformers import AutoProcessor

    resolved = resolve_model_id(model_id)
    try:
        return AutoProcessor.from_pretrained(resolved)
    except OSError as err:
        raise _missing_weights_error(model_id, err) from None


def torch_dtype(bf16: bool) -> torch.dtype:
    return torch.bfloat16 if bf16 else torch.float32


SUB_MODELS = ("text_config", "vision_config", "audio_config")
# transformers 5.23 implements the audio tower's attention only eagerly ("Gemma4AudioModel does not support an
# attention implementation through torch.nn.functional.scaled_dot_product_attention yet").
AUDIO_ATTENTION = "eager"


def attn_implementation_for(value: str | dict | None, has_audio: bool) -> str | dict | None:
    """The `attn_implementation` argument for a checkpoint: per sub-model, so that a checkpoint with an audio tower
    (the published E4B, the packaged tiny base) loads with SDPA for text and vision.

    None: transformers chooses (SDPA where a sub-model has it, eager for the audio tower). A string applies to the text
    model and the vision tower, the audio tower stays eager. A mapping names sub-models (`text_config`,
    `vision_config`, `audio_config`); an audio tower it leaves out is eager.
    """
    if value in (None, ""):
        return None
    if isinstance(value, str):
        value = {"text_config": value, "vision_config": value}
    if not isinstance(value, dict) or set(value) - set(SUB_MODELS):
        raise ActionftError(f"attn_implementation must be a string (e.g. sdpa, eager) or a mapping with keys "
                            f"{', '.join(SUB_MODELS)}; got {value!r}")
    out = dict(value)
    if has_audio:
        out.setdefault("audio_config", AUDIO_ATTENTION)
    else:
        out.pop("audio_config", None)
    return out


# Under a 4-bit base (QLoRA) only the language model's linear layers are quantized: the towers and their projections
# into the text model stay as they are (frozen, and small next to the text layers), and so does the LM head (tied to
# the embeddings, which bitsandbytes never quantizes). Names as in Gemma4ForConditionalGeneration, matched from the
# start of a module's name.
NOT_QUANTIZED = ["model.vision_tower", "model.audio_tower", "model.embed_vision", "model.embed_audio", "lm_head"]


def quantization_config(bf16: bool):
    """QLoRA's 4-bit base: NF4 weights, double quantization of their scales, matmuls in bf16 (fp32 without bf16)."""
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                              bnb_4bit_compute_dtype=torch_dtype(bf16), llm_int8_skip_modules=NOT_QUANTIZED)


def load_model(model_id: str, bf16: bool = False, device: str | None = None,
               attn_implementation: str | dict | None = None, load_in_4bit: bool = False):
    """`Gemma4ForConditionalGeneration.from_pretrained` for the tiny or the real model, with a clear error.

    `attn_implementation`: see `attn_implementation_for` (a string means text and vision; audio stays eager).
    `load_in_4bit`: the language model's linear layers in NF4 (`quantization_config`), on `device` (default: this
    process's GPU, else the CPU).
    """
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    resolved = resolve_model_id(model_id)
    kwargs = {"dtype": torch_dtype(bf16)}
    if load_in_4bit:
        # quantized weights are placed while loading and cannot be moved with .to() afterwards
        local = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if torch.cuda.is_available() else "cpu"
        kwargs.update(quantization_config=quantization_config(bf16), device_map={"": device or local})
        device = None
    try:
        if attn_implementation:
            config = AutoConfig.from_pretrained(resolved)
            has_audio = getattr(config, "audio_config", None) is not None
            kwargs["attn_implementation"] = attn_implementation_for(attn_implementation, has_audio)
        model = Gemma4ForConditionalGeneration.from_pretrained(resolved, **kwargs)
    except OSError as err:
        raise _missing_weights_error(model_id, err) from None
    if load_in_4bit and not torch.cuda.is_available():
        _generic_cpu_4bit_path(model)
    if device:
        model.to(device)
    return model


def _generic_cpu_4bit_path(model) -> None:
    """bitsandbytes 0.50's CPU fast path (CPUs with AVX512-BF16, eval mode, no grad) repacks a 4-bit weight in
    blocks of 32 output rows and asserts on any other height, such as the tiny model's 16-row per-layer-input gates;
    it would also rewrite the weights in place in the middle of training (the Trainer's evaluation). The generic
    path computes the same product for every shape, so CPU runs keep to it. GPUs never take that path."""
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"
