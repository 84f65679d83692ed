"""Benchmark: closed-set label scoring, one full forward pass per candidate ("full") against the prefix-shared
method ("prefix": frames + prompt once, every candidate a continuation of its key/value cache).

On the packaged tiny Gemma 4, on CPU, in float32, on the same held-out clips of the generated dataset, at 9, 100 and
400 labels: the 9 demo classes (each scored as its sentence about the clip's object), then Kinetics-400 class names
("The video shows {label}.") up to the count, so the clip's true class is always a candidate. Per clip the two
methods run back to back (alternating which goes first, so a slow spell of a shared machine hits both); it prints
seconds per clip, the speed-up (total full time / total prefix time), the largest |score difference| and whether
every clip ranks the labels identically, then an analytic estimate of both methods for E4B at 400 labels (see
docs/scoring.md). Its last line:

    speed-up: 9 labels X.Xx, 400 labels Y.Yx, max |score diff| Z

    .venv/bin/python bench/bench_scoring.py [--clips 2] [--labels 9,100,400] [--threads 1] [--json FILE]

One thread by default: on a small shared machine more threads mostly measure the neighbours (the ratio is what
counts). Writes outputs/bench/bench_scoring.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
KINETICS_400 = REPO / "params" / "labels" / "kinetics400.txt"

# E4B inputs for the estimate: four 336x336 frames at 280 soft tokens (256 per frame, 2304 valid 16-pixel patches
# before 3x3 pooling) + the Kinetics prompt = 1,051 prompt tokens (../shared/reference/gemma4.md). An answer
# "The video shows {label}." + end of turn is assumed to be 8 tokens, the first 3 shared by every label.
E4B_PROMPT_TOKENS = 1051
E4B_FRAMES = 4
E4B_PATCHES_PER_FRAME = 2304
E4B_SOFT_TOKENS_PER_FRAME = 256
E4B_ANSWER_TOKENS = 8
E4B_SHARED_TOKENS = 3
H100_BF16_PEAK = 989e12
MFU = 0.4


def label_set(n: int):
    """The first `n` labels: the 9 demo classes, then Kinetics-400 names (scored as "The video shows {label}.")."""
    from actionft.labels import DEFAULT_TEMPLATE, LabelSet
    from actionft.synth import label_set as demo_labels

    demo = demo_labels()
    if n <= len(demo):
        classes = demo.classes[:n]
        return LabelSet(classes, {c: demo.answers[c] for c in classes}, {c: demo.synonyms[c] for c in classes},
                        f"{n} demo classes")
    extra = [c for c in KINETICS_400.read_text().splitlines() if c.strip()][:n - len(demo)]
    classes = demo.classes + extra
    answers = {**demo.answers, **{c: DEFAULT_TEMPLATE for c in extra}}
    return LabelSet(classes, answers, dict(demo.synonyms), f"9 demo classes + {len(extra)} Kinetics-400 names")


def measure(model, processor, clips, n_labels: int, max_soft_tokens: int, batch: int) -> dict:
    """Both methods on every clip: seconds, max |diff|, identical ranking."""
    from actionft.infer import score_candidates

    labels = label_set(n_labels)
    times = {"full": 0.0, "prefix": 0.0}
    diff, same = 0.0, True
    for i, clip in enumerate(clips):
        cands = [labels.candidates(clip)]
        scores = {}
        for method in (("full", "prefix") if i % 2 == 0 else ("prefix", "full")):
            start = time.perf_counter()
            scores[method] = score_candidates(model, processor, [clip], cands, max_soft_tokens=max_soft_tokens,
                                              progress=False, method=method, candidate_batch_size=batch)[0]
            times[method] += time.perf_counter() - start
        full, prefix = scores["full"], scores["prefix"]
        diff = max(diff, max(abs(a - b) for a, b in zip(full, prefix)))
        rank = lambda s: sorted(range(len(s)), key=lambda j: -s[j])  # noqa: E731
        same = same and rank(full) == rank(prefix)
    n = len(clips)
    return {"labels": n_labels, "clips": n, "full_s_per_clip": times["full"] / n,
            "prefix_s_per_clip": times["prefix"] / n, "speedup": times["full"] / times["prefix"],
            "max_abs_diff": diff, "same_ranking": same}


# -- the analytic E4B estimate -----------------------------------------------------------------------------------
def causal_pairs(first: int, last: int, window: int | None) -> int:
    """(query, key) pairs for queries at positions first..last-1, each seeing itself and earlier keys (at most
    `window` of them)."""
    return sum(min(p + 1, window) if window else p + 1 for p in range(first, last))


def e4b_forward_flops(n_tokens: int, start: int = 0, shared_tokens: int | None = None, logits: int = 0) -> float:
    """Forward FLOPs of E4B's text model for tokens at positions start..start+n_tokens-1 after a cache of `start`
    positions; the K/V-shared layers see only the last `shared_tokens` (default all); `logits` positions go through
    the LM head. 2 FLOPs per multiply-add; attention 4 * heads * head_dim per (query, key) pair."""
    from actionft.e4b import PUBLISHED_TEXT as T

    h, inter, heads, kv = T["hidden_size"], T["intermediate_size"], T["num_attention_heads"], T["num_key_value_heads"]
    n_layers, n_shared = T["num_hidden_layers"], T["num_kv_shared_layers"]
    ple = T["hidden_size_per_layer_input"]
    shared_tokens = n_tokens if shared_tokens is None else shared_tokens
    flops = 2.0 * h * n_layers * ple * n_tokens  # per-layer-input projection
    for i, kind in enumerate(T["layer_types"]):
        hd = T["head_dim"] if kind == "sliding_attention" else T["global_head_dim"]
        window = T["sliding_window"] if kind == "sliding_attention" else None
        shared = i >= n_layers - n_shared
        tokens = shared_tokens if shared else n_tokens
        macs = 2 * h * heads * hd + 3 * h * inter + 2 * h * ple + (0 if shared else 2 * h * kv * hd)
        end = start + n_tokens
        flops += 2.0 * macs * tokens + 4.0 * heads * hd * causal_pairs(end - tokens, end, window)
    return flops + 2.0 * h * T["vocab_size"] * logits


def e4b_vision_flops(frames: int = E4B_FRAMES) -> float:
    from actionft.e4b import PUBLISHED_TEXT, PUBLISHED_VISION as V

    h, inter, layers = V["hidden_size"], V["intermediate_size"], V["num_hidden_layers"]
    q = V["num_attention_heads"] * V["head_dim"]
    patches = E4B_PATCHES_PER_FRAME
    per_patch = 3 * V["patch_size"] ** 2 * h + layers * (4 * h * q + 3 * h * inter)
    per_frame = 2.0 * per_patch * patches + 4.0 * q * layers * patches ** 2
    per_frame += 2.0 * h * PUBLISHED_TEXT["hidden_size"] * E4B_SOFT_TOKENS_PER_FRAME  # projection into the text
    return frames * per_frame


def e4b_estimate(n_labels: int = 400) -> dict:
    """Per clip at `n_labels` labels, as implemented: full = vision + all 1,059 positions through every layer and
    the LM head, once per label; prefix = vision + prompt once (the K/V-shared layers and the LM head only at the
    last positions), then per label its own tokens as a continuation of the cache."""
    p, a, s = E4B_PROMPT_TOKENS, E4B_ANSWER_TOKENS, E4B_SHARED_TOKENS
    vision = e4b_vision_flops()
    full_one = vision + e4b_forward_flops(p + a, logits=p + a)
    prefix_once = vision + e4b_forward_flops(p + s, shared_tokens=s + 1, logits=s + 1)
    own = a - s - 1  # tokens fed per label: its own tokens but the last (whose logits are not needed)
    per_label = e4b_forward_flops(own, start=p + s, logits=own)
    full, prefix = n_labels * full_one, prefix_once + n_labels * per_label
    rate = MFU * H100_BF16_PEAK
    return {"labels": n_labels, "prompt_tokens": p, "answer_tokens": a, "shared_tokens": s,
            "full_tflop": full / 1e12, "prefix_tflop": prefix / 1e12, "ratio": full / prefix,
            "full_s_h100_40pct": full / rate, "prefix_s_h100_40pct": prefix / rate,
            "vision_tflop": vision / 1e12, "prefix_once_tflop": prefix_once / 1e12,
            "per_label_gflop": per_label / 1e9}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clips", type=int, default=2, help="held-out clips scored at every label count")
    parser.add_argument("--labels", default="9,100,400", help="label counts, comma-separated")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    parser.add_argument("--max-soft-tokens", type=int, default=70)
    parser.add_argument("--batch", type=int, default=64, help="candidates per forward pass (both methods)")
    parser.add_argument("--data", default=str(REPO / "outputs" / "bench" / "scoring_data"))
    parser.add_argument("--json", default=str(REPO / "outputs" / "bench" / "bench_scoring.json"))
    args = parser.parse_args(argv)
    counts = [int(x) for x in args.labels.split(",")]

    import torch

    from actionft.data import load_dataset
    from actionft.modeling import load_model, load_processor
    from actionft.synth import ensure_dataset

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = ensure_dataset(args.data, clips_per_class=2, val_per_class=0, test_per_class=1, seed=0, videos=False,
                          progress=False)
    samples = load_dataset(data / "data.json", data, data / "metadata.csv", progress=False)
    clips = [s for s in samples if s.split == "test"][:args.clips]
    processor, model = load_processor("tiny"), load_model("tiny").eval()
    # warm-up (first calls allocate and pick kernels)
    from actionft.infer import score_candidates

    for method in ("full", "prefix"):
        score_candidates(model, processor, clips[:1], [label_set(3).candidates(clips[0])],
                         max_soft_tokens=args.max_soft_tokens, progress=False, method=method)
    print(f"tiny Gemma 4, CPU, float32, {torch.get_num_threads()} thread(s), {len(clips)} clips, "
          f"{args.max_soft_tokens} soft tokens per frame, {args.batch} candidates per pass")
    print("| labels | full s/clip | prefix s/clip | speed-up | max abs score diff | same ranking |")
    print("|---:|---:|---:|---:|---:|:---:|")
    rows = []
    for n in counts:
        r = measure(model, processor, clips, n, args.max_soft_tokens, args.batch)
        rows.append(r)
        print(f"| {n} | {r['full_s_per_clip']:.2f} | {r['prefix_s_per_clip']:.3f} | {r['speedup']:.1f}x | "
              f"{r['max_abs_diff']:.1e} | {'yes' if r['same_ranking'] else 'NO'} |", flush=True)
    est = e4b_estimate(400)
    print(f"E4B estimate per clip at 400 labels ({est['prompt_tokens']} prompt tokens, {est['answer_tokens']}-token "
          f"answers, {est['shared_tokens']} shared): full {est['full_tflop']:.0f} TFLOP "
          f"({est['full_s_h100_40pct']:.1f} s on an H100 at 40% MFU), prefix {est['prefix_tflop']:.1f} TFLOP "
          f"({est['prefix_s_h100_40pct']:.2f} s), {est['ratio']:.0f}x fewer FLOPs")
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "e4b_estimate": est, "threads": torch.get_num_threads(),
                               "max_soft_tokens": args.max_soft_tokens}, indent=1))
    by = {r["labels"]: r for r in rows}
    lo, hi = min(by), max(by)
    worst = max(r["max_abs_diff"] for r in rows)
    if not all(r["same_ranking"] for r in rows):
        print("rankings differ between the methods", file=sys.stderr)
    print(f"speed-up: {lo} labels {by[lo]['speedup']:.1f}x, {hi} labels {by[hi]['speedup']:.1f}x, "
          f"max |score diff| {worst:.1e}")
    return 0 if all(r["same_ranking"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
