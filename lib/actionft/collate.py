"""Turning samples into model inputs: chat template, frames, soft-token budget, labels and padding.

The prompt (user turn with its frames + the generation header `<|turn>model\n`) goes through the processor, which
expands every image into begin + N soft tokens + end. The completion (answer + `<turn|>`) is tokenized on its own
and appended, so labels are -100 on the prompt and on padding and equal the input ids on exactly the answer tokens
and the end-of-turn token. This works with any chat template (the real Gemma 4 one has no generation markers).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from actionft.data import Sample
from actionft.errors import ActionftError

IGNORE_INDEX = -100
SOFT_TOKEN_BUDGETS = (70, 140, 280, 560, 1120)
END_OF_TURN = "<turn|>"


def load_frames(paths: list):
    """Open frames as RGB PIL images, naming the file that fails (PIL images pass through)."""
    from PIL import Image

    images = []
    for p in paths:
        if isinstance(p, Image.Image):
            images.append(p.convert("RGB"))
            continue
        try:
            with Image.open(p) as im:
                images.append(im.convert("RGB"))
        except (OSError, ValueError, Image.DecompressionBombError) as err:
            raise ActionftError(f"cannot read frame {p}: {err}; run `actionft validate` on the dataset") from None
    return images


class Collator:
    """Callable that batches `Sample`s for training (`labels` included) or for generation (prompt only).

    max_soft_tokens: soft tokens per image (70/140/280/560/1120). For video items, `video_max_soft_tokens` per
    frame and `num_frames` frames read from the clip at segment centres.
    """

    def __init__(
        self,
        processor,
        max_soft_tokens: int = 280,
        for_generation: bool = False,
        num_frames: int = 4,
        video_max_soft_tokens: int = 70,
        padding_side: str = "right",
    ):
        for name, value in (("max_soft_tokens", max_soft_tokens), ("video_max_soft_tokens", video_max_soft_tokens)):
            if value not in SOFT_TOKEN_BUDGETS:
                raise ActionftError(f"{name} must be one of {SOFT_TOKEN_BUDGETS}, got {value}")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.max_soft_tokens = max_soft_tokens
        self.video_max_soft_tokens = video_max_soft_tokens
        self.for_generation = for_generation
        self.num_frames = num_frames
        # Generation needs left padding (new tokens follow every prompt). Training works with either; left puts all
        # answers at the end, so the model can skip the prompt in its last layers (see train.supervised_loss).
        self.padding_side = "left" if for_generation else padding_side
        self.eot_id = self.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.eot_id is None or self.eot_id == self.tokenizer.unk_token_id:
            raise ActionftError(f"the tokenizer has no {END_OF_TURN} token; is this a Gemma 4 processor?")

    # -- one sample -------------------------------------------------------------------------------------------
    def prompt_text(self, sample: Sample) -> str:
        """The rendered chat template up to and including the generation header."""
        msgs = sample.messages(with_answer=False)
        for item in msgs[0]["content"]:  # the template only needs the item types, not the pixels
            item.pop("image", None)
            item.pop("video", None)
        return self.processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)

    def completion_ids(self, sample: Sample) -> list[int]:
        """Answer tokens followed by the end-of-turn token: exactly what the model learns to produce."""
        ids = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
        return list(ids) + [self.eot_id]

    def encode(self, sample: Sample) -> dict:
        """Processor outputs for one sample, with the completion appended (unless for generation)."""
        text = self.prompt_text(sample)
        if sample.video is not None:
            video, metadata = self.read_video(sample)
            enc = self.processor(
                text=[text], videos=[video], video_metadata=[metadata], do_sample_frames=False,
                max_soft_tokens=self.video_max_soft_tokens, return_tensors="pt",
            )
        else:
            enc = self.processor(
                text=[text], images=[load_frames(sample.frames)], max_soft_tokens=self.max_soft_tokens,
                return_tensors="pt",
            )
        ids = enc["input_ids"][0]
        mm = enc["mm_token_type_ids"][0]
        labels = torch.full_like(ids, IGNORE_INDEX)
        if not self.for_generation:
            completion = torch.tensor(self.completion_ids(sample), dtype=ids.dtype)
            ids = torch.cat([ids, completion])
            mm = torch.cat([mm, torch.zeros_like(completion)])
            labels = torch.cat([labels, completion])
        out = {"input_ids": ids, "mm_token_type_ids": mm, "labels": labels}
        for key in ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids",
                    "num_frames_per_video"):
            if key in enc:
                out[key] = enc[key]
        return out

    def read_video(self, sample: Sample):
        """`num_frames` frames from the clip by seeking, with the metadata Gemma 4 needs for its timestamps."""
        from transformers.video_utils import VideoMetadata

        from actionft.frames import read_frames

        frames, times, info = read_frames(sample.video, num_frames=self.num_frames)
        fps = info.fps or 24.0
        metadata = VideoMetadata(
            total_num_frames=max(1, round(info.duration * fps)), fps=fps, width=info.width, height=info.height,
            duration=info.duration, frames_indices=[round(t * fps) for t in times],
        )
        return np.stack([np.asarray(f) for f in frames]), metadata

    # -- a batch ----------------------------------------------------------------------------------------------
    def __call__(self, samples: list[Sample]) -> dict:
        return self.pad([self.encode(s) for s in samples])

    def pad(self, encoded: list[dict]) -> dict:
        """Pad to the longest sequence on `padding_side`."""
        pad_id = self.tokenizer.pad_token_id
        length = max(len(e["input_ids"]) for e in encoded)
        n = len(encoded)
        input_ids = torch.full((n, length), pad_id, dtype=torch.long)
        attention = torch.zeros((n, length), dtype=torch.long)
        labels = torch.full((n, length), IGNORE_INDEX, dtype=torch.long)
        mm = torch.zeros((n, length), dtype=torch.long)
        for i, e in enumerate(encoded):
            k = len(e["input_ids"])
            sl = slice(length - k, length) if self.padding_side == "left" else slice(0, k)
            input_ids[i, sl] = e["input_ids"]
            attention[i, sl] = 1
            labels[i, sl] = e["labels"]
            mm[i, sl] = e["mm_token_type_ids"]
        batch = {"input_ids": input_ids, "attention_mask": attention, "mm_token_type_ids": mm}
        if not self.for_generation:
            batch["labels"] = labels
        for key in ("pixel_values", "image_position_ids", "pixel_values_videos", "video_position_ids"):
            parts = [e[key] for e in encoded if key in e]
            if parts:
                if len({p.shape[1:] for p in parts}) > 1:
                    raise ActionftError(f"cannot batch {key} of different shapes; use one soft-token budget")
                batch[key] = torch.cat(parts)
        frames_per_video = [e["num_frames_per_video"] for e in encoded if "num_frames_per_video" in e]
        if frames_per_video:
            batch["num_frames_per_video"] = torch.cat([torch.as_tensor(f).reshape(-1) for f in frames_per_video])
        return batch


def soft_tokens_per_image(processor, width: int, height: int, max_soft_tokens: int) -> int:
    """How many soft tokens the processor gives a frame of this size under a budget."""
    from PIL import Image

    out = processor.image_processor(
        images=[Image.new("RGB", (width, height))], max_soft_tokens=max_soft_tokens, return_tensors="pt"
    )
    return int(out["num_soft_tokens_per_image"][0])


# -- checks (notebook 03 and the tests) -----------------------------------------------------------------------
def render_input(tokenizer, ids, labels=None) -> str:
    """Decoded input with each run of image/video soft tokens collapsed to `<|image|>x64`; supervised tokens
    (labels != -100) are wrapped in [[...]]."""
    ids = [int(i) for i in ids]
    labels = [int(x) for x in labels] if labels is not None else [IGNORE_INDEX] * len(ids)
    soft = {tokenizer.convert_tokens_to_ids(t) for t in ("<|image|>", "<|video|>")}
    pad = tokenizer.pad_token_id
    parts, i = [], 0
    while i < len(ids):
        j = i
        while j < len(ids) and ids[j] == ids[i] and (ids[i] in soft or ids[i] == pad):
            j += 1
        if j - i > 1:
            parts.append(f"{tokenizer.convert_ids_to_tokens(ids[i])}x{j - i}")
            i = j
            continue
        piece = tokenizer.decode([ids[i]])
        parts.append(f"[[{piece}]]" if labels[i] != IGNORE_INDEX else piece)
        i += 1
    return "".join(parts)


def check_labels(collator: Collator, sample: Sample) -> dict:
    """The supervised tokens of one encoded sample decode to exactly the answer + end of turn."""
    enc = collator.encode(sample)
    supervised = enc["labels"] != IGNORE_INDEX
    decoded = collator.tokenizer.decode(enc["input_ids"][supervised])
    expected = sample.answer + END_OF_TURN
    n = int(supervised.sum())
    contiguous = bool(supervised[-n:].all()) if n else False
    return {"ok": decoded == expected and contiguous, "decoded": decoded, "expected": expected,
            "supervised_tokens": n, "supervised_at_end": contiguous}


def check_template(collator: Collator, sample: Sample) -> dict:
    """Prompt + completion ids equal the processor's ids for the full conversation rendered by the chat template
    (which ends with the end-of-turn token and a newline that is not learned)."""
    enc = collator.encode(sample)
    msgs = sample.messages(with_answer=True)
    for item in msgs[0]["content"]:
        item.pop("image", None)
        item.pop("video", None)
    full = collator.processor.apply_chat_template(msgs, tokenize=False)
    if sample.video is not None:
        video, metadata = collator.read_video(sample)
        ref = collator.processor(text=[full], videos=[video], video_metadata=[metadata], do_sample_frames=False,
                                 max_soft_tokens=collator.video_max_soft_tokens, return_tensors="pt")
    else:
        ref = collator.processor(text=[full], images=[load_frames(sample.frames)],
                                 max_soft_tokens=collator.max_soft_tokens, return_tensors="pt")
    ref_ids = ref["input_ids"][0]
    n = len(enc["input_ids"])
    tail = collator.tokenizer.decode(ref_ids[n:])
    same = bool(len(ref_ids) >= n and (ref_ids[:n] == enc["input_ids"]).all())
    return {"ok": same and tail.strip() == "", "same_prefix": same, "unlearned_tail": tail}


def check_soft_tokens(collator: Collator, sample: Sample) -> dict:
    """Every image run in the input has as many soft tokens as the image processor says for that frame."""
    tok = collator.tokenizer
    enc = collator.encode(sample)
    ids = enc["input_ids"].tolist()
    soft_id = tok.convert_tokens_to_ids("<|video|>" if sample.video is not None else "<|image|>")
    runs, count = [], 0
    for t in ids + [None]:
        if t == soft_id:
            count += 1
        elif count:
            runs.append(count)
            count = 0
    if sample.video is not None:
        # per frame: valid patches in the processor's output / pooling window
        k2 = collator.processor.video_processor.pooling_kernel_size ** 2
        expected = [int((pos >= 0).all(-1).sum()) // k2 for pos in enc["video_position_ids"]]
    else:
        expected = [soft_tokens_per_image(collator.processor, *im.size, collator.max_soft_tokens)
                    for im in load_frames(sample.frames)]
    return {"ok": runs == expected, "runs": runs, "expected": expected}


def check_padding(collator: Collator, samples: list[Sample]) -> dict:
    """In a padded batch every row holds exactly its single-sample ids and labels; padding is masked and unlearned."""
    batch = collator(samples)
    problems = []
    for row, sample in enumerate(samples):
        single = collator.encode(sample)
        keep = batch["attention_mask"][row].bool()
        if not torch.equal(batch["input_ids"][row][keep], single["input_ids"]):
            problems.append(f"row {row}: input ids differ from the single-sample encoding")
        if "labels" in batch:
            if not torch.equal(batch["labels"][row][keep], single["labels"]):
                problems.append(f"row {row}: labels differ from the single-sample encoding")
            if (batch["labels"][row][~keep] != IGNORE_INDEX).any():
                problems.append(f"row {row}: a padding position is supervised")
    return {"ok": not problems, "problems": problems, "shape": tuple(batch["input_ids"].shape),
            "padding_side": collator.padding_side}
