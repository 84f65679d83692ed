"""One typed configuration: every parameter a params file, `--set` or a notebook's `parameters` cell may hold.

Params files stay flat (`lora_r: 16`); here each name belongs to one section (run, data, model, LoRA, training,
evaluation, prepare), with its type, its allowed range and its default. The defaults are the embedded run (the
packaged tiny Gemma 4 on the generated action dataset, minutes on a CPU); the reference run's values are in
`params/gemma4_e4b_kinetics3k.yaml` and nowhere else. `validate(params)` checks names, types and
ranges before any work and raises one `ActionftError` line per problem: the key, the value and what is allowed,
and for an unknown key the closest known one.
"""

from __future__ import annotations

import difflib
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from actionft.errors import ActionftError

SYNTH_FOLDER = "outputs/data/synth"  # where the generated action dataset is rendered by default
SOFT_TOKENS = Literal[70, 140, 280, 560, 1120]  # the budgets Gemma 4's image processor offers


class _Section(BaseModel):
    # unknown keys are refused; "2e-4" from the command line is still read as a number
    model_config = ConfigDict(extra="forbid", validate_default=True)


class RunSection(_Section):
    run_name: str = Field("tiny", min_length=1, pattern=r"^[^/\\]+$")  # a folder name under output_root
    output_root: str = "outputs"


class DataSection(_Section):
    # With no data_path, the generated action dataset (synth) is rendered into image_folder on first use, and
    # data_path / metadata_path default to its data.json / metadata.csv there. A data_path of your own needs its
    # image_folder (media paths in data_path are relative to it); synth then defaults to false.
    data_path: str | None = None
    image_folder: str | None = None
    metadata_path: str | None = None
    synth: bool | None = None
    # the generated dataset's settings (used when synth is true; see actionft.synth.generate_dataset)
    synth_clips_per_class: int = Field(60, ge=2)
    synth_val_per_class: int = Field(6, ge=0)
    synth_test_per_class: int = Field(10, ge=0)
    synth_seed: int = 0
    synth_frame_size: int = Field(192, ge=16)
    num_frames: int = Field(4, ge=1)
    max_soft_tokens: SOFT_TOKENS = 70
    video_max_soft_tokens: SOFT_TOKENS = 70
    split_seed: int = 0
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    max_train_samples: int | None = Field(None, ge=1)
    max_eval_samples: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _the_generated_dataset_by_default(self):
        if self.synth is None:
            self.synth = self.data_path is None
        if self.synth:
            self.image_folder = self.image_folder or SYNTH_FOLDER
            self.data_path = self.data_path or f"{self.image_folder}/data.json"
            if "metadata_path" not in self.model_fields_set:  # an explicit null stays null
                self.metadata_path = f"{self.image_folder}/metadata.csv"
        return self

    @model_validator(mode="after")
    def _room_for_training(self):
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError(f"val_fraction + test_fraction = {self.val_fraction + self.test_fraction:g} leaves no "
                             "clips for training; keep the sum below 1")
        if self.synth and self.synth_val_per_class + self.synth_test_per_class >= self.synth_clips_per_class:
            raise ValueError("synth_val_per_class + synth_test_per_class must stay below synth_clips_per_class")
        return self


class ModelSection(_Section):
    model_id: str = Field("tiny", min_length=1)
    # a string for text and vision (audio stays eager), or a mapping per sub-config (text_config, vision_config, ...)
    attn_implementation: str | dict[str, str] | None = "sdpa"
    bf16: bool = False  # the reference: true (bf16 weights and autocast on GPUs)
    # QLoRA: the language model's linear layers frozen in 4-bit NF4 (bitsandbytes), LoRA on top as usual
    load_in_4bit: bool = False
    padding_side: Literal["left", "right"] = "left"
    supervised_logits_only: bool = True


class LoraSection(_Section):
    use_lora: bool = True
    # the tiny model's hidden size is 64, so r=64 is full rank there (the reference: r=16, alpha 32)
    lora_r: int = Field(64, ge=1)
    lora_alpha: int | float = Field(128, gt=0)
    lora_dropout: float = Field(0.05, ge=0.0, lt=1.0)
    lora_target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        min_length=1)
    image_encoder_lr: float = Field(0.0, ge=0.0)
    projector_lr: float = Field(0.0, ge=0.0)


class TrainingSection(_Section):
    num_train_epochs: int | float = Field(10, gt=0)
    max_steps: int = Field(-1, ge=-1)  # -1 (or 0): run the epochs
    per_device_train_batch_size: int = Field(8, ge=1)
    per_device_eval_batch_size: int = Field(16, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(2e-3, ge=0.0)
    weight_decay: float = Field(0.0, ge=0.0)
    warmup_ratio: float = Field(0.03, ge=0.0, lt=1.0)
    lr_scheduler_type: str = "cosine"
    max_grad_norm: float = Field(1.0, ge=0.0)
    gradient_checkpointing: bool = False
    optim: str = "paged_adamw_8bit"
    save_strategy: Literal["no", "steps", "epoch", "best"] = "steps"
    save_steps: int = Field(100, ge=1)
    save_total_limit: int | None = Field(2, ge=1)
    logging_steps: int = Field(10, ge=1)
    eval_steps: int | None = Field(50, ge=1)
    dataloader_num_workers: int = Field(0, ge=0)
    # CPU memory per process for the frozen vision tower's outputs, reused from the second epoch on (0: recompute
    # every step); see actionft.vision_cache. The reference run's 12,460 frames take 4.6 GiB in bf16.
    vision_cache_gb: float = Field(8.0, ge=0.0)
    seed: int = 42
    deepspeed: str | None = "params/deepspeed/zero2.json"
    resume_from_checkpoint: str | bool | None = None  # a checkpoint folder, or "latest"
    # where the training logs go besides trainer_state.json: "tensorboard" (event files in <run>/tensorboard/),
    # "none", or a list of transformers' integrations (their packages must be installed)
    report_to: str | list[str] = "tensorboard"
    num_processes: int | None = Field(None, ge=1)  # what `--dry-run` plans for; None: the launcher's WORLD_SIZE

    @model_validator(mode="after")
    def _known_to_transformers(self):
        from transformers.trainer_utils import SchedulerType
        from transformers.training_args import OptimizerNames

        for key, names in (("optim", [o.value for o in OptimizerNames]),
                           ("lr_scheduler_type", [s.value for s in SchedulerType])):
            if getattr(self, key) not in names:
                close = difflib.get_close_matches(getattr(self, key), names, 3)
                raise ValueError(f"{key}={getattr(self, key)!r}: not one transformers knows"
                                 + (f" (closest: {', '.join(close)})" if close else ""))
        return self


class EvaluationSection(_Section):
    """Read by notebooks 05-06 and `actionft evaluate` (None: the notebook's own default)."""

    adapter_dir: str | None = None
    eval_split: Literal["train", "val", "test"] | None = None
    # the classes of closed-set evaluation: a class-list file or label CSV, or a list of them (see actionft.labels);
    # None: labels.csv beside the metadata, else the metadata's labels
    label_set: str | list[str] | None = None
    label_template: str | None = None
    max_new_tokens: int | None = Field(None, ge=1)
    semantic: bool | None = None
    n_examples: int | None = Field(None, ge=0)
    n_show: int | None = Field(None, ge=0)


class PrepareSection(_Section):
    """Read by notebooks 00 and 02-03 (None: the notebook's own default)."""

    video_dir: str | None = None
    annotations: str | None = None
    out_dir: str | None = None  # `actionft prepare --out`: the folder that receives the frame dataset
    question: str | None = Field(None, min_length=1)
    answer_template: str | None = Field(None, min_length=1)  # e.g. "The video shows {label}."
    overwrite: bool | None = None
    add_missing_clip: bool | None = None
    # S (short side S, centre crop SxS), "HxW" or [h, w]; 0 keeps the decoded size (actionft.frames.parse_size)
    size: int | str | list[int] | None = None
    jpeg_quality: int | None = Field(None, ge=1, le=100)
    workers: int | None = Field(None, ge=1)
    max_clips: int | None = Field(None, ge=0)
    max_mean_diff: float | None = Field(None, ge=0.0)
    video_data_path: str | None = None
    batch_size: int | None = Field(None, ge=1)
    n_checked: int | None = Field(None, ge=1)

    @field_validator("size")
    @classmethod
    def _a_frame_size(cls, value):
        if value is not None:
            from actionft.frames import parse_size

            try:
                parse_size(value)
            except ActionftError as exc:
                raise ValueError(str(exc)) from None
        return value


SECTIONS: dict[str, type[_Section]] = {
    "run": RunSection, "data": DataSection, "model": ModelSection, "lora": LoraSection,
    "training": TrainingSection, "evaluation": EvaluationSection, "prepare": PrepareSection,
}
# The sections training reads (train.resolve_config returns them flat).
TRAIN_SECTIONS = ("run", "data", "model", "lora", "training")
SECTION_OF = {name: section for section, cls in SECTIONS.items() for name in cls.model_fields}
KNOWN = sorted(SECTION_OF)


def defaults(sections: tuple[str, ...] = TRAIN_SECTIONS) -> dict[str, Any]:
    """The defaults of these sections, flat."""
    return {k: v for s in sections for k, v in SECTIONS[s]().model_dump().items()}


def _describe(err: dict[str, Any], section: str) -> str:
    key = ".".join(str(p) for p in err["loc"]) or section
    if err["type"] == "extra_forbidden":
        return unknown_hint(key)
    if not err["loc"]:  # a check across keys
        return err["msg"].removeprefix("Value error, ")
    return f"{key}={err['input']!r}: {err['msg'].removeprefix('Value error, ').lower()}"


def unknown_hint(key: str) -> str:
    close = difflib.get_close_matches(key, KNOWN, 1)
    return f"unknown parameter {key!r}" + (f" (did you mean {close[0]}?)" if close else "")


def validate(params: dict[str, Any], sections: tuple[str, ...] = tuple(SECTIONS)) -> dict[str, Any]:
    """`params` checked against the typed configuration; returns the sections' values, flat, defaults filled in.

    Raises ActionftError naming every bad key (unknown, wrong type, out of range) in one line each."""
    problems = [unknown_hint(k) for k in params if k not in SECTION_OF]
    out: dict[str, Any] = {}
    for section in sections:
        cls = SECTIONS[section]
        given = {k: v for k, v in params.items() if SECTION_OF.get(k) == section}
        try:
            out.update(cls(**given).model_dump())
        except ValidationError as exc:
            problems += [_describe(e, section) for e in exc.errors()]
    if problems:
        raise ActionftError("; ".join(problems) + " (the parameters and their ranges: lib/actionft/config.py)")
    return out
