"""Collator: labels cover exactly answer + `<turn|>`, padding on either side leaves every row intact, image soft
tokens match the processor for each budget, and the check_* functions catch planted bugs."""

from __future__ import annotations

from math import isqrt

import pytest
import torch

from actionft.collate import (
    END_OF_TURN,
    IGNORE_INDEX,
    Collator,
    check_labels,
    check_padding,
    check_soft_tokens,
    check_template,
    render_input,
)
from actionft.errors import ActionftError


@pytest.fixture(scope="module")
def collator(processor):
    return Collator(processor, max_soft_tokens=70)


@pytest.fixture(scope="module")
def three(collator, synth_samples):
    """Three samples whose encodings have three different lengths (answers of different token counts)."""
    by_length = {}
    for s in synth_samples:
        by_length.setdefault(len(collator.completion_ids(s)), s)
    assert len(by_length) >= 3, "the generated answers should differ in length"
    return [by_length[n] for n in sorted(by_length)[:3]]


def test_supervised_tokens_are_answer_and_end_of_turn(collator, synth_samples):
    for sample in synth_samples[::9]:  # one per class
        result = check_labels(collator, sample)
        assert result["ok"], result
        assert result["decoded"] == sample.answer + END_OF_TURN
        enc = collator.encode(sample)
        ids, labels = enc["input_ids"], enc["labels"]
        n = len(collator.completion_ids(sample))
        assert result["supervised_tokens"] == n
        assert torch.equal(labels[-n:], ids[-n:])
        assert (labels[:-n] == IGNORE_INDEX).all()
        assert int(ids[-1]) == collator.eot_id
        rendered = render_input(collator.tokenizer, ids, labels)
        assert rendered.endswith("<|turn>model\n[[" + "]][[".join(
            collator.tokenizer.decode([i]) for i in ids[-n:]) + "]]")


def test_prompt_matches_chat_template(collator, synth_samples):
    result = check_template(collator, synth_samples[0])
    assert result["ok"], result
    assert result["same_prefix"] and result["unlearned_tail"].strip() == ""


@pytest.mark.parametrize("padding_side", ["right", "left"])
def test_batch_padding(processor, three, padding_side):
    collator = Collator(processor, max_soft_tokens=70, padding_side=padding_side)
    singles = [collator.encode(s) for s in three]
    lengths = [len(e["input_ids"]) for e in singles]
    assert len(set(lengths)) == 3
    batch = collator(three)
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    assert batch["pixel_values"].shape[0] == 3 * 4  # every frame of every sample
    pad_id = collator.tokenizer.pad_token_id
    for row, (single, k) in enumerate(zip(singles, lengths)):
        real = slice(longest - k, longest) if padding_side == "left" else slice(0, k)
        pad = slice(0, longest - k) if padding_side == "left" else slice(k, longest)
        assert torch.equal(batch["input_ids"][row, real], single["input_ids"])
        assert torch.equal(batch["labels"][row, real], single["labels"])  # padding leaves labels alone
        assert torch.equal(batch["mm_token_type_ids"][row, real], single["mm_token_type_ids"])
        assert (batch["attention_mask"][row, real] == 1).all()
        assert (batch["attention_mask"][row, pad] == 0).all()
        assert (batch["input_ids"][row, pad] == pad_id).all()
        assert (batch["labels"][row, pad] == IGNORE_INDEX).all()
    result = check_padding(collator, three)
    assert result["ok"], result["problems"]
    assert result["padding_side"] == padding_side and result["shape"] == (3, longest)


def test_generation_batch_is_left_padded_prompt_only(processor, three):
    collator = Collator(processor, max_soft_tokens=70, for_generation=True, padding_side="right")
    batch = collator(three)
    assert "labels" not in batch
    assert collator.padding_side == "left"
    assert (batch["attention_mask"][:, -1] == 1).all()  # every prompt ends at the last column
    assert batch["input_ids"].shape[1] == max(len(collator.encode(s)["input_ids"]) for s in three)
    header = collator.tokenizer("<|turn>model\n", add_special_tokens=False)["input_ids"]
    for row in batch["input_ids"]:
        assert row[-len(header):].tolist() == header


@pytest.mark.parametrize("budget", [70, 140, 280])
def test_soft_tokens_per_image(processor, synth_samples, budget):
    collator = Collator(processor, max_soft_tokens=budget)
    result = check_soft_tokens(collator, synth_samples[0])
    assert result["ok"], result
    assert len(result["runs"]) == 4
    # frames are square: the processor picks the largest k x k grid of pooled patches within the budget
    assert result["runs"] == [isqrt(budget) ** 2] * 4


def test_video_sample_checks(processor, synth_dataset):
    from actionft.data import load_dataset

    video = load_dataset(synth_dataset / "data_video.json", synth_dataset, progress=False)[0]
    collator = Collator(processor, max_soft_tokens=70, video_max_soft_tokens=70)
    labels = check_labels(collator, video)
    soft = check_soft_tokens(collator, video)
    assert labels["ok"], labels
    assert soft["ok"] and len(soft["runs"]) == collator.num_frames and all(r > 0 for r in soft["runs"]), soft


def test_unsupported_budget_is_clear_error(processor):
    with pytest.raises(ActionftError, match="max_soft_tokens must be one of"):
        Collator(processor, max_soft_tokens=100)


# -- planted bugs: the checks must be able to fail ------------------------------------------------------------
class ShiftedLabels(Collator):
    """Labels one position early: the classic off-by-one of doing the causal shift twice."""

    def encode(self, sample):
        enc = super().encode(sample)
        labels = torch.full_like(enc["labels"], IGNORE_INDEX)
        labels[:-1] = enc["labels"][1:]
        return {**enc, "labels": labels}


class NoGenerationHeader(Collator):
    """Forgets `add_generation_prompt`: the answer follows the user turn without `<|turn>model`."""

    def prompt_text(self, sample):
        msgs = sample.messages(with_answer=False)
        for item in msgs[0]["content"]:
            item.pop("image", None)
        return self.processor.apply_chat_template(msgs, add_generation_prompt=False, tokenize=False)


class SupervisedPadding(Collator):
    """Pads labels with the pad id instead of -100, so the model would learn to emit padding."""

    def pad(self, encoded):
        batch = super().pad(encoded)
        batch["labels"][batch["attention_mask"] == 0] = self.tokenizer.pad_token_id
        return batch


def test_planted_label_shift_is_caught(processor, synth_samples):
    result = check_labels(ShiftedLabels(processor, max_soft_tokens=70), synth_samples[0])
    assert not result["ok"]
    assert result["decoded"] != result["expected"]


def test_planted_missing_header_is_caught(processor, synth_samples):
    result = check_template(NoGenerationHeader(processor, max_soft_tokens=70), synth_samples[0])
    assert not result["ok"] and not result["same_prefix"]


def test_planted_supervised_padding_is_caught(processor, three):
    result = check_padding(SupervisedPadding(processor, max_soft_tokens=70), three)
    assert not result["ok"]
    assert any("padding position is supervised" in p for p in result["problems"])


def test_planted_budget_mismatch_is_caught(processor, synth_samples):
    collator = Collator(processor, max_soft_tokens=70)
    collator.encode = Collator(processor, max_soft_tokens=140).encode  # encodes with another budget
    result = check_soft_tokens(collator, synth_samples[0])
    assert not result["ok"] and result["runs"] != result["expected"]
