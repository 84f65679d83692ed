"""Inference: base + LoRA adapter (as the reference model card loads it), batched greedy answers, label scoring."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from actionft import DEFAULT_PROMPT
from actionft.collate import END_OF_TURN, Collator
from actionft.data import Sample
from actionft.errors import ActionftError


def check_adapter(model_id: str, adapter_dir: str | Path) -> str:
    """Check an adapter folder against its base before any weights load; returns "adapter" or "merged".

    The folder must exist and hold `adapter_config.json` (or be a merged model with `config.json`); every LoRA
    matrix in `adapter_model.safetensors` must fit the module it targets in `model_id`, read from the safetensors
    header and a weightless (meta device) copy of the base, so an adapter trained for another base is one line.
    """
    adapter = Path(adapter_dir)
    if not adapter.is_dir():
        raise ActionftError(f"adapter folder {adapter} does not exist; train first (notebook 04 or actionft train)")
    if (adapter / "config.json").is_file() and not (adapter / "adapter_config.json").is_file():
        return "merged"
    if not (adapter / "adapter_config.json").is_file():
        raise ActionftError(f"{adapter} holds no adapter_config.json; is it an adapter folder (the run's adapter/)?")
    weights = adapter / "adapter_model.safetensors"
    if not weights.is_file():
        return "adapter"  # an old .bin adapter: peft checks it when it loads
    from safetensors import safe_open
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from actionft.modeling import resolve_model_id

    try:
        with safe_open(str(weights), framework="pt") as fh:
            shapes = {k: fh.get_slice(k).get_shape() for k in fh.keys()}
    except Exception as err:
        raise ActionftError(f"adapter weights {weights} cannot be read ({err}); train again or copy them again") from None
    base_cfg = json.loads((adapter / "adapter_config.json").read_text(encoding="utf-8", errors="replace") or "{}")
    trained_on = base_cfg.get("base_model_name_or_path") or "?"
    try:
        config = AutoConfig.from_pretrained(resolve_model_id(model_id))
        with torch.device("meta"):
            skeleton = Gemma4ForConditionalGeneration(config)
    except (OSError, ValueError, TypeError, AttributeError):
        return "adapter"  # no config to compare with: loading the model names the problem
    modules = dict(skeleton.named_modules())
    fix = f"use it with the base it was trained on ({trained_on}), e.g. --model-id / model_id"
    for key, shape in shapes.items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key:
                continue
            name = key.split(part)[0].removeprefix("base_model.model.")
            module = modules.get(name)
            if module is None:
                raise ActionftError(f"adapter {adapter} was trained for another base model: {model_id} has no "
                                    f"module {name}; {fix}")
            expected = getattr(module, "in_features" if dim == 1 else "out_features", None)
            if expected is not None and shape[dim] != expected:
                raise ActionftError(
                    f"adapter {adapter} was trained for another base model: {name} has "
                    f"{'inputs' if dim == 1 else 'outputs'} of size {expected} in {model_id}, the adapter's "
                    f"{shape[dim]}; {fix}")
    return "adapter"


def load_for_inference(model_id: str, adapter_dir: str | Path | None = None, bf16: bool = False,
                       device: str | None = None):
    """Base model (+ adapter via `PeftModel.from_pretrained(base, adapter_dir)`), in eval mode, and its processor.

    `adapter_dir` may also be a merged model folder (from `merge_adapter`), which is then loaded as the base.
    """
    from actionft.modeling import default_device, load_model, load_processor

    device = device or default_device()
    adapter = Path(adapter_dir) if adapter_dir else None
    if adapter is not None and check_adapter(model_id, adapter) == "merged":
        model_id, adapter = str(adapter), None  # a merged model
    processor = load_processor(str(adapter) if adapter and (adapter / "processor_config.json").is_file() else model_id)
    model = load_model(model_id, bf16=bf16)
    if adapter is not None:
        from peft import PeftModel

        if not (adapter / "adapter_config.json").is_file():
            raise ActionftError(f"{adapter} holds no adapter_config.json; is it an adapter folder?")
        model = PeftModel.from_pretrained(model, str(adapter))
    model.to(device).eval()
    return model, processor


def merge_adapter(model_id: str, adapter_dir: str | Path, out_dir: str | Path) -> Path:
    """Fold the LoRA weights into the base (`merge_and_unload`) and save a standalone model + processor."""
    model, processor = load_for_inference(model_id, adapter_dir, device="cpu")
    merged = model.merge_and_unload()
    out_dir = Path(out_dir)
    merged.save_pretrained(out_dir)
    processor.save_pretrained(out_dir)
    return out_dir


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@torch.no_grad()
def generate_answers(model, processor, samples: list[Sample], batch_size: int = 8, max_new_tokens: int = 40,
                     max_soft_tokens: int = 280, num_frames: int = 4, progress: bool = True,
                     video_max_soft_tokens: int = 70) -> list[str]:
    """Greedy answers for `samples` (their own prompts), batched with left padding."""
    from tqdm.auto import tqdm

    collator = Collator(processor, max_soft_tokens=max_soft_tokens, for_generation=True, num_frames=num_frames,
                        video_max_soft_tokens=video_max_soft_tokens)
    tok = processor.tokenizer
    stop = [tok.convert_tokens_to_ids(END_OF_TURN), tok.eos_token_id]
    answers: list[str] = []
    for start in tqdm(range(0, len(samples), batch_size), desc="generate", disable=not progress, leave=False):
        batch = _to(collator(samples[start:start + batch_size]), _device_of(model))
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop,
                             pad_token_id=tok.pad_token_id)
        new = out[:, batch["input_ids"].shape[1]:]
        answers += [a.strip() for a in tok.batch_decode(new, skip_special_tokens=True)]
    return answers


SCORING_METHODS = ("prefix", "full")


@torch.no_grad()
def score_candidates(model, processor, samples: list[Sample], candidates: list[list[str]],
                     max_soft_tokens: int = 280, num_frames: int = 4, progress: bool = True, method: str = "prefix",
                     candidate_batch_size: int = 64, video_max_soft_tokens: int = 70) -> list[list[float]]:
    """Log-likelihood (sum over answer tokens + end of turn) of every candidate answer for every sample.

    method="prefix" (default): each clip's frames and prompt go through the model once and every candidate is scored
    as a continuation of that prefix's key/value cache, `candidate_batch_size` candidates at a time.
    method="full": one complete forward pass (frames, prompt and answer) per candidate, the reference the prefix
    method must equal (see tests/test_scoring.py and bench/bench_scoring.py).
    """
    if method not in SCORING_METHODS:
        raise ActionftError(f"scoring method must be one of {SCORING_METHODS}, got {method!r}")
    if len(candidates) != len(samples):
        raise ActionftError(f"{len(samples)} samples but {len(candidates)} candidate lists; give one list per sample")
    if candidate_batch_size < 1:
        raise ActionftError(f"candidate_batch_size must be >= 1, got {candidate_batch_size}")
    from tqdm.auto import tqdm

    score = _score_prefix if method == "prefix" else _score_full
    collator = Collator(processor, max_soft_tokens=max_soft_tokens, num_frames=num_frames, padding_side="left",
                        video_max_soft_tokens=video_max_soft_tokens, for_generation=method == "prefix")
    scores = []
    for sample, cands in zip(tqdm(samples, desc="score labels", disable=not progress, leave=False), candidates):
        if not cands:
            raise ActionftError(f"clip {sample.clip_id}: no candidate answers to score")
        scores.append(score(model, collator, sample, list(cands), candidate_batch_size))
    return scores


def _with_answer(sample: Sample, answer: str) -> Sample:
    return Sample(sample.index, sample.clip_id, sample.prompt, answer, sample.frames, sample.video, sample.meta)


def _score_full(model, collator: Collator, sample: Sample, cands: list[str], chunk: int) -> list[float]:
    from actionft.likelihood import sequence_log_likelihood

    out = []
    for start in range(0, len(cands), chunk):
        batch = _to(collator([_with_answer(sample, c) for c in cands[start:start + chunk]]), _device_of(model))
        labels = batch.pop("labels")
        out += sequence_log_likelihood(model(**batch, use_cache=False).logits, labels).tolist()
    return out


def _score_prefix(model, collator: Collator, sample: Sample, cands: list[str], chunk: int) -> list[float]:
    """Frames + prompt once (with the tokens every candidate starts with), then the candidates' remaining tokens as
    a right-padded batch on copies of the prefix's cache.

    Why this equals the full pass on Gemma 4: the image soft tokens sit only in the prefix; sliding-window layers keep
    the last window of the prefix in their cache layer, which covers every position a continuation token may see;
    the K/V-shared layers read the keys and values their source layer returns for prefix + continuation; positions
    continue from the cache length, and per-layer inputs of the continuation come from its own token ids. Right
    padding after an answer is never attended to by the answer (causal), so its scores are untouched.
    """
    import copy

    from actionft.likelihood import token_log_probs

    device = _device_of(model)
    ids = [collator.completion_ids(_with_answer(sample, c)) for c in cands]
    # tokens every candidate starts with (e.g. "The video shows") join the prefix; at least one token stays per
    # candidate, so every candidate is scored from its own continuation
    shared = 0
    shortest = min(len(x) for x in ids)
    while shared < shortest - 1 and len({x[shared] for x in ids}) == 1:
        shared += 1
    common = ids[0][:shared]
    prefix = collator([sample])
    if common:
        extra = torch.tensor([common], dtype=prefix["input_ids"].dtype)
        prefix["input_ids"] = torch.cat([prefix["input_ids"], extra], 1)
        prefix["attention_mask"] = torch.cat([prefix["attention_mask"], torch.ones_like(extra)], 1)
        prefix["mm_token_type_ids"] = torch.cat([prefix["mm_token_type_ids"], torch.zeros_like(extra)], 1)
    prefix = _to(prefix, device)
    out = model(**prefix, use_cache=True, logits_to_keep=shared + 1)
    # log p of the shared tokens (the same for every candidate) and the distribution of each candidate's next token
    shared_lp = float(token_log_probs(out.logits[:, :-1], torch.tensor([common], device=device)).sum()) \
        if common else 0.0
    next_logits = out.logits[:, -1:]
    cache = out.past_key_values
    n_prefix = prefix["input_ids"].shape[1]
    pad = collator.tokenizer.pad_token_id
    rest = [x[shared:] for x in ids]
    order = sorted(range(len(rest)), key=lambda i: len(rest[i]))  # similar lengths together: less padding
    scores = [0.0] * len(rest)
    for start in range(0, len(order), chunk):
        idx = order[start:start + chunk]
        b, length = len(idx), max(len(rest[i]) for i in idx)
        x = torch.full((b, length), pad, dtype=torch.long)
        targets = torch.full((b, length), -100, dtype=torch.long)
        for row, i in enumerate(idx):
            x[row, :len(rest[i])] = torch.tensor(rest[i])
            targets[row, :len(rest[i])] = torch.tensor(rest[i])
        x, targets = x.to(device), targets.to(device)
        attention = torch.cat([torch.ones(b, n_prefix, dtype=torch.long, device=device), (targets != -100).long()], 1)
        past = copy.deepcopy(cache)
        past.batch_repeat_interleave(b)
        # position t predicts token t: the first from the prefix's last logits, the others from the continuation
        logits = next_logits.expand(b, -1, -1)
        if length > 1:
            cont = model(input_ids=x[:, :-1], attention_mask=attention[:, :-1], past_key_values=past,
                         use_cache=True).logits
            logits = torch.cat([logits.to(cont.dtype), cont], 1)
        for row, value in zip(idx, token_log_probs(logits, targets).sum(-1).tolist()):
            scores[row] = shared_lp + value
        del past
    return scores


def frames_sample(paths: list[str], prompt: str = DEFAULT_PROMPT, num_frames: int = 4,
                  as_video: bool = False) -> Sample:
    """A sample from frame files, or from one video file: `num_frames` frames at segment centres as image items
    (what an adapter trained on frames expects), or with `as_video` one video item for Gemma 4's video path."""
    if len(paths) == 1 and Path(paths[0]).suffix.lower() in {".mp4", ".avi", ".webm", ".mkv", ".mov", ".m4v"}:
        from actionft.frames import read_frames

        if not Path(paths[0]).is_file():
            raise ActionftError(f"video file not found: {paths[0]}")
        if as_video:
            return Sample(0, Path(paths[0]).stem, prompt, "", video=Path(paths[0]).resolve())

        frames, _, _ = read_frames(paths[0], num_frames=num_frames)
        return Sample(0, Path(paths[0]).stem, prompt, "", frames=frames)
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ActionftError(f"frame file(s) not found: {', '.join(missing)}")
    from actionft.data import check_media

    sample = Sample(0, Path(paths[0]).parent.name, prompt, "", frames=[Path(p) for p in paths])
    problems = check_media(sample, None)  # every frame opens, before any model loads
    if problems:
        raise ActionftError(f"frame {problems[0].path}: {problems[0].reason}")
    return sample


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("predict", help="answer for frames or a clip with a fine-tuned adapter")
    p.add_argument("inputs", nargs="+", help="frame image files (in order) or one video file")
    p.add_argument("--adapter", help="adapter folder (adapter_config.json) or merged model folder")
    p.add_argument("--model-id", default="tiny", help="base model: 'tiny', a hub id or a folder (default: tiny)")
    p.add_argument("--prompt", default=DEFAULT_PROMPT)
    p.add_argument("--num-frames", type=int, default=4, help="frames sampled from a video input")
    p.add_argument("--as-video", action="store_true", help="feed a video input as one video item through Gemma 4's "
                   "video processor (for adapters trained on video items) instead of 4 image items")
    p.add_argument("--video-max-soft-tokens", type=int, default=70, help="soft tokens per video frame")
    p.add_argument("--max-soft-tokens", type=int, default=None, help="soft tokens per frame (default: the "
                   "adapter's training value from train_summary, else 280)")
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.set_defaults(func=_cli_predict)
    m = sub.add_parser("merge", help="merge an adapter into its base model (merge_and_unload) and save it")
    m.add_argument("--adapter", required=True)
    m.add_argument("--model-id", default="tiny")
    m.add_argument("--out", required=True)
    m.set_defaults(func=lambda a: print(merge_adapter(a.model_id, a.adapter, a.out)) or 0)


def _cli_predict(args: argparse.Namespace) -> int:
    from actionft import config

    flags = {"model_id": args.model_id, "num_frames": args.num_frames, "max_new_tokens": args.max_new_tokens,
             "video_max_soft_tokens": args.video_max_soft_tokens}
    if args.max_soft_tokens is not None:
        flags["max_soft_tokens"] = args.max_soft_tokens
    config.validate(flags, sections=("data", "model", "evaluation"))  # the same ranges as everywhere, before work
    budget = args.max_soft_tokens
    if budget is None and args.adapter:
        cfg_file = Path(args.adapter).parent / "train_config.json"
        budget = json.loads(cfg_file.read_text()).get("max_soft_tokens") if cfg_file.is_file() else None
    if args.adapter:
        check_adapter(args.model_id, args.adapter)  # before reading frames or loading weights
    sample = frames_sample(args.inputs, args.prompt, args.num_frames, as_video=args.as_video)
    model, processor = load_for_inference(args.model_id, args.adapter)
    answer = generate_answers(model, processor, [sample], max_soft_tokens=budget or 280, num_frames=args.num_frames,
                              max_new_tokens=args.max_new_tokens, progress=False,
                              video_max_soft_tokens=args.video_max_soft_tokens)[0]
    print(answer)
    return 0
