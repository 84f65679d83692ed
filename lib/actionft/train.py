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
import torch.nn.functional as F

from actionft.errors import ActionftError

# Defaults = the reference run (seed_run.md), except paths and the model, which the params files set.
DEFAULTS: dict[str, Any] = {
    "run_name": "run",
    "output_root": "outputs",
    "model_id": "tiny",
    "data_path": None,
    "image_folder": None,
    "metadata_path": None,
    "synth": False,
    # the generated dataset's settings (used when synth is true; see actionft.synth.generate_dataset)
    "synth_clips_per_class": 60,
    "synth_val_per_class": 6,
    "synth_test_per_class": 10,
    "synth_seed": 0,
    "synth_frame_size": 192,
    "num_frames": 4,
    "max_soft_tokens": 280,
    "video_max_soft_tokens": 70,
    "split_seed": 0,
    "val_fraction": 0.1,
    "test_fraction": 0.1,
    "max_train_samples": None,
    "max_eval_samples": None,
    "use_lora": True,
    "lora_r": 16,
    "lora_alpha": 32,
    "lora_dropout": 0.05,
    "lora_target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "image_encoder_lr": 0.0,
    "projector_lr": 0.0,
    "num_train_epochs": 3,
    "max_steps": -1,
    "per_device_train_batch_size": 1,
    "per_device_eval_batch_size": 8,
    "gradient_accumulation_steps": 8,
    "learning_rate": 2e-4,
    "weight_decay": 0.0,
    "warmup_ratio": 0.03,
    "lr_scheduler_type": "cosine",
    "max_grad_norm": 1.0,
    "gradient_checkpointing": True,
    "bf16": True,
    "optim": "paged_adamw_8bit",
    "save_strategy": "steps",
    "save_steps": 200,
    "save_total_limit": 2,
    "logging_steps": 10,
    "eval_steps": None,
    "dataloader_num_workers": 4,
    "seed": 42,
    "deepspeed": "params/deepspeed/zero2.json",
    "resume_from_checkpoint": None,
    "attn_implementation": "sdpa",
    "padding_side": "left",
    "supervised_logits_only": True,
    "num_processes": None,  # what `--dry-run` plans for; None: the launcher's WORLD_SIZE (1 in a plain process)
}

# Parameters that only notebooks 00 and 05-06 (or `actionft prepare` / `evaluate`) read; a params file may hold them,
# training ignores them. A test keeps this list in step with the notebooks' `parameters` cells.
OTHER_KEYS = frozenset({
    "adapter_dir", "add_missing_clip", "annotations", "batch_size", "eval_split", "jpeg_quality", "label_template",
    "max_clips", "max_mean_diff", "max_new_tokens", "n_checked", "n_examples", "n_show", "semantic", "size",
    "video_data_path", "video_dir", "workers",
})

# Modules of Gemma4ForConditionalGeneration that LoRA never touches (towers and their projections into text).
NON_TEXT_MODULES = ("vision_tower", "audio_tower", "embed_vision", "embed_audio")


def resolve_config(params: dict[str, Any]) -> dict[str, Any]:
    """Defaults + params, with unknown-key and consistency checks."""
    unknown = sorted(set(params) - set(DEFAULTS) - OTHER_KEYS)
    if unknown:
        import difflib

        known = list(DEFAULTS) + sorted(OTHER_KEYS)
        hints = [f"{k} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(k, known, 1)) else k for k in unknown]
        raise ActionftError(f"unknown parameter(s): {', '.join(hints)}; the known ones are in params/tiny.yaml "
                            "and the notebooks' parameters cells")
    cfg = dict(DEFAULTS)
    cfg.update({k: v for k, v in params.items() if k in DEFAULTS})
    if cfg["data_path"] is None and not cfg["synth"]:
        raise ActionftError("set data_path and image_folder (or synth: true for the generated dataset)")
    for key in ("per_device_train_batch_size", "gradient_accumulation_steps", "num_frames"):
        if int(cfg[key]) < 1:
            raise ActionftError(f"{key} must be >= 1, got {cfg[key]}")
    if cfg["padding_side"] not in ("left", "right"):
        raise ActionftError(f"padding_side must be 'left' or 'right', got {cfg['padding_side']!r}")
    return cfg


def run_dir(cfg: dict[str, Any]) -> Path:
    from actionft.modeling import resolve_path

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
    from actionft.modeling import resolve_path

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
    from actionft.modeling import resolve_path
    from actionft.synth import ensure_dataset, generate_dataset

    known = generate_dataset.__code__.co_varnames[1:generate_dataset.__code__.co_argcount]
    kwargs = {k[len("synth_"):]: v for k, v in cfg.items() if k.startswith("synth_") and k[len("synth_"):] in known}
    folder = resolve_path(cfg["image_folder"])
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        ensure_dataset(folder, **kwargs)
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
        model = load_model(cfg["model_id"], bf16=cfg["bf16"], attn_implementation=cfg["attn_implementation"])
    model.config.use_cache = False
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
    if cfg["gradient_checkpointing"]:
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
    logits = outputs.logits
    targets = labels[:, length - logits.shape[1] + 1:]
    loss_sum = F.cross_entropy(
        logits[:, :-1].float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
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


def training_arguments(cfg: dict[str, Any], out: Path, n_eval: int):
    from transformers import TrainingArguments

    from actionft.modeling import resolve_path

    on_gpu = torch.cuda.is_available()
    ds = None
    if cfg["deepspeed"]:
        ds = resolve_path(cfg["deepspeed"])
        if not ds.is_file():
            raise ActionftError(f"DeepSpeed config {ds} does not exist (set deepspeed: null to train without it)")
        ensure_distributed_env()
        from actionft import quiet

        quiet.probe_deepspeed_ops()  # before the Trainer: keeps DeepSpeed's libaio link test out of notebooks
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
        report_to="none",
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
    out.mkdir(parents=True, exist_ok=True)
    if int(os.environ.get("RANK", "0")) == 0:
        (out / "train_config.json").write_text(json.dumps(cfg, indent=1))
    set_seed(cfg["seed"])
    splits = load_splits(cfg, progress=progress)
    if not splits["train"]:
        raise ActionftError("the training split is empty; check the split fractions and the metadata")
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
    )
    info = {"cfg": cfg, "run_dir": out, "splits": splits, "processor": processor}
    return trainer, info


def latest_checkpoint(folder: Path) -> str:
    """Newest complete `checkpoint-N` in `folder`: a run killed while saving leaves one without trainer_state.json
    (the Trainer writes it last), which the Trainer's own "latest" would pick and then fail to load."""
    done = [p for p in folder.glob("checkpoint-*")
            if p.name.split("-")[-1].isdigit() and (p / "trainer_state.json").is_file()]
    if not done:
        raise ActionftError(f"resume_from_checkpoint=latest, but {folder} holds no complete checkpoint-N folder; "
                            "start without resume_from_checkpoint or point it at a checkpoint folder")
    return str(max(done, key=lambda p: int(p.name.split("-")[-1])))


def fit(trainer, info: dict[str, Any]) -> dict[str, Any]:
    """Train (resuming if asked), save the adapter + processor under the run folder, return a summary."""
    from actionft.modeling import resolve_path

    cfg, out = info["cfg"], info["run_dir"]
    resume = cfg["resume_from_checkpoint"]
    if resume in (True, "true", "latest"):
        resume = latest_checkpoint(Path(trainer.args.output_dir))
    elif resume:
        resume = str(resolve_path(resume))
    result = trainer.train(resume_from_checkpoint=resume or None)
    adapter_dir = out / "adapter"
    trainer.save_model(str(adapter_dir))
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
    }
    if trainer.is_world_process_zero():
        info["processor"].save_pretrained(str(adapter_dir))
        trainer.state.save_to_json(str(out / "trainer_state.json"))
        (out / "train_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


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
