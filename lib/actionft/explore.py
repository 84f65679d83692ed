"""Dataset statistics for notebook 01: splits, answers, frame sizes, sequence lengths, duplicates and anomalies."""

from __future__ import annotations

import hashlib
import re
from collections import Counter, defaultdict
from functools import lru_cache

from actionft.data import Sample

WORD = re.compile(r"[a-z0-9']+")


def split_counts(samples: list[Sample]) -> dict[str, int]:
    counts = Counter(s.split for s in samples)
    return {name: counts.get(name, 0) for name in ("train", "val", "test")}


def label_split_table(samples: list[Sample]) -> dict[str, dict[str, int]]:
    """{label: {split: count}} (empty when the dataset has no labels)."""
    table: dict[str, dict[str, int]] = defaultdict(lambda: {"train": 0, "val": 0, "test": 0})
    for s in samples:
        if s.label:
            table[s.label][s.split] += 1
    return dict(sorted(table.items()))


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


def answer_word_counts(samples: list[Sample]) -> list[int]:
    return [len(words(s.answer)) for s in samples]


def word_frequencies(samples: list[Sample], top: int = 20) -> list[tuple[str, int]]:
    return Counter(w for s in samples for w in words(s.answer)).most_common(top)


def frame_sizes(samples: list[Sample]) -> Counter:
    """Counter of (width, height) over every frame (reads image headers only)."""
    from PIL import Image

    sizes: Counter = Counter()
    for s in samples:
        for p in s.frames:
            with Image.open(p) as im:
                sizes[im.size] += 1
    return sizes


def token_lengths(processor, samples: list[Sample], budgets=(70, 140, 280, 560, 1120)) -> dict[int, list[int]]:
    """Sequence length (prompt with expanded frames + answer + end of turn) per sample under each budget.

    Counted without building pixel tensors: text tokens + per frame (begin + soft tokens + end), the soft-token count
    taken from the image processor for the frame's size. Notebook 03 checks it against the collator.
    """
    from PIL import Image

    from actionft.collate import Collator, soft_tokens_per_image

    collator = Collator(processor, max_soft_tokens=budgets[0])
    image_token = processor.tokenizer.convert_tokens_to_ids(processor.image_token)

    @lru_cache(maxsize=None)
    def soft(size: tuple[int, int], budget: int) -> int:
        return soft_tokens_per_image(processor, size[0], size[1], budget)

    @lru_cache(maxsize=None)
    def prompt_tokens(text: str) -> int:
        ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
        return len(ids) - ids.count(image_token)  # placeholders are replaced by the expansion below

    out: dict[int, list[int]] = {b: [] for b in budgets}
    for s in samples:
        sizes = []
        for p in s.frames:
            with Image.open(p) as im:
                sizes.append(im.size)
        text_len = prompt_tokens(collator.prompt_text(s)) + len(collator.completion_ids(s))
        for b in budgets:
            out[b].append(text_len + sum(2 + soft(size, b) for size in sizes))
    return out


def frame_hash(path) -> str:
    with open(path, "rb") as fh:
        return hashlib.sha1(fh.read()).hexdigest()


def anomalies(samples: list[Sample], min_words: int = 3, max_words: int = 60) -> dict[str, list]:
    """Things worth a look: repeated clips or frames, frozen clips, very short or long answers, odd characters."""
    by_clip = Counter(s.clip_id for s in samples)
    by_frame: dict[str, list[int]] = defaultdict(list)
    frozen = []
    for s in samples:
        hashes = [frame_hash(p) for p in s.frames]
        for h in hashes:
            by_frame[h].append(s.index)
        if len(hashes) > 1 and len(set(hashes)) == 1:
            frozen.append(s.index)
    answers = Counter(s.answer for s in samples)
    return {
        "clips_in_several_records": sorted(c for c, n in by_clip.items() if n > 1),
        "frames_shared_between_records": sorted({tuple(sorted(set(v))) for v in by_frame.values() if len(set(v)) > 1}),
        "frozen_clips (all frames identical)": frozen,
        "short_answers": [s.index for s in samples if len(words(s.answer)) < min_words],
        "long_answers": [s.index for s in samples if len(words(s.answer)) > max_words],
        "non_ascii_answers": [s.index for s in samples if not s.answer.isascii()],
        "most_repeated_answers": [(a, n) for a, n in answers.most_common(5) if n > 1],
    }
