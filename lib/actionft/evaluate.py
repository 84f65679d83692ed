"""Held-out evaluation: base vs fine-tuned on the same frames and prompts.

Closed-set accuracy (when labels are known) scores every candidate label's answer under the model and takes the
most likely one, so a model that ignores the frames lands at chance, not at zero. The label set comes from the
data (`actionft.labels`); each clip is encoded once for all its labels (`infer.score_candidates`, "prefix").
Free-form answers are generated greedily and scored with caption metrics (`actionft.metrics`) and "does the
answer mention the right label".
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from pathlib import Path
from typing import Any

from actionft.data import Sample
from actionft.errors import ActionftError, write_json


def label_set_for(params: dict[str, Any], samples: list[Sample]):
    """The evaluation's label set (see `actionft.labels`): `label_set` (a class-list file or label CSV) if set, else
    `labels.csv` beside `metadata_path`, else the labels of `samples` (pass every split); `label_template` fills
    classes without their own answer. None when nothing is labelled."""
    from actionft.labels import dataset_label_set

    return dataset_label_set(samples, params.get("metadata_path"), params.get("label_set"),
                             params.get("label_template"))


def label_candidates(samples: list[Sample], labels) -> list[list[str]]:
    """Per sample, one answer per class of the label set, in class order."""
    return [labels.candidates(s) for s in samples]


def closed_set_predictions(model, processor, samples: list[Sample], labels, max_soft_tokens: int, topk: int = 5,
                           progress: bool = True, method: str = "prefix",
                           candidate_batch_size: int = 64) -> list[list[str]]:
    """Classes of the label set ranked by the likelihood of their answer, most likely first (top `topk`)."""
    from actionft.infer import score_candidates

    scores = score_candidates(model, processor, samples, label_candidates(samples, labels),
                              max_soft_tokens=max_soft_tokens, progress=progress, method=method,
                              candidate_batch_size=candidate_batch_size)
    classes = labels.classes
    ranked = []
    for row in scores:
        order = sorted(range(len(classes)), key=lambda i: -row[i])
        ranked.append([classes[i] for i in order[:topk]])
    return ranked


def answer_class(answer: str, labels) -> str | None:
    """The single class of the label set a free-form answer names (None if it names none or several)."""
    return labels.answer_class(answer)


def references_by_clip(samples: list[Sample]) -> dict[str, list[str]]:
    refs: dict[str, list[str]] = defaultdict(list)
    for s in samples:
        refs[s.clip_id].append(s.answer)
    return refs


def unique_clips(samples: list[Sample]) -> list[Sample]:
    seen, out = set(), []
    for s in samples:
        if s.clip_id not in seen:
            seen.add(s.clip_id)
            out.append(s)
    return out


def evaluate_model(model, processor, samples: list[Sample], labels, max_soft_tokens: int,
                   batch_size: int = 8, max_new_tokens: int = 40, semantic: bool = True,
                   progress: bool = True, scoring: str = "prefix") -> tuple[dict[str, float], list[dict]]:
    """Every metric for one model on held-out clips; returns (metrics, per-sample rows). `labels`: a `LabelSet`
    (closed-set top-1/top-5 over its classes) or None."""
    from actionft import metrics
    from actionft.infer import generate_answers

    clips = unique_clips(samples)
    refs = references_by_clip(samples)
    answers = generate_answers(model, processor, clips, batch_size=batch_size, max_new_tokens=max_new_tokens,
                               max_soft_tokens=max_soft_tokens, progress=progress)
    caption = metrics.caption_scores(answers, [refs[c.clip_id] for c in clips], semantic=semantic)
    out = {k: round(float(v), 4) for k, v in caption["corpus"].items() if v is not None}
    rows = []
    for c, a, sc in zip(clips, answers, caption["per_sample"]):
        rows.append({"clip_id": c.clip_id, "frames": [str(p) for p in c.frames], "references": refs[c.clip_id],
                     "answer": a, **{k: (round(float(v), 4) if v is not None else None) for k, v in sc.items()}})
    labelled = labels is not None and all(c.label for c in clips)
    if labelled:
        labels.check_covers(clips)
        ranked = closed_set_predictions(model, processor, clips, labels, max_soft_tokens, topk=min(5, len(labels)),
                                        progress=progress, method=scoring)
        truth = [c.label for c in clips]
        top1 = [r[0] for r in ranked]
        mentions = [labels.mentions(a, t) for a, t in zip(answers, truth)]
        out["top1"] = round(metrics.accuracy(truth, top1), 4)
        out["top5"] = round(metrics.topk_accuracy(truth, ranked, min(5, len(labels))), 4)
        out["mentions_label"] = round(sum(mentions) / len(mentions), 4)
        for row, t, r, m in zip(rows, truth, ranked, mentions):
            row.update({"label": t, "predicted": r[0], "ranked": r, "mentions_label": m})
    return out, rows


def closed_set_report(rows: dict[str, list[dict]], labels, out_dir: str | Path | None = None,
                      n_confusions: int = 20) -> dict[str, Any]:
    """Per-class accuracy and the most frequent confusions of each model (readable at hundreds of classes: a list
    of the top confusions, not a full matrix); with `out_dir`, also writes per_class.json, confusions.json and
    confusion.png (per model, the classes with the most errors)."""
    from actionft import metrics

    report: dict[str, Any] = {"per_class": {}, "confusions": {}}
    named = {name: r for name, r in rows.items() if r and all("predicted" in x for x in r)}
    for name, r in named.items():
        truth, pred = [x["label"] for x in r], [x["predicted"] for x in r]
        report["per_class"][name] = metrics.per_class_table(truth, pred, labels.classes)
        report["confusions"][name] = metrics.top_confusions(truth, pred, n_confusions)
    if out_dir is not None and named:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(out_dir / "per_class.json", report["per_class"])
        write_json(out_dir / "confusions.json", report["confusions"])
        import matplotlib.pyplot as plt

        cms = {name: metrics.confusion_matrix([x["label"] for x in r], [x["predicted"] for x in r], labels.classes)
               for name, r in named.items()}
        shown = max(len(metrics.confusion_subset(cm, labels.classes)[1]) for cm in cms.values())
        side = min(4 + 0.45 * shown, 16)
        fig, axes = plt.subplots(1, len(named), figsize=(side * len(named), side), squeeze=False)
        for ax, (name, cm) in zip(axes[0], cms.items()):
            metrics.plot_confusion(cm, labels.classes, ax=ax)
            ax.set_title(f"{name}: {ax.get_title()}", fontsize=9)
        fig.tight_layout()
        fig.savefig(out_dir / "confusion.png", dpi=110)
        plt.close(fig)
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    from actionft.params import add_params_args

    p = sub.add_parser("evaluate", help="held-out metrics for the base model and base + adapter")
    add_params_args(p, required=True)
    p.add_argument("--adapter", help="adapter folder from training (default: the params' adapter_dir)")
    p.add_argument("--out", required=True, help="folder for metrics.json and per-sample results")
    p.add_argument("--split", help="held-out split to evaluate (default: the params' eval_split, else test)")
    p.set_defaults(func=_cli)


# What the evaluation parameters mean when a params file leaves them unset (None).
EVAL_DEFAULTS = {"eval_split": "test", "max_new_tokens": 40, "semantic": True, "n_examples": 0}


def evaluation_settings(params: dict[str, Any]) -> dict[str, Any]:
    """The evaluation parameters of `params` (checked; see actionft.config), with EVAL_DEFAULTS for unset ones."""
    from actionft import config

    settings = config.validate(params, ("evaluation",))
    return {**settings, **{k: v for k, v in EVAL_DEFAULTS.items() if settings[k] is None}}


def best_and_worst(rows: list[dict], n: int, key: str) -> dict[str, list[dict]]:
    """The `n` rows with the highest and the lowest `key` (best first, worst first)."""
    order = sorted(range(len(rows)), key=lambda i: rows[i][key])
    return {"best": [rows[i] for i in order[::-1][:n]], "worst": [rows[i] for i in order[:n]]}


def run_evaluation(params: dict[str, Any], adapter_dir: str | Path, out_dir: str | Path, split: str | None = None,
                   progress: bool = True) -> dict[str, Any]:
    """Evaluate base and base + adapter on `split` (None: the params' eval_split, else test); write metrics.json and
    per_sample.json (with labels also per_class.json, confusions.json and confusion.png; with n_examples > 0 also
    examples.json, the fine-tuned model's best and worst answers); return metrics.

    The evaluation parameters apply: semantic (score semantic similarity), max_new_tokens, label_set,
    label_template, n_examples."""
    from actionft import train
    from actionft.errors import writable_folder
    from actionft.infer import check_adapter, load_for_inference

    cfg = train.resolve_config(params)
    settings = evaluation_settings(params)
    split = split or settings["eval_split"]
    # Everything that can be checked is checked before the first model loads: nothing is lost at the end.
    if split not in ("train", "val", "test"):
        raise ActionftError(f"unknown split {split!r}; use test, val or train")
    writable_folder(out_dir)
    check_adapter(cfg["model_id"], adapter_dir)
    splits = train.load_splits(cfg, progress=progress)
    samples = splits[split]
    if not samples:
        raise ActionftError(f"the {split} split is empty; set test_fraction (or the metadata split column)")
    labels = label_set_for({**cfg, **params}, [s for part in splits.values() for s in part])
    if labels is not None:  # every held-out label is a class, and every class's answer fills in for every clip
        labels.check_covers(samples)
        label_candidates(unique_clips(samples), labels)
    eval_kwargs = dict(labels=labels, max_soft_tokens=cfg["max_soft_tokens"],
                       batch_size=cfg["per_device_eval_batch_size"], max_new_tokens=settings["max_new_tokens"],
                       semantic=settings["semantic"], progress=progress)
    results, per_sample = {}, {}
    for name, adapter in (("base", None), ("finetuned", adapter_dir)):
        model, processor = load_for_inference(cfg["model_id"], adapter, bf16=False)
        results[name], per_sample[name] = evaluate_model(model, processor, samples, **eval_kwargs)
        del model
    metrics_out = {"base": results["base"], "finetuned": results["finetuned"], "n": len(unique_clips(samples))}
    if labels is not None:
        metrics_out["classes"] = len(labels)
        closed_set_report(per_sample, labels, out_dir)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "metrics.json", metrics_out)
    rows = [{**b, "finetuned_answer": f["answer"], **{f"finetuned_{k}": v for k, v in f.items()
                                                        if k not in ("clip_id", "frames", "references", "label")}}
            for b, f in zip(per_sample["base"], per_sample["finetuned"])]
    write_json(out_dir / "per_sample.json", rows)
    if settings["n_examples"]:  # ranked by semantic similarity to the reference (ROUGE-L when that is off)
        key = "semantic" if settings["semantic"] else "rouge_l"
        write_json(out_dir / "examples.json", {"ranked_by": key, **best_and_worst(
            [{k: r[k] for k in ("clip_id", "frames", "references", "finetuned_answer", f"finetuned_{key}")}
             for r in rows], settings["n_examples"], f"finetuned_{key}")})
    return metrics_out


def _cli(args: argparse.Namespace) -> int:
    from actionft import metrics
    from actionft.params import params_from_args

    params = params_from_args(args)
    adapter = args.adapter or params.get("adapter_dir")
    if not adapter:
        raise ActionftError("give the adapter folder: --adapter DIR (or adapter_dir in the params)")
    result = run_evaluation(params, adapter, args.out, args.split)
    print(metrics.summary_table({"base": result["base"], "finetuned": result["finetuned"]}))
    print(f"n = {result['n']} held-out clips; written to {Path(args.out) / 'metrics.json'}")
    return 0


def training_signal_checks(model, processor, samples: list[Sample], max_soft_tokens: int, tol: float = 1e-4) -> list[dict]:
    """Does the loss we train on mean what we think? Four checks on a batch of held-out samples:

    teacher-forced loss with `use_cache` on vs off and with gradient checkpointing on vs off (Gemma 4's K/V sharing
    once broke both); the per-token loss recomputed by hand vs the model's own loss vs `train.supervised_loss`; the
    first generated token vs the argmax of the teacher-forced logits.
    """
    import torch

    from actionft.collate import Collator
    from actionft.likelihood import mean_token_nll
    from actionft.train import supervised_loss

    device = next(model.parameters()).device
    collator = Collator(processor, max_soft_tokens=max_soft_tokens, padding_side="left")
    batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in collator(samples).items()}
    labels = batch["labels"]
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    saved_p = [m.p for m in dropouts]
    for m in dropouts:  # deterministic forward passes in train mode
        m.p = 0.0
    # an adapter loaded for inference has nothing that requires grad; the backward pass of the gradient
    # checkpointing check needs something: the LoRA weights if any, otherwise the input embeddings
    params = dict(model.named_parameters())
    grad_names = [n for n in params if "lora_" in n] or [
        n for n, p in params.items() if p is model.get_input_embeddings().weight]
    saved_grad = {n: params[n].requires_grad for n in grad_names}
    for n in grad_names:
        params[n].requires_grad_(True)
    rows = []

    def row(name, a, b):
        a, b = float(a), float(b)
        rows.append({"check": name, "a": round(a, 6), "b": round(b, 6), "abs_diff": abs(a - b),
                     "ok": abs(a - b) <= tol * max(1.0, abs(a))})

    try:
        model.eval()
        with torch.no_grad():
            out_cache = model(**inputs, use_cache=True)
            out_nocache = model(**inputs, use_cache=False)

            def ce(logits):
                return mean_token_nll(logits, labels)

            row("loss: use_cache on vs off", ce(out_cache.logits), ce(out_nocache.logits))
            by_hand = ce(out_nocache.logits)
            ours, _ = supervised_loss(model, batch, None, True)
            row("loss: by hand vs supervised_loss (logits only where supervised)", by_hand, ours)
            hf_loss = model(**inputs, labels=labels, use_cache=False).loss
            row("loss: by hand vs the model's own loss", by_hand, hf_loss)
        was_gc = getattr(model, "is_activation_checkpointing", False)
        model.train()
        losses = {}
        for gc in (False, True):
            if gc:
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.activation_checkpointing_disable()
            loss, _ = supervised_loss(model, batch, None, True)
            loss.backward()
            losses[gc] = loss.item()
            model.zero_grad(set_to_none=True)
        row("loss: gradient checkpointing off vs on", losses[False], losses[True])
        if not was_gc:
            model.activation_checkpointing_disable()
        model.eval()
        # first generated token vs teacher-forced argmax at the last prompt position
        gen_collator = Collator(processor, max_soft_tokens=max_soft_tokens, for_generation=True)
        gen_batch = {k: v.to(device) if torch.is_tensor(v) else v for k, v in gen_collator(samples).items()}
        with torch.no_grad():
            first = model.generate(**gen_batch, max_new_tokens=1, do_sample=False)[:, -1]
            argmax = model(**gen_batch, use_cache=False).logits[:, -1].argmax(-1)
        agree = (first == argmax).float().mean()
        row("first generated token == teacher-forced argmax (share of samples)", agree, 1.0)
    finally:
        for m, p in zip(dropouts, saved_p):
            m.p = p
        for n, flag in saved_grad.items():
            params[n].requires_grad_(flag)
        model.zero_grad(set_to_none=True)
        model.eval()
    return rows
