"""run_evaluation (what `actionft evaluate` and notebook 06 run) applies every evaluation parameter. The models are
stand-ins: answers and rankings come from the clips themselves, so these tests load no weights."""

from __future__ import annotations

import json

import pytest

from actionft import evaluate, infer
from actionft.evaluate import run_evaluation


@pytest.fixture
def calls(monkeypatch):
    """Stand-ins for the heavy calls; records the clips and settings generation got."""
    seen: dict = {"max_new_tokens": set(), "splits": set()}
    monkeypatch.setattr(infer, "check_adapter", lambda model_id, adapter: "adapter")
    # the base model is None, the fine-tuned one the adapter's path
    monkeypatch.setattr(infer, "load_for_inference", lambda model_id, adapter, **kw: (adapter, None))

    def answers(model, processor, clips, max_new_tokens, **kw):
        seen["max_new_tokens"].add(max_new_tokens)
        seen["splits"] |= {c.split for c in clips}
        return [c.answer if model else "A grey square stays still." for c in clips]

    def ranked(model, processor, clips, labels, max_soft_tokens, topk=5, **kw):
        return [([c.label] if model else []) + [x for x in labels.classes if model is None or x != c.label][
            : topk - (1 if model else 0)] for c in clips]

    monkeypatch.setattr(infer, "generate_answers", answers)
    monkeypatch.setattr(evaluate, "closed_set_predictions", ranked)
    return seen


def params_for(dataset, **more):
    return {"model_id": "tiny", "data_path": str(dataset / "data.json"), "image_folder": str(dataset),
            "metadata_path": str(dataset / "metadata.csv"), "max_soft_tokens": 70, **more}


def test_semantic_false_scores_no_semantic_similarity(tmp_path, synth_dataset, calls):
    out = run_evaluation(params_for(synth_dataset, semantic=False), tmp_path / "adapter", tmp_path / "out",
                         progress=False)
    assert "semantic" not in out["base"] and "semantic" not in out["finetuned"]
    assert out["finetuned"]["top1"] == 1.0 and out["finetuned"]["rouge_l"] > out["base"]["rouge_l"]
    rows = json.loads((tmp_path / "out" / "per_sample.json").read_text())
    assert all(r["semantic"] is None and r["finetuned_semantic"] is None for r in rows)
    assert not (tmp_path / "out" / "examples.json").exists()  # n_examples unset: the CLI writes what it always did


def test_split_max_new_tokens_and_examples_apply(tmp_path, synth_dataset, calls):
    params = params_for(synth_dataset, semantic=False, eval_split="val", max_new_tokens=7, n_examples=2)
    out = run_evaluation(params, tmp_path / "adapter", tmp_path / "out", progress=False)
    assert calls["max_new_tokens"] == {7} and calls["splits"] == {"val"} and out["n"] == 9
    examples = json.loads((tmp_path / "out" / "examples.json").read_text())
    assert examples["ranked_by"] == "rouge_l" and len(examples["best"]) == len(examples["worst"]) == 2
    assert examples["best"][0]["finetuned_rouge_l"] >= examples["worst"][0]["finetuned_rouge_l"]
    # the split argument (`actionft evaluate --split`) wins over eval_split
    run_evaluation(params, tmp_path / "adapter", tmp_path / "out2", split="test", progress=False)
    assert calls["splits"] == {"val", "test"}


def test_defaults_when_unset(tmp_path, synth_dataset, calls):
    assert evaluate.evaluation_settings({})["eval_split"] == "test"
    run_evaluation(params_for(synth_dataset, semantic=False), tmp_path / "adapter", tmp_path / "out",
                   progress=False)
    assert calls["max_new_tokens"] == {40} and calls["splits"] == {"test"}
