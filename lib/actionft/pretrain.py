"""`actionft tiny-base`: pretrain the whole tiny Gemma 4 until it describes what it sees.

A real LoRA run starts from a model that already sees and speaks. A randomly initialised tiny model does neither, and
LoRA alone cannot teach it to (its frozen embeddings cap the logits, words it never produced stay unreachable).
So the embedded default starts from a tiny *pretrained* base, trained here on three generated tasks:

- describe one frame: "A big bright red square on the left." (colour, shape, size, brightness, position);
- describe the first and last of four frames: "First: a small ... Last: a big ..." (so the language model learns
  to read frames in order);
- say a sentence about a shape, without images, so the words of the action answers are known to the model.

It never sees an action answer paired with frames: naming the action is what the LoRA run teaches on top.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from actionft import synth
from actionft.data import Sample
from actionft.errors import ActionftError

DESCRIBE_FRAME = "Describe the frame."
DESCRIBE_FIRST_LAST = "Describe the first and the last frame."
SAY_SOMETHING = "Say something about a shape."


def size_word(radius: float) -> str:
    return "small" if radius < 0.13 else "medium" if radius < 0.22 else "big"


def position_word(x: float) -> str:
    return "on the left" if x < 0.4 else "on the right" if x > 0.6 else "in the middle"


def describe(state: dict) -> str:
    """A noun phrase for one frame state, e.g. 'a big dim red square on the left'."""
    if not state["visible"]:
        return "nothing"
    light = "dim" if state["brightness"] < 0.65 else "bright"
    return f"a {size_word(state['radius'])} {light} {state['colour']} {state['shape']} {position_word(state['x'])}"


def random_state(rng: random.Random) -> dict:
    return {
        "visible": rng.random() > 0.08,
        "colour": rng.choice(list(synth.COLOURS)),
        "shape": rng.choice(synth.SHAPES),
        "radius": rng.uniform(0.06, 0.32),
        "x": rng.uniform(0.2, 0.8),
        "y": rng.uniform(0.3, 0.7),
        "brightness": rng.choice([synth.DIM, 0.4, 0.5, 0.8, 0.9, 1.0]),
    }


class PretrainTasks:
    """An endless, seeded stream of (images, prompt, answer) examples for the three pretraining tasks."""

    def __init__(self, seed: int, frame_size: int, num_frames: int = 4, mix=(0.45, 0.4, 0.15)):
        self.rng = random.Random(seed)
        self.frame_size = frame_size
        self.num_frames = num_frames
        self.mix = mix

    def example(self) -> tuple[list[np.ndarray], str, str]:
        rng = self.rng
        task = rng.choices(range(3), weights=self.mix)[0]
        if task == 0:
            state = random_state(rng)
            answer = describe(state)
            return [synth.render(state, self.frame_size)], DESCRIBE_FRAME, answer[0].upper() + answer[1:] + "."
        clip = synth.random_clip(rng.choice(list(synth.CLASSES)), "x", rng)
        if task == 1:
            states = [clip.state(t) for t in synth.frame_times(self.num_frames)]
            frames = [synth.render(s, self.frame_size) for s in states]
            answer = f"First: {describe(states[0])}. Last: {describe(states[-1])}."
            return frames, DESCRIBE_FIRST_LAST, answer
        return [], SAY_SOMETHING, clip.answer


def corpus() -> list[str]:
    """Text the tiny tokenizer is trained on: the action answers, the descriptions and the chat roles."""
    rng = random.Random(0)
    lines = synth.corpus() + [DESCRIBE_FRAME, DESCRIBE_FIRST_LAST, SAY_SOMETHING, "<|turn>user\n", "<|turn>model\n", "First: Last:"]
    lines += [describe(random_state(rng)) for _ in range(400)]
    return lines


def encode_example(processor, frames, prompt, answer, max_soft_tokens: int):
    """Same prompt/completion layout as the collator, for in-memory frames (or none)."""
    from PIL import Image

    from actionft.collate import Collator

    content = [{"type": "image"} for _ in frames] + [{"type": "text", "text": prompt}]
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                         tokenize=False)
    images = [[Image.fromarray(f) for f in frames]] if frames else None
    enc = processor(text=[text], images=images, max_soft_tokens=max_soft_tokens, return_tensors="pt")
    collator = Collator(processor, max_soft_tokens=max_soft_tokens)
    completion = torch.tensor(collator.completion_ids(Sample(0, "x", prompt, answer)))
    out = {
        "input_ids": torch.cat([enc["input_ids"][0], completion]),
        "mm_token_type_ids": torch.cat([enc["mm_token_type_ids"][0], torch.zeros_like(completion)]),
        "labels": torch.cat([torch.full_like(enc["input_ids"][0], -100), completion]),
    }
    for key in ("pixel_values", "image_position_ids"):
        if key in enc:
            out[key] = enc[key]
    return out, collator


def pretrain_tiny_base(
    out_dir: str | Path,
    steps: int = 3000,
    batch_size: int = 16,
    lr: float = 3e-3,
    warmup_steps: int = 100,
    seed: int = 0,
    frame_size: int = 192,
    max_soft_tokens: int = 70,
    eval_every: int = 250,
    time_limit_s: float | None = None,
    progress: bool = True,
    init: str | Path | None = None,
    **model_overrides,
) -> dict:
    """Build the tiny model (or start from the base in `init`), train all its weights on the pretraining tasks and
    save it to `out_dir`. Continuing from `init` uses a fresh warmup + cosine schedule; use another `seed` so that
    the generated examples differ from the first run's."""
    from tqdm.auto import tqdm
    from transformers import AutoProcessor, Gemma4ForConditionalGeneration

    from actionft.tiny import build_tiny_model

    out_dir = Path(out_dir)
    earlier: list[dict] = []
    if init is not None:
        init = Path(init)
        if not (init / "config.json").is_file():
            raise ActionftError(f"--init {init} holds no config.json; point it at a tiny base folder")
        if init.resolve() != out_dir.resolve():
            shutil.copytree(init, out_dir, dirs_exist_ok=True)
        if (out_dir / "pretrain_history.json").is_file():
            earlier = json.loads((out_dir / "pretrain_history.json").read_text())
    else:
        build_tiny_model(out_dir, corpus(), seed=seed, **model_overrides)
    processor = AutoProcessor.from_pretrained(out_dir)
    model = Gemma4ForConditionalGeneration.from_pretrained(out_dir, dtype=torch.float32)
    model.train()
    # The audio tower is there for the published structure only: no task feeds it, it stays as initialised.
    for name, p in model.named_parameters():
        if ".audio_tower." in name or ".embed_audio." in name:
            p.requires_grad_(False)
    torch.manual_seed(seed)
    tasks = PretrainTasks(seed, frame_size)
    trained = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trained, lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup_steps) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps))
    )
    history = list(earlier)
    offset = len(earlier)
    start = time.time()
    bar = tqdm(range(steps), desc="tiny-base", disable=not progress)
    collator = None
    for step in bar:
        encoded = []
        for _ in range(batch_size):
            enc, collator = encode_example(processor, *tasks.example(), max_soft_tokens)
            encoded.append(enc)
        batch = collator.pad(encoded)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        history.append({"step": offset + step + 1, "loss": round(loss.item(), 4),
                        "elapsed_s": round(time.time() - start, 1)})
        bar.set_postfix(loss=f"{loss.item():.3f}")
        if eval_every and (step + 1) % eval_every == 0:
            # a loadable snapshot and the loss curve so far: long runs can be inspected (and stopped) midway
            model.save_pretrained(out_dir)
            (out_dir / "pretrain_history.json").write_text(json.dumps(history))
        if time_limit_s and time.time() - start > time_limit_s:
            break
    model.save_pretrained(out_dir)
    (out_dir / "pretrain_history.json").write_text(json.dumps(history))
    return {"steps": len(history) - offset, "final_loss": history[-1]["loss"],
            "seconds": round(time.time() - start, 1)}


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tiny-base", help="build and pretrain the tiny offline Gemma 4 used by the embedded default")
    p.add_argument("--out", required=True, help="output folder (loadable with from_pretrained)")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init", help="continue from this tiny base folder instead of a fresh random one")
    p.set_defaults(func=_cli)


def _cli(args: argparse.Namespace) -> int:
    summary = pretrain_tiny_base(args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                                 init=args.init)
    print(json.dumps(summary))
    return 0
