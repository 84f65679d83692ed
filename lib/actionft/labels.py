"""Label sets: the classes of a closed-set evaluation, the answer each class is scored as, and the words that name
it in a free-form answer. They come from the data, never from code:

* a class-list file, one name per line (`params/labels/kinetics400.txt`, `kinetics600.txt`, `kinetics700.txt`);
  every class is scored as `template` filled with its name (default "The video shows {label}.");
* a label CSV with a `label` column and optional `answer` (a template per class) and `synonyms` (phrases separated
  by `;`) columns; an answer may name metadata columns of the clip, e.g. "The {object} grows." (the generated
  dataset writes such a `labels.csv` beside its metadata);
* without a file, the distinct labels of the dataset's metadata, scored with `template`.
"""

from __future__ import annotations

import csv
import string
from dataclasses import dataclass, field
from pathlib import Path

from actionft.data import Sample
from actionft.errors import ActionftError

DEFAULT_TEMPLATE = "The video shows {label}."
LABELS_FILE = "labels.csv"  # looked for beside the metadata CSV when no label set is given


def display_name(label: str) -> str:
    """How a class name reads in a sentence: underscores become spaces ("move_left" -> "move left")."""
    return label.replace("_", " ")


@dataclass
class LabelSet:
    """Classes in a fixed order, the answer template of each, and the phrases that name each."""

    classes: list[str]
    answers: dict[str, str] = field(default_factory=dict)
    synonyms: dict[str, list[str]] = field(default_factory=dict)
    source: str = "the dataset's metadata"

    def __post_init__(self):
        seen = set()
        for c in self.classes:
            if not c or not c.strip():
                raise ActionftError(f"{self.source}: an empty class name; remove the blank entry")
            if c in seen:
                raise ActionftError(f"{self.source}: class {c!r} is listed twice; keep one")
            seen.add(c)
        if not self.classes:
            raise ActionftError(f"{self.source}: no classes; give one class name per line")
        for c in self.classes:
            self.answers.setdefault(c, DEFAULT_TEMPLATE)
            self.synonyms[c] = list(self.synonyms.get(c) or [display_name(c)])

    def __len__(self) -> int:
        return len(self.classes)

    @classmethod
    def from_classes(cls, classes, template: str | None = None, source: str = "the dataset's metadata") -> LabelSet:
        """Every class scored as `template` (default "The video shows {label}.")."""
        classes = list(classes)
        return cls(classes, {c: template or DEFAULT_TEMPLATE for c in classes}, {}, source)

    def answer(self, label: str, sample: Sample | None = None) -> str:
        """The answer scored for `label`: its template filled with the label and the clip's metadata."""
        template = self.answers[label]
        fields = {**((sample.meta if sample else None) or {}), "label": display_name(label)}
        try:
            return template.format_map(fields)
        except KeyError as err:
            clip = f"clip {sample.clip_id}" if sample else "a clip without metadata"
            raise ActionftError(f"{self.source}: the answer {template!r} of class {label!r} names the metadata "
                                f"column {err.args[0]!r}, which {clip} lacks; add the column to the metadata CSV "
                                "or use {label} only") from None
        except (ValueError, IndexError) as err:
            raise ActionftError(f"{self.source}: the answer {template!r} of class {label!r} is not a valid "
                                f"template ({err}); write placeholders as {{label}} or {{column}}") from None

    def candidates(self, sample: Sample) -> list[str]:
        """One answer per class, in class order, for this clip."""
        return [self.answer(c, sample) for c in self.classes]

    def answer_class(self, answer: str) -> str | None:
        """The single class a free-form answer names (None if it names none or several)."""
        from actionft.metrics import mentions_label

        named = [c for c in self.classes
                 if mentions_label(answer, self.synonyms[c][0], {self.synonyms[c][0]: self.synonyms[c][1:]})]
        return named[0] if len(named) == 1 else None

    def mentions(self, answer: str, label: str) -> bool:
        """Does a free-form answer name `label` (or one of its synonyms)?"""
        from actionft.metrics import mentions_label

        phrases = self.synonyms[label]
        return mentions_label(answer, phrases[0], {phrases[0]: phrases[1:]})

    def check_covers(self, samples: list[Sample]) -> None:
        """Every labelled clip's label must be a class of the set."""
        known = set(self.classes)
        for s in samples:
            if s.label and s.label not in known:
                raise ActionftError(f"clip {s.clip_id} has label {s.label!r}, which is not in {self.source} "
                                    f"({len(self.classes)} classes); add it there or fix the metadata")

    def write(self, path: str | Path) -> Path:
        """Save as a label CSV (label, answer, synonyms) that `read_label_set` reads back."""
        path = Path(path)
        with path.open("w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["label", "answer", "synonyms"])
            for c in self.classes:
                writer.writerow([c, self.answers[c], ";".join(self.synonyms[c])])
        return path


def _check_template(template: str, where: str) -> None:
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise ActionftError(f"{where}: {template!r} is not a valid answer template ({err})") from None
    if any(not n or not n.isidentifier() for n in names):
        raise ActionftError(f"{where}: {template!r} has an unnamed or odd placeholder; use {{label}} or {{column}}")


def read_label_set(path: str | Path, template: str | None = None) -> LabelSet:
    """A class-list file (one name per line; blank lines and lines starting with # skipped) or a label CSV
    (`label` column, optional `answer` and `synonyms`)."""
    path = Path(path)
    if not path.is_file():
        raise ActionftError(f"label set {path} does not exist; give a class-list file (one name per line, e.g. "
                            "params/labels/kinetics400.txt) or a CSV with a 'label' column")
    source = f"label set {path}"
    if template is not None:
        _check_template(template, "label_template")
    if path.suffix.lower() != ".csv":
        lines = path.read_text(encoding="utf-8").splitlines()
        classes = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        return LabelSet.from_classes(classes, template, source)
    with path.open(newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        if not reader.fieldnames or "label" not in reader.fieldnames:
            raise ActionftError(f"{source} needs a 'label' column (optional: answer, synonyms)")
        classes, answers, synonyms = [], {}, {}
        for n, row in enumerate(reader, start=2):
            label = (row.get("label") or "").strip()
            if not label:
                raise ActionftError(f"{source}, line {n}: empty label; fill it in or delete the line")
            classes.append(label)
            answer = (row.get("answer") or "").strip() or template or DEFAULT_TEMPLATE
            _check_template(answer, f"{source}, line {n}")
            answers[label] = answer
            words = [w.strip() for w in (row.get("synonyms") or "").split(";") if w.strip()]
            if words:
                synonyms[label] = words
    return LabelSet(classes, answers, synonyms, source)


def combine(sets: list[LabelSet]) -> LabelSet:
    """Several label sets as one, classes in order (e.g. a dataset's own classes + Kinetics-400 as distractors)."""
    classes, answers, synonyms, where = [], {}, {}, {}
    for ls in sets:
        for c in ls.classes:
            if c in where:
                raise ActionftError(f"class {c!r} is in both {where[c]} and {ls.source}; keep it in one")
            where[c] = ls.source
            classes.append(c)
            answers[c], synonyms[c] = ls.answers[c], ls.synonyms[c]
    return LabelSet(classes, answers, synonyms, " + ".join(ls.source for ls in sets))


def dataset_label_set(samples: list[Sample], metadata_path: str | Path | None = None,
                      label_set: str | Path | list | None = None, template: str | None = None) -> LabelSet | None:
    """The label set of an evaluation: `label_set` if given (a file, or a list of files combined), else `labels.csv`
    beside the metadata, else the distinct labels of `samples` (pass every split, so classes absent from the test
    split still compete); None when no sample has a label. The held-out clips' labels must all be classes of the set
    (checked by the caller)."""
    from actionft.paths import resolve_path

    if isinstance(label_set, (list, tuple)):
        return combine([read_label_set(resolve_path(f), template) for f in label_set]) if label_set else None
    if label_set:
        return read_label_set(resolve_path(label_set), template)
    if metadata_path:
        beside = resolve_path(metadata_path).parent / LABELS_FILE
        if beside.is_file():
            return read_label_set(beside, template)
    labels = sorted({s.label for s in samples if s.label})
    return LabelSet.from_classes(labels, template) if labels else None
