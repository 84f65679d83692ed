"""Closed-set scoring: the prefix-shared method (frames + prompt once, candidates as continuations of its cache)
gives the same log-likelihoods as one full forward pass per candidate.

Tolerance: both methods run in float32 on CPU; a score is a sum of 5-40 token log-probabilities of magnitude up
to ~200, and the two methods add up attention in different orders and shapes (left-padded batch vs cache +
continuation), so they agree to about 1e-4 (measured); the tests allow an absolute 2e-3 and demand the same ranking.
"""

from __future__ import annotations

import pytest
import torch

from actionft.infer import score_candidates

TOL = 2e-3
KINETICS = ["abseiling", "air drumming", "answering questions", "applauding", "applying cream", "archery",
            "arm wrestling", "arranging flowers", "assembling computer", "auctioning"]


@pytest.fixture(scope="module")
def model():
    from actionft.modeling import load_model

    torch.manual_seed(0)
    return load_model("tiny").eval()


@pytest.fixture(scope="module")
def clips(synth_samples):
    return [s for s in synth_samples if s.split == "test"][:2]


def candidate_lists(processor, clips):
    """Answers of very different token lengths: the demo's sentences, Kinetics names in a template, a bare word."""
    from actionft.synth import CLASSES

    lists = []
    for clip in clips:
        obj = clip.meta["object"]
        answers = [CLASSES[c].answer(obj) for c in ("grow", "move_left", "change_colour")]
        answers += [f"The video shows {k}." for k in KINETICS[:6]] + ["grow"]
        lists.append(answers)
    lengths = {len(processor.tokenizer(a, add_special_tokens=False)["input_ids"]) for a in lists[0]}
    assert len(lengths) >= 4, lengths  # the point of the test: candidates of different lengths in one batch
    return lists


def compare(full, prefix):
    diff = max(abs(a - b) for fr, pr in zip(full, prefix) for a, b in zip(fr, pr))
    print(f"max |score diff| = {diff:.2e}")
    assert diff <= TOL
    for fr, pr in zip(full, prefix):
        assert sorted(range(len(fr)), key=lambda i: -fr[i]) == sorted(range(len(pr)), key=lambda i: -pr[i])
    return diff


def test_prefix_scores_equal_full_pass(model, processor, clips):
    cands = candidate_lists(processor, clips)
    kw = dict(max_soft_tokens=70, progress=False)
    full = score_candidates(model, processor, clips, cands, method="full", **kw)
    prefix = score_candidates(model, processor, clips, cands, method="prefix", **kw)
    compare(full, prefix)
    # chunks of 3 candidates (and a last chunk of 1) on copies of the same cache give the same scores
    small = score_candidates(model, processor, clips, cands, method="prefix", candidate_batch_size=3, **kw)
    assert max(abs(a - b) for x, y in zip(prefix, small) for a, b in zip(x, y)) <= TOL


def test_shared_leading_tokens_and_single_candidate(model, processor, clips):
    """All candidates share "The video shows" (it joins the prefix); a single candidate keeps its last token."""
    clip = clips[:1]
    cands = [[f"The video shows {k}." for k in KINETICS]]
    kw = dict(max_soft_tokens=70, progress=False)
    compare(score_candidates(model, processor, clip, cands, method="full", **kw),
            score_candidates(model, processor, clip, cands, method="prefix", **kw))
    one = [["The video shows archery."]]
    compare(score_candidates(model, processor, clip, one, method="full", **kw),
            score_candidates(model, processor, clip, one, method="prefix", **kw))


def test_prefix_longer_than_sliding_window(processor, clips):
    """With a 32-token window the ~290-token prefix overflows the sliding layers' cache: still the same scores."""
    from transformers import AutoConfig, Gemma4ForConditionalGeneration

    from actionft.modeling import resolve_model_id

    config = AutoConfig.from_pretrained(resolve_model_id("tiny"))
    config.text_config.sliding_window = 32
    small_window = Gemma4ForConditionalGeneration.from_pretrained(resolve_model_id("tiny"), config=config).eval()
    assert small_window.config.text_config.num_kv_shared_layers > 0  # K/V-shared layers are in play too
    cands = candidate_lists(processor, clips[:1])
    kw = dict(max_soft_tokens=70, progress=False)
    full = score_candidates(small_window, processor, clips[:1], cands, method="full", **kw)
    compare(full, score_candidates(small_window, processor, clips[:1], cands, method="prefix", **kw))
    # and the window matters: the same model with the packaged 512-token window scores differently
    from actionft.modeling import load_model

    wide = score_candidates(load_model("tiny").eval(), processor, clips[:1], cands, method="full", **kw)
    assert max(abs(a - b) for a, b in zip(full[0], wide[0])) > 10 * TOL


def test_bad_arguments(model, processor, clips):
    from actionft.errors import ActionftError

    with pytest.raises(ActionftError, match="scoring method"):
        score_candidates(model, processor, clips[:1], [["a"]], method="fast", progress=False)
    with pytest.raises(ActionftError, match="one list per sample"):
        score_candidates(model, processor, clips[:1], [["a"], ["b"]], progress=False)
    with pytest.raises(ActionftError, match="no candidate answers"):
        score_candidates(model, processor, clips[:1], [[]], progress=False)


def test_prefix_scores_equal_full_pass_with_a_lora_adapter(processor, clips):
    """Base + LoRA (random non-zero B, so the adapter changes every projection) as evaluation loads it: a PeftModel."""
    from actionft import train

    cfg = train.resolve_config({"model_id": "tiny", "synth": True, "lora_r": 4, "lora_dropout": 0.0, "bf16": False,
                                "gradient_checkpointing": False})
    torch.manual_seed(1)
    peft_model = train.build_model(cfg)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    peft_model.eval()
    cands = candidate_lists(processor, clips[:1])
    kw = dict(max_soft_tokens=70, progress=False)
    compare(score_candidates(peft_model, processor, clips[:1], cands, method="full", **kw),
            score_candidates(peft_model, processor, clips[:1], cands, method="prefix", **kw))
