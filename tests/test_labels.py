"""Label sets as data (class-list files, label CSVs, the metadata), metrics and plots at hundreds of classes, and a
closed-set evaluation over 400 labels on the generated clips."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from actionft.errors import ActionftError
from actionft.labels import DEFAULT_TEMPLATE, LabelSet, dataset_label_set, read_label_set

REPO = Path(__file__).resolve().parents[1]
KINETICS = {400: REPO / "params/labels/kinetics400.txt", 600: REPO / "params/labels/kinetics600.txt",
            700: REPO / "params/labels/kinetics700.txt"}


@pytest.mark.parametrize("n", sorted(KINETICS))
def test_kinetics_class_lists(n):
    labels = read_label_set(KINETICS[n])
    assert len(labels) == n and labels.classes == sorted(labels.classes)
    assert labels.answer("abseiling") == "The video shows abseiling."
    assert labels.answer_class("someone is abseiling down a cliff") == "abseiling"


def test_class_list_file(tmp_path):
    f = tmp_path / "classes.txt"
    f.write_text("# my classes\nplaying_guitar\n\n  riding a bike \n")
    labels = read_label_set(f, template="A person is {label}.")
    assert labels.classes == ["playing_guitar", "riding a bike"]
    assert labels.answer("playing_guitar") == "A person is playing guitar."
    assert labels.synonyms["playing_guitar"] == ["playing guitar"]
    assert read_label_set(f).answers["riding a bike"] == DEFAULT_TEMPLATE
    f.write_text("a\nb\na\n")
    with pytest.raises(ActionftError, match=r"class 'a' is listed twice"):
        read_label_set(f)
    f.write_text("# nothing\n\n")
    with pytest.raises(ActionftError, match="no classes"):
        read_label_set(f)
    with pytest.raises(ActionftError, match="does not exist"):
        read_label_set(tmp_path / "missing.txt")


def test_label_csv_answers_use_metadata(tmp_path, synth_samples):
    f = tmp_path / "labels.csv"
    f.write_text('label,answer,synonyms\ngrow,The {object} grows.,grows;bigger\nspin,,spins\n')
    labels = read_label_set(f)
    clip = synth_samples[0]
    assert labels.answer("grow", clip) == f"The {clip.meta['object']} grows."
    assert labels.answer("spin", clip) == "The video shows spin."
    assert labels.answer_class("it gets bigger") == "grow" and labels.answer_class("it spins and grows") is None
    with pytest.raises(ActionftError, match=r"names the metadata column 'object', which clip x lacks"):
        from actionft.data import Sample

        labels.answer("grow", Sample(0, "x", "q", "a"))
    f.write_text("name\nx\n")
    with pytest.raises(ActionftError, match="needs a 'label' column"):
        read_label_set(f)
    f.write_text("label,answer\nx,The {} moves.\n")
    with pytest.raises(ActionftError, match="line 2"):
        read_label_set(f)


def test_where_the_label_set_comes_from(tmp_path, synth_dataset, synth_samples):
    """A given file wins, then labels.csv beside the metadata (the generated dataset writes one), then the labels."""
    from actionft.synth import CLASSES

    beside = dataset_label_set(synth_samples, synth_dataset / "metadata.csv")
    assert beside.classes == list(CLASSES) and "{object}" in beside.answers["grow"]
    given = dataset_label_set(synth_samples, synth_dataset / "metadata.csv", KINETICS[400])
    assert len(given) == 400
    plain = dataset_label_set(synth_samples, tmp_path / "metadata.csv", template="It does {label}.")
    assert plain.classes == sorted(CLASSES) and plain.answer("move_left") == "It does move left."
    assert dataset_label_set([s for s in synth_samples if False]) is None
    both = dataset_label_set(synth_samples, None, [synth_dataset / "labels.csv", KINETICS[400]])
    assert len(both) == 409 and both.classes[:9] == list(CLASSES) and "{object}" in both.answers["grow"]
    both.check_covers(synth_samples)
    with pytest.raises(ActionftError, match="class 'abseiling' is in both"):
        dataset_label_set(synth_samples, None, [KINETICS[400], KINETICS[600]])
    with pytest.raises(ActionftError, match=r"has label 'grow', which is not in label set .*kinetics400"):
        given.check_covers(synth_samples)


def test_metrics_and_plot_at_700_classes():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from actionft import metrics

    classes = read_label_set(KINETICS[700]).classes
    truth = [classes[i % 700] for i in range(1400)]
    pred = list(truth)
    for i in range(0, 700, 7):  # one of the two clips of every 7th class is taken for the next class
        pred[i] = classes[i + 1]
    pred[5] = pred[705] = classes[9]  # both clips of class 5 are taken for class 9
    table = metrics.per_class_table(truth, pred, classes)
    assert len(table) == 700 and table[0]["accuracy"] == 0.5 and table[1]["accuracy"] == 1.0
    assert table[5] == {"class": classes[5], "n": 2, "correct": 0, "accuracy": 0.0, "most_confused_with": classes[9]}
    top = metrics.top_confusions(truth, pred, n=5)
    assert top[0] == {"true": classes[5], "predicted": classes[9], "count": 2, "share": 1.0}
    assert top[1] == {"true": classes[0], "predicted": classes[1], "count": 1, "share": 0.5}  # ties by name
    assert len(top) == 5 and len(metrics.top_confusions(truth, pred, n=1000)) == 101
    cm = metrics.confusion_matrix(truth, pred, classes)
    ax = metrics.plot_confusion(cm, classes)
    assert len(ax.get_xticklabels()) == 30 and "30 of 700" in ax.get_title()
    assert {classes[5], classes[9]} <= {t.get_text() for t in ax.get_yticklabels()}  # the most errors
    # a few classes occur among hundreds: only those are drawn
    few = metrics.confusion_matrix(classes[:3] * 2, [classes[0], classes[2], classes[2]] * 2, classes)
    ax = metrics.plot_confusion(few, classes)
    assert [t.get_text() for t in ax.get_xticklabels()] == classes[:3] and "3 of 700" in ax.get_title()
    plt.close("all")


def test_evaluate_checks_the_label_set_before_loading_a_model(tmp_path, synth_dataset, monkeypatch):
    """A missing file, a set without the clips' labels, an answer naming an absent column: one line, no model."""
    from actionft import infer, train
    from actionft.evaluate import run_evaluation

    params = {"model_id": "tiny", "data_path": str(synth_dataset / "data.json"), "image_folder": str(synth_dataset),
              "metadata_path": str(synth_dataset / "metadata.csv"), "max_soft_tokens": 70, "bf16": False,
              "lora_r": 4}
    train.build_model(train.resolve_config(params)).save_pretrained(tmp_path / "adapter")

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the label set was checked")

    monkeypatch.setattr(infer, "load_for_inference", no_model)
    odd = tmp_path / "odd.csv"
    odd.write_text("label,answer\n" + "".join(f"{c},The {{size}} {c}.\n" for c in read_label_set(
        synth_dataset / "labels.csv").classes))
    for label_set, words in ((tmp_path / "missing.txt", "does not exist"),
                             (KINETICS[400], "has label 'grow', which is not in label set"),
                             (odd, "names the metadata column 'size'")):
        with pytest.raises(ActionftError, match=words) as err:
            run_evaluation({**params, "label_set": str(label_set)}, tmp_path / "adapter", tmp_path / "out",
                           progress=False)
        assert "\n" not in str(err.value)


@pytest.mark.slow
def test_evaluate_400_labels_end_to_end(tmp_path, synth_dataset):
    """`run_evaluation` over the 9 demo classes + 391 Kinetics-400 names: metrics.json, per-class, confusions, plot.
    The adapter is untrained LoRA with random weights (so the two models differ); about 3 minutes on one core."""
    import torch

    from actionft import train
    from actionft.evaluate import run_evaluation
    from actionft.synth import label_set

    demo = label_set()
    extra = [c for c in read_label_set(KINETICS[400]).classes][:391]
    labels = LabelSet(demo.classes + extra, dict(demo.answers), dict(demo.synonyms), "test")
    labels.write(tmp_path / "labels400.csv")
    params = {"model_id": "tiny", "data_path": str(synth_dataset / "data.json"), "image_folder": str(synth_dataset),
              "metadata_path": str(synth_dataset / "metadata.csv"), "max_soft_tokens": 70, "bf16": False,
              "per_device_eval_batch_size": 16, "label_set": str(tmp_path / "labels400.csv"), "lora_r": 8}
    torch.manual_seed(0)
    model = train.build_model(train.resolve_config(params))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    out = run_evaluation(params, tmp_path / "adapter", tmp_path / "eval", progress=False)
    assert out["classes"] == 400 and out["n"] == 9
    for name in ("base", "finetuned"):
        assert 0 <= out[name]["top1"] <= out[name]["top5"] <= 1
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written == json.loads(json.dumps(out))
    per_class = json.loads((tmp_path / "eval" / "per_class.json").read_text())
    assert len(per_class["finetuned"]) == 400
    rows = json.loads((tmp_path / "eval" / "per_sample.json").read_text())
    assert all(r["predicted"] in labels.classes and len(r["ranked"]) == 5 for r in rows)
    assert (tmp_path / "eval" / "confusion.png").stat().st_size > 10_000
    json.loads((tmp_path / "eval" / "confusions.json").read_text())
