"""LoRA fine-tuning with the HF Trainer, peft and DeepSpeed, driven by one flat params dict.

Every hyperparameter of the reference run is a parameter here with the same name and meaning (see
`params/gemma4_e4b_kinetics3k.yaml`). What this adds over the reference training code:

- the logged loss is the mean cross-entropy per supervised token over the whole accumulated batch (the reference
  logged 14.45, most likely its per-token loss times the 8 accumulation steps);
- the LM head (and Gemma 4's K/V-sharing layers) only run on the positions that are supervised;
- per-module learning rates for the vision tower and the projector, held-out validation loss, samples/s in the logs.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import socket
import time
from pathlib import Path
from typing import Any

import torch

from actionft import config
from actionft.errors import ActionftError, ResourceError, os_error, writable_folder
from actionft.paths import resolve_path

# Every parameter's type, range and default: actionft.config (one section per concern). Defaults = the embedded run
# (tiny model, generated data); the reference run's values: params/gemma4_e4b_kinetics3k.yaml.
DEFAULTS: dict[str, Any] = config.defaults()

# Parameters that only notebooks 00 and 02-06 (or `actionft prepare` / `evaluate`) read; a params file may hold them,
# training ignores them. A test keeps them in step with the notebooks' `parameters` cells.
OTHER_KEYS = frozenset(config.defaults(("evaluation", "prepare")))

# Modules of Gemma4ForConditionalGeneration that LoRA never touches (towers and their projections into text).
NON_TEXT_MODULES = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def resolve_config(params: dict[str, Any]) -> dict[str, Any]:
    """Defaults + params: names, types and ranges checked (actionft.config), then the checks across keys."""
    cfg = {k: v for k, v in config.validate(params).items() if k in DEFAULTS}  # types and ranges checked
    check_across(cfg)
    return cfg


def check_across(cfg: dict[str, Any], needs_data: bool = True) -> None:
    """The checks across keys of a validated configuration (`needs_data`: the run reads a dataset, so one must be
    named)."""
    if needs_data and cfg["data_path"] is None and not cfg["synth"]:
        raise ActionftError("set data_path and image_folder (or synth: true for the generated dataset)")
    if cfg["load_in_4bit"]:
        check_quantized(cfg)
    reporters = report_targets(cfg)
    if "none" in reporters and len(reporters) > 1:
        raise ActionftError(f"report_to: 'none' cannot be combined with {reporters}; choose one or the other")


def check_quantized(cfg: dict[str, Any]) -> None:
    """A 4-bit base trains adapters only, and its packed weights cannot be sharded by ZeRO-3."""

    if not cfg["use_lora"]:
        raise ActionftError("load_in_4bit: true needs use_lora: true (4-bit weights cannot be trained; "
                            "QLoRA trains LoRA adapters on a frozen 4-bit base)")
    if cfg["deepspeed"]:
        path = resolve_path(cfg["deepspeed"])
        try:
            stage = json.loads(path.read_text()).get("zero_optimization", {}).get("stage", 0)
        except (OSError, ValueError) as exc:
            raise ActionftError(f"DeepSpeed config {path}: cannot read it ({exc})") from None
        if stage == 3:
            raise ActionftError(f"load_in_4bit: true with ZeRO-3 ({path}): DeepSpeed cannot shard bitsandbytes' "
                                "packed 4-bit weights; use params/deepspeed/zero2.json or deepspeed: null")


def report_targets(cfg: dict[str, Any]) -> list[str]:
    """`report_to` as a list ("none" for none)."""
    value = cfg["report_to"]
    targets = [value] if isinstance(value, str) else list(value or ["none"])
    if not all(isinstance(t, str) and t for t in targets):
        raise ActionftError(f"report_to must be a name or a list of names (e.g. tensorboard, none), got {value!r}")
    return targets


def tensorboard_callbacks(cfg: dict[str, Any], out: Path) -> list:
    """The TensorBoard writer, pointed at <run>/tensorboard/ (the Trainer's own default is a dated folder under
    the checkpoints, which a resumed run would split in two)."""
    if "tensorboard" not in report_targets(cfg):
        return []
    from transformers.integrations import TensorBoardCallback

    callback = TensorBoardCallback()
    callback.logging_dir = str(out / "tensorboard")
    return [callback]


# Settings that may change between a run and its resumption: they do not change what the run computes.
RUN_FREE_KEYS = frozenset({
    "resume_from_checkpoint", "num_processes", "dataloader_num_workers", "logging_steps", "per_device_eval_batch_size",
    "eval_steps", "save_strategy", "save_steps", "save_total_limit", "max_eval_samples", "output_root", "report_to",
})
_PATH_KEYS = ("data_path", "image_folder", "metadata_path", "deepspeed")


def _run_identity(cfg: dict[str, Any]) -> dict[str, Any]:
    """The settings that make a run what it is, paths resolved and JSON-normalised (tuples -> lists)."""

    out = {k: v for k, v in cfg.items() if k not in RUN_FREE_KEYS}
    for key in _PATH_KEYS:
        if out.get(key):
            out[key] = str(resolve_path(out[key]))
    return json.loads(json.dumps(out, default=str))


def check_run_folder(cfg: dict[str, Any], out: Path) -> None:
    """Bind a run folder to its configuration: refuse a run whose settings differ from those recorded in
    `train_config.json` (a different run would mix its checkpoints, adapter and log with the old one's)."""
    recorded = out / "train_config.json"
    if not recorded.is_file():
        return
    try:
        old = json.loads(recorded.read_text(encoding="utf-8"))
        if not isinstance(old, dict):
            raise ValueError("not a mapping")
    except (OSError, ValueError) as err:
        raise ActionftError(f"{recorded} cannot be read ({err}); this run folder is damaged: set another run_name "
                            f"or delete {out} to start over") from None
    old_id, new_id = _run_identity(old), _run_identity(cfg)
    changed = [k for k in new_id if k in old_id and old_id[k] != new_id[k]]
    if changed:
        shown = ", ".join(f"{k} {old_id[k]!r} -> {new_id[k]!r}" for k in changed[:3])
        more = f" and {len(changed) - 3} more" if len(changed) > 3 else ""
        raise ActionftError(
            f"run folder {out} holds a run with other settings ({shown}{more}); a run folder belongs to one "
            f"configuration: set another run_name (e.g. --set run_name=...) or delete {out} to start over"
        )


def run_dir(cfg: dict[str, Any]) -> Path:

    return resolve_path(cfg["output_root"]) / cfg["run_name"]


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def optimizer_steps(n_samples: int, cfg: dict[str, Any], n_processes: int | None = None) -> int:
    """Optimizer steps the Trainer will take: ceil(batches per epoch / accumulation) per epoch."""
    if cfg["max_steps"] and cfg["max_steps"] > 0:
        return int(cfg["max_steps"])
    n_processes = n_processes or world_size()
    batches = math.ceil(n_samples / (cfg["per_device_train_batch_size"] * n_processes))
    return math.ceil(batches / cfg["gradient_accumulation_steps"]) * math.ceil(cfg["num_train_epochs"])


def effective_batch(cfg: dict[str, Any], n_processes: int | None = None) -> int:
    return cfg["per_device_train_batch_size"] * cfg["gradient_accumulation_steps"] * (n_processes or world_size())


# -- data -----------------------------------------------------------------------------------------------------
def load_splits(cfg: dict[str, Any], check_files: bool = True, progress: bool = True) -> dict[str, list]:
    """Train/val/test samples of the configured dataset (generating the synthetic one if asked to)."""
    from actionft.data import load_dataset, select_split

    ensure_data(cfg)
    samples = load_dataset(
        resolve_path(cfg["data_path"]), resolve_path(cfg["image_folder"]), resolve_path(cfg["metadata_path"]),
        num_frames=cfg["num_frames"], check_files=check_files, split_seed=cfg["split_seed"],
        val_fraction=cfg["val_fraction"], test_fraction=cfg["test_fraction"], progress=progress,
    )
    splits = {name: select_split(samples, name) for name in ("train", "val", "test")}
    if cfg["max_train_samples"]:
        splits["train"] = splits["train"][: cfg["max_train_samples"]]
    if cfg["max_eval_samples"]:
        splits["val"] = splits["val"][: cfg["max_eval_samples"]]
    return splits


def ensure_data(cfg: dict[str, Any]) -> None:
    """For `synth: true`, render the generated dataset into `image_folder` unless it is already there."""
    if not cfg.get("synth"):
        return
    from actionft.synth import ensure_dataset, settings

    folder = resolve_path(cfg["image_folder"])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_dataset(folder, **settings(cfg))
        return
    # other processes of a multi-process launch wait for the first one to render it
    deadline = time.time() + 900
    while not (folder / "summary.json").is_file() or not (folder / "data.json").is_file():
        if time.time() > deadline:
            raise ActionftError(f"timed out waiting for local rank 0 to generate the dataset in {folder}")
        time.sleep(2)


class SampleDataset(torch.utils.data.Dataset):
    def __init__(self, samples):
        self.samples = list(samples)

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, i):
        return self.samples[i]


# -- model ----------------------------------------------------------------------------------------------------
def lora_target_regex(targets: list[str]) -> str:
    """Only the text decoder's projections: the vision tower's wrapped linears must stay out of LoRA."""
    return r".*language_model.*\.(" + "|".join(targets) + r")$"


def build_model(cfg: dict[str, Any], model=None):
    """Load the base model, attach LoRA to the text layers and freeze/unfreeze the towers per their lr."""
    from peft import LoraConfig, get_peft_model

    from actionft.modeling import load_model

    if model is None:
        model = load_model(cfg["model_id"], bf16=cfg["bf16"], attn_implementation=cfg["attn_implementation"],
                           load_in_4bit=cfg["load_in_4bit"])
    model.config.use_cache = False
    if cfg["load_in_4bit"]:
        # peft's prepare_model_for_kbit_training, less its upcast of every non-4-bit weight to fp32: for E4B that
        # would turn the 3.5 B embedding and per-layer-input parameters into 13 GiB. What remains: freeze the base
        # (get_peft_model does) and let gradients reach checkpointed blocks (below); the Trainer enables
        # checkpointing itself.
        for p in model.parameters():
            p.requires_grad_(False)
    if not cfg["use_lora"]:  # every text weight trains; a tower only at a positive lr, audio never
        lr_of = {"vision_tower": cfg["image_encoder_lr"], "embed_vision": cfg["projector_lr"]}
        for name, p in model.named_parameters():
            mod = module_of(name)
            p.requires_grad_(mod not in NON_TEXT_MODULES or lr_of.get(mod, 0.0) > 0)
        return model
    modules_to_save = []
    if cfg["image_encoder_lr"] > 0:
        modules_to_save.append("vision_tower")
    if cfg["projector_lr"] > 0:
        modules_to_save.append("embed_vision")
    lora = LoraConfig(
        r=cfg["lora_r"], lora_alpha=cfg["lora_alpha"], lora_dropout=cfg["lora_dropout"],
        target_modules=lora_target_regex(cfg["lora_target_modules"]), modules_to_save=modules_to_save or None,
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, lora)
    if cfg["gradient_checkpointing"] or cfg["load_in_4bit"]:
        # Frozen embeddings give checkpointed blocks inputs without grad; this keeps LoRA gradients flowing.
        model.enable_input_require_grads()
    return model


def module_of(name: str) -> str:
    for mod in NON_TEXT_MODULES:
        if f".{mod}." in f".{name}":
            return mod
    if "lora_" in name:
        return "language_model (LoRA)"
    return "language_model"


def trainable_parameters(model) -> dict[str, dict[str, int]]:
    """{module: {"trainable": n, "total": n}} for the text model, the towers and the projectors."""
    out: dict[str, dict[str, int]] = {}
    for name, p in model.named_parameters():
        if ".original_module." in name:  # peft's frozen copy of a module in modules_to_save
            continue
        entry = out.setdefault(module_of(name), {"trainable": 0, "total": 0})
        entry["total"] += p.numel()
        if p.requires_grad:
            entry["trainable"] += p.numel()
    return out


def parameter_groups(model, cfg: dict[str, Any]) -> list[dict]:
    """Optimizer groups: LoRA at `learning_rate`, the vision tower and the projector at their own rates."""
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        mod = module_of(name)
        lr = {"vision_tower": cfg["image_encoder_lr"], "embed_vision": cfg["projector_lr"]}.get(mod, cfg["learning_rate"])
        decay = cfg["weight_decay"] if p.ndim >= 2 else 0.0
        key = f"{mod}|{decay}"
        groups.setdefault(key, {"params": [], "lr": lr, "weight_decay": decay, "name": mod})["params"].append(p)
    # The Trainer logs the learning rate of group 0: keep a group at `learning_rate` first, the towers after it.
    return sorted(groups.values(), key=lambda g: g["name"] in ("vision_tower", "embed_vision"))


# -- loss -----------------------------------------------------------------------------------------------------
def supervised_loss(model, inputs: dict, num_items_in_batch=None, logits_only_where_supervised: bool = True):
    """Sum of cross-entropy over supervised tokens / number of supervised tokens in the whole accumulated batch.

    With `logits_only_where_supervised`, the model is asked for logits of the last K positions only (K reaches back
    to the first supervised token of the batch): the LM head and Gemma 4's K/V-sharing layers skip the prompt.
    Returns (loss, n_supervised_tokens_in_this_micro_batch).
    """
    labels = inputs["labels"]
    model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
    supervised = labels[:, 1:] != -100
    n_tokens = supervised.sum()
    length = labels.shape[1]
    keep = 0
    if logits_only_where_supervised and n_tokens > 0:
        first = int(supervised.any(0).nonzero()[0]) + 1  # first supervised label position in the batch
        keep = length - first + 1
    outputs = model(**model_inputs, logits_to_keep=keep, use_cache=False)
    from actionft.likelihood import sequence_log_likelihood

    loss_sum = -sequence_log_likelihood(outputs.logits, labels).sum()
    denom = num_items_in_batch if num_items_in_batch is not None else n_tokens.clamp(min=1)
    if torch.is_tensor(denom):
        denom = denom.to(loss_sum.device)
    return loss_sum / denom, n_tokens


def make_trainer_class():
    from transformers import Trainer

    class ActionTrainer(Trainer):
        """Trainer with the per-token loss, per-module learning rates and samples/s in the log history."""

        loss_is_scaled_for_ga = True  # our loss is already divided by the tokens of the whole accumulated batch

        def __init__(self, *args, cfg: dict[str, Any], **kwargs):
            self.cfg = cfg
            super().__init__(*args, **kwargs)
            # Gemma 4 declares it takes no loss kwargs; we compute the loss ourselves and need the token count.
            self.model_accepts_loss_kwargs = True
            self._last_log = None

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            loss, _ = supervised_loss(model, inputs, num_items_in_batch, self.cfg["supervised_logits_only"])
            if (
                num_items_in_batch is not None
                and self.args.average_tokens_across_devices
                and self.accelerator.num_processes > 1
            ):
                # Gradients are averaged over processes but the denominator already counts every process's tokens.
                loss = loss * self.accelerator.num_processes
            return (loss, {}) if return_outputs else loss

        def create_optimizer(self, model=None):
            if self.optimizer is None:
                from transformers import Trainer as _T

                optimizer_cls, optimizer_kwargs = _T.get_optimizer_cls_and_kwargs(self.args, self.model)
                optimizer_kwargs.pop("lr", None)
                self.optimizer = optimizer_cls(parameter_groups(self.model, self.cfg), **optimizer_kwargs)
            return self.optimizer

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                now, step = time.time(), self.state.global_step
                if self._last_log is not None and step > self._last_log[1]:
                    seconds = now - self._last_log[0]
                    samples = (step - self._last_log[1]) * effective_batch(self.cfg, self.args.world_size)
                    logs["samples_per_s"] = round(samples / seconds, 3)
                self._last_log = (now, step)
            super().log(logs, start_time)

        def _inner_training_loop(self, *args, **kwargs):
            self._last_log = (time.time(), self.state.global_step)
            return super()._inner_training_loop(*args, **kwargs)

    return ActionTrainer


# -- DeepSpeed ------------------------------------------------------------------------------------------------
def ensure_distributed_env() -> None:
    """DeepSpeed wants a process group; in a notebook or plain python, set up a world of one."""
    if "RANK" in os.environ:
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0", "LOCAL_RANK": "0",
                       "WORLD_SIZE": "1"})


def skip_deepspeed_shm_op() -> None:
    """On a CPU, DeepSpeed compiles its shared-memory all-reduce op (`deepspeed_shm_comm`) when its first process
    group starts: 45 s on 2 cores, and again in every new environment. The op only speeds up all-reduce between
    processes on the CPUs of one machine (GPUs use NCCL); marked unavailable, DeepSpeed reduces through gloo."""
    if torch.cuda.is_available():
        return
    try:
        import deepspeed.ops
    except ImportError:
        return
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def training_arguments(cfg: dict[str, Any], out: Path, n_eval: int):
    from transformers import TrainingArguments


    on_gpu = torch.cuda.is_available()
    ds = None
    if cfg["deepspeed"]:
        ds = resolve_path(cfg["deepspeed"])
        if not ds.is_file():
            raise ActionftError(f"DeepSpeed config {ds} does not exist (set deepspeed: null to train without it)")
        ensure_distributed_env()
        from actionft import quiet

        quiet.probe_deepspeed_ops()  # before the Trainer: keeps DeepSpeed's libaio link test out of notebooks
        skip_deepspeed_shm_op()
    eval_steps = cfg["eval_steps"] or cfg["save_steps"]
    return TrainingArguments(
        output_dir=str(out / "checkpoints"),
        run_name=cfg["run_name"],
        num_train_epochs=cfg["num_train_epochs"],
        max_steps=cfg["max_steps"] if cfg["max_steps"] else -1,
        per_device_train_batch_size=cfg["per_device_train_batch_size"],
        per_device_eval_batch_size=cfg["per_device_eval_batch_size"],
        gradient_accumulation_steps=cfg["gradient_accumulation_steps"],
        learning_rate=cfg["learning_rate"],
        weight_decay=cfg["weight_decay"],
        warmup_steps=float(cfg["warmup_ratio"]),  # transformers 5: a float below 1 is the warmup ratio
        lr_scheduler_type=cfg["lr_scheduler_type"],
        max_grad_norm=cfg["max_grad_norm"],
        # transformers 5 renamed gradient_checkpointing* (the reference's name, kept in params) to activation_*
        activation_checkpointing=cfg["gradient_checkpointing"],
        activation_checkpointing_kwargs={"use_reentrant": False} if cfg["gradient_checkpointing"] else None,
        bf16=cfg["bf16"],
        use_cpu=not on_gpu,
        optim=cfg["optim"],
        save_strategy=cfg["save_strategy"],
        save_steps=cfg["save_steps"],
        save_total_limit=cfg["save_total_limit"],
        logging_steps=cfg["logging_steps"],
        eval_strategy="steps" if n_eval else "no",
        eval_steps=eval_steps if n_eval else None,
        dataloader_num_workers=cfg["dataloader_num_workers"],
        seed=cfg["seed"],
        deepspeed=str(ds) if ds else None,
        # TensorBoard is added as a callback with its own folder (tensorboard_callbacks)
        report_to=[t for t in report_targets(cfg) if t not in ("tensorboard", "none")] or "none",
        remove_unused_columns=False,
        prediction_loss_only=True,
        disable_tqdm=False,
        save_only_model=False,
    )


# -- the whole run --------------------------------------------------------------------------------------------
def prepare(params: dict[str, Any], model=None, progress: bool = True):
    """Everything up to the first step: config, splits, processor, LoRA model, collator and Trainer.

    Returns (trainer, info); `fit(trainer, info)` trains. Notebook 04 looks at the model in between.
    """
    from transformers import set_seed

    from actionft.collate import Collator
    from actionft.modeling import load_processor

    cfg = resolve_config(params)
    out = run_dir(cfg)
    # Everything a user can get wrong is checked before the model loads.
    check_run_folder(cfg, out)
    writable_folder(out, "run folder")
    resume = resolve_resume(cfg, out)
    if int(os.environ.get("RANK", "0")) == 0:
        if resume is None:
            set_aside_checkpoints(out)
        try:  # replaced in one step: other processes of a launch read it in check_run_folder
            tmp = out / f".train_config.json.tmp-{os.getpid()}"
            tmp.write_text(json.dumps(cfg, indent=1))
            os.replace(tmp, out / "train_config.json")
        except OSError as err:
            raise os_error(err, "cannot write the run's configuration") from None
    set_seed(cfg["seed"])
    splits = load_splits(cfg, progress=progress)
    if not splits["train"]:
        raise ActionftError("the training split is empty; check the split fractions and the metadata")
    check_run_data(cfg, out, resume)
    processor = load_processor(cfg["model_id"])
    model = build_model(cfg, model)
    collator = Collator(
        processor, max_soft_tokens=cfg["max_soft_tokens"], num_frames=cfg["num_frames"],
        video_max_soft_tokens=cfg["video_max_soft_tokens"], padding_side=cfg["padding_side"],
    )
    args = training_arguments(cfg, out, len(splits["val"]))
    trainer = make_trainer_class()(
        model=model, args=args, data_collator=collator, train_dataset=SampleDataset(splits["train"]),
        eval_dataset=SampleDataset(splits["val"]) if splits["val"] else None, cfg=cfg,
        callbacks=tensorboard_callbacks(cfg, out),
    )
    from transformers.integrations import is_deepspeed_zero3_enabled

    from actionft import vision_cache

    cache, line = vision_cache.install(model, cfg, zero3=is_deepspeed_zero3_enabled())
    if int(os.environ.get("RANK", "0")) == 0:
        print(line)
    info = {"cfg": cfg, "run_dir": out, "splits": splits, "processor": processor, "resume": resume,
            "vision_cache": cache}
    return trainer, info


RUN_DATA = "run_data.json"  # fingerprints of the dataset files a run started on


def _data_fingerprint(cfg: dict[str, Any]) -> dict[str, str | None]:
    import hashlib


    out = {}
    for key in ("data_path", "metadata_path"):
        path = resolve_path(cfg.get(key))
        out[key] = hashlib.sha256(path.read_bytes()).hexdigest() if path and path.is_file() else None
    return out


def check_run_data(cfg: dict[str, Any], out: Path, resume: str | None) -> None:
    """A resumed run must see the data it started on: the same paths with other contents (a dataset prepared again,
    say) are refused; a fresh start records the fingerprints (sha256) in run_data.json."""
    recorded = out / RUN_DATA
    now = _data_fingerprint(cfg)
    if resume is not None and recorded.is_file():
        try:
            then = json.loads(recorded.read_text())
        except (OSError, ValueError):
            then = {}
        changed = [k for k, v in now.items() if then.get(k) not in (None, v)]
        if changed:
            files = ", ".join(str(cfg[k]) for k in changed)
            raise ActionftError(
                f"cannot resume {out}: {files} changed since the run started; resume with the data it started on, "
                f"or start over (leave resume_from_checkpoint unset) or use another run_name")
    if int(os.environ.get("RANK", "0")) == 0 and (resume is None or not recorded.is_file()):
        try:
            recorded.write_text(json.dumps(now, indent=1))
        except OSError as err:
            raise os_error(err, "cannot write") from None


def resolve_resume(cfg: dict[str, Any], out: Path) -> str | None:
    """The checkpoint folder to resume from (None: a fresh start); raises before any model loads when it is missing.

    `latest` (or true) is the newest complete checkpoint in this run folder, which `check_run_folder` has bound to
    this configuration; a path must be a checkpoint folder (with trainer_state.json).
    """

    resume = cfg["resume_from_checkpoint"]
    if resume in (None, False, "", "false", "none", "null"):
        return None
    if resume in (True, "true", "latest"):
        return latest_checkpoint(out / "checkpoints")
    path = resolve_path(str(resume))
    if not path.is_dir():
        raise ActionftError(f"resume_from_checkpoint {resume}: no such folder; point it at a checkpoint-N folder of "
                            f"this run, use latest, or leave it unset to start over")
    if not (path / "trainer_state.json").is_file():
        raise ActionftError(f"resume_from_checkpoint {path} is not a complete checkpoint (no trainer_state.json); "
                            f"point it at a checkpoint-N folder or use latest")
    return str(path)


def set_aside_checkpoints(out: Path) -> Path | None:
    """A fresh start in a run folder that holds checkpoints (an earlier attempt at this configuration): move them
    into `checkpoints/previous-N/`, where neither `latest` nor the Trainer's rotation sees them, so a later resume
    only ever continues this attempt. Nothing is deleted. Returns the folder they went to (None: there were none)."""
    folder = out / "checkpoints"
    old = sorted(p for p in folder.glob("checkpoint-*") if p.is_dir())
    if not old:
        return None
    taken = [int(p.name.split("-")[-1]) for p in folder.glob("previous-*") if p.name.split("-")[-1].isdigit()]
    dest = folder / f"previous-{max(taken, default=0) + 1}"
    try:
        dest.mkdir()
        for p in old:
            os.rename(p, dest / p.name)
    except OSError as err:
        raise os_error(err, "cannot set the earlier checkpoints aside in") from None
    print(f"this run starts over: the {len(old)} checkpoint(s) of the earlier attempt are kept in {dest} (delete "
          f"them to free the space; set resume_from_checkpoint=latest to continue a run instead)")
    return dest


def _finished(checkpoint: str) -> dict[str, Any] | None:
    """The checkpoint's trainer state when it is the last step of its run (resuming it would train on), else None."""
    try:
        state = json.loads((Path(checkpoint) / "trainer_state.json").read_text())
    except (OSError, ValueError):
        return None
    max_steps = state.get("max_steps") or 0
    return state if max_steps > 0 and state.get("global_step", 0) >= max_steps else None


def latest_checkpoint(folder: Path) -> str:
    """Newest complete `checkpoint-N` in `folder`: a run killed while saving leaves one without trainer_state.json
    (the Trainer writes it last), which the Trainer's own "latest" would pick and then fail to load."""
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    if not done:
        raise ActionftError(f"resume_from_checkpoint=latest, but {folder} holds no complete checkpoint-N folder; "
                            "start without resume_from_checkpoint or point it at a checkpoint folder")
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))


def optimizer_chain(optimizer) -> str:
    """The optimizer that ran, outermost wrapper first (`DeepSpeedOptimizerWrapper > DeepSpeedZeroOptimizer >
    bitsandbytes.AdamW 8-bit paged` under ZeRO-2), so a run's summary shows what actually stepped the weights."""
    names = []
    while optimizer is not None and len(names) < 6:
        name = type(optimizer).__name__
        if type(optimizer).__module__.startswith("bitsandbytes"):
            # transformers builds paged_adamw_8bit as bitsandbytes' AdamW with optim_bits=8, is_paged=True
            bits = getattr(getattr(optimizer, "args", None), "optim_bits", 32)
            name = f"bitsandbytes.{name} {bits}-bit" + (" paged" if getattr(optimizer, "is_paged", False) else "")
        names.append(name)
        optimizer = getattr(optimizer, "optimizer", None)
    return " > ".join(names)


def fit(trainer, info: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if asked), save the adapter + processor under the run folder, return a summary."""

    cfg, out = info["cfg"], info["run_dir"]
    resume = info["resume"] if "resume" in info else resolve_resume(cfg, out)
    adapter_dir = out / "adapter"
    finished = _finished(resume) if resume else None
    if finished is not None:
        # The run already took its last step: resuming must not add one. Its adapter is the checkpoint's.
        return _finished_summary(trainer, info, resume, finished)
    try:
        result = trainer.train(resume_from_checkpoint=resume or None)
        trainer.save_model(str(adapter_dir))
    except Exception as err:
        full = _disk_full(err, out)
        if full is None:
            raise
        raise full from None
    summary = {
        "run_dir": str(out),
        "adapter_dir": str(adapter_dir),
        "global_step": trainer.state.global_step,
        "train_samples": len(info["splits"]["train"]),
        "val_samples": len(info["splits"]["val"]),
        "effective_batch": effective_batch(cfg, trainer.args.world_size),
        "train_loss": round(result.training_loss, 4),
        "train_runtime_s": round(result.metrics.get("train_runtime", 0.0), 1),
        "train_samples_per_s": round(result.metrics.get("train_samples_per_second", 0.0), 3),
        "optimizer": optimizer_chain(trainer.optimizer),
        "zero_stage": trainer.accelerator.state.deepspeed_plugin.zero_stage if trainer.is_deepspeed_enabled else None,
    }
    if cache := info.get("vision_cache"):
        summary["vision_cache"] = cache.stats()
        cache.remove()
    if trainer.is_world_process_zero():
        info["processor"].save_pretrained(str(adapter_dir))
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _finished_summary(trainer, info: dict[str, Any], checkpoint: str, state: dict[str, Any]) -> dict[str, Any]:
    """A finished run resumed: no step is taken; the adapter comes from its last checkpoint when it is missing."""
    import shutil

    cfg, out = info["cfg"], info["run_dir"]
    adapter_dir = out / "adapter"
    print(f"{checkpoint} is the last step of this run ({state['global_step']} of {state['max_steps']}); "
          f"nothing to train, its adapter is in {adapter_dir}")
    summary_file = out / "train_summary.json"
    if trainer.is_world_process_zero():
        if not (adapter_dir / "adapter_model.safetensors").is_file():
            adapter_dir.mkdir(parents=True, exist_ok=True)
            for f in Path(checkpoint).iterdir():
                if f.name.startswith("adapter_") and f.is_file():
                    shutil.copy2(f, adapter_dir / f.name)
            info["processor"].save_pretrained(str(adapter_dir))
        if not (out / "trainer_state.json").is_file():
            shutil.copy2(Path(checkpoint) / "trainer_state.json", out / "trainer_state.json")
    if summary_file.is_file():
        summary = json.loads(summary_file.read_text())
    else:
        summary = {"run_dir": str(out), "adapter_dir": str(adapter_dir), "train_samples": len(info["splits"]["train"]),
                   "val_samples": len(info["splits"]["val"]),
                   "effective_batch": effective_batch(cfg, trainer.args.world_size)}
    summary["global_step"] = state["global_step"]
    if trainer.is_world_process_zero() and not summary_file.is_file():
        summary_file.write_text(json.dumps(summary, indent=1))
    return summary


def _disk_full(err: BaseException, out: Path) -> ActionftError | None:
    """A one-line error when training stopped on a full disk (an OSError, or torch's and safetensors' own wording
    of it), else None."""
    import errno

    full = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            return os_error(err, "training stopped: cannot write")
        if err.errno not in full:
            return None
    text = str(err).lower()
    if (isinstance(err, OSError) and err.errno in full) or "no space left" in text or (
            "write" in text and "fail" in text and _free_bytes(out) < 64 * 2**20):
        return ResourceError(
            f"training stopped: no space left on the device holding {out}; free some space and run again with "
            f"resume_from_checkpoint=latest (a checkpoint cut short is skipped)")
    return None


def _free_bytes(path: Path) -> int:
    import shutil

    try:
        return shutil.disk_usage(path).free
    except OSError:
        return 1 << 62


def train(params: dict[str, Any], model=None, progress: bool = True) -> dict[str, Any]:
    """Fine-tune as configured (`prepare` + `fit`)."""
    trainer, info = prepare(params, model, progress)
    return fit(trainer, info)


def dry_run(params: dict[str, Any]) -> dict[str, Any]:
    """Resolved configuration, optimizer steps and effective batch, without loading any weights."""
    cfg = resolve_config(params)
    splits = load_splits(cfg, check_files=False, progress=False)
    n_proc = int(cfg["num_processes"] or world_size())
    return {
        "config": cfg,
        "train_samples": len(splits["train"]),
        "val_samples": len(splits["val"]),
        "test_samples": len(splits["test"]),
        "processes": n_proc,
        "effective_batch": effective_batch(cfg, n_proc),
        "optimizer_steps": optimizer_steps(len(splits["train"]), cfg, n_proc),
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    from actionft.params import add_params_args

    p = sub.add_parser("train", help="LoRA fine-tuning (HF Trainer + peft + DeepSpeed)")
    add_params_args(p, required=True)
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and step count, load nothing")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    from actionft.params import params_from_args

    params = params_from_args(args)
    if args.dry_run:
        info = dry_run(params)
        for key, value in info["config"].items():
            print(f"  {key}: {value}")
        print(f"train samples: {info['train_samples']}  val: {info['val_samples']}  test: {info['test_samples']}")
        print(f"processes: {info['processes']}  effective batch: {info['effective_batch']}")
        print(f"optimizer steps: {info['optimizer_steps']}")
        return 0
    summary = train(params)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=1))
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        # a launched process that exits with its process group alive can abort in the group's threads at shutdown
        # ("terminate called without an active exception"), failing the whole launch after a good run
        dist.barrier()
        dist.destroy_process_group()
    return 0
