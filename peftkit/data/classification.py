"""Sequence-classification data: `{"text", "label"}` records (JSONL, JSON, CSV, Parquet).

Labels are names (strings; numbers are read as their text). The label set comes from the
training file, sorted (integer labels by value: labels 0..N-1 keep their own numbers as ids), so the same file
always gives the same ids; eval and held-out labels
must be among them. The mapping is stored in the run directory and the model config.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from peftkit.config.schema import ColumnsConfig, DataConfig, Recipe
from peftkit.data.columns import record_keys
from peftkit.data.files import data_sources, read_records
from peftkit.data.formats import bad_records_error
from peftkit.errors import DataError, RunDirError
from peftkit.utils.once import say_once

LABELS_FILE = "labels.json"
TASK = "sequence_classification"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabeledText:
    where: str
    text: str
    label: str


@dataclass
class ClassificationData:
    labels: list[str]
    """Label names by id."""
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    heldout: list[dict[str, Any]]
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def label2id(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.labels)}


def load_labeled(source: str | Path | Sequence[str | Path], columns: ColumnsConfig | None = None) -> list[LabeledText]:
    """`{text, label}` records; `columns` (the recipe's `data.columns`) may name other fields. A source that no record
    of fits the map but `{text, label}` does (a `data.eval` file beside mapped training data) is read as it is, as
    chat data is. All of a file's bad records are named in one error."""
    mapped = (columns.text if columns and columns.text else "text", columns.label if columns and columns.label else "label")
    items = []
    for one in data_sources(source):
        records = read_records(Path(one))
        fields = mapped
        if mapped != ("text", "label") and not any(_has(record, mapped) for _, record in records) \
                and any(_has(record, ("text", "label")) for _, record in records):
            fields = ("text", "label")
            say_once(log, logging.INFO, f"{one}: no record has the fields data.columns names, so it was read as "
                     "`text` / `label` records (the map reads the recipe's other data)")
        found, problems = _labeled_records(records, fields, hinted=columns is None)
        if problems:
            raise bad_records_error(one, problems, len(found))
        items.extend(found)
    if not items:
        raise DataError(f"data {', '.join(map(str, data_sources(source)))} contains no examples")
    return items


def _has(record: Any, fields: tuple[str, str]) -> bool:
    return isinstance(record, dict) and all(field in record for field in fields)


def _labeled_records(records: list[tuple[str, Any]], fields: tuple[str, str], hinted: bool
                     ) -> tuple[list[LabeledText], list[tuple[str, str]]]:
    """The labelled texts of one file's records, and each bad record's place and message."""
    text_field, label_field = fields
    hint = "; map other field names with data.columns, e.g. `{text: sentence, label: sentiment}`" if hinted else ""
    items, problems = [], []
    for where, record in records:
        if not _has(record, fields):
            problems.append((where, f"{where}: classification records need `{text_field}` and `{label_field}` "
                                    f"(found: {record_keys(record)}){hint}"))
            continue
        text, label = record[text_field], record[label_field]
        if not isinstance(text, str) or not text.strip():
            problems.append((where, f"{where}: `{text_field}` must be a non-empty string"))
        elif isinstance(label, bool) or not isinstance(label, (str, int)) or not str(label).strip():
            problems.append((where, f"{where}: `{label_field}` must be a non-empty string (a label name) or an integer"))
        else:
            items.append(LabeledText(where, text, str(label).strip()))
    return items, problems


def label_names(items: list[LabeledText]) -> list[str]:
    """Sorted; integer labels by value, so that label `2` gets id 2 (as text, `10` would sort before it)."""
    names = sorted({item.label for item in items})
    if all(name.isascii() and name.lstrip("-").isdigit() for name in names):
        names.sort(key=int)
    if len(names) < 2:
        raise DataError(f"the training data has a single label ({names[0]!r}); classification needs at least two")
    _warn_case_variants(items, names)
    return names


_WARNED_VARIANTS: set[str] = set()


def _warn_case_variants(items: list[LabeledText], names: list[str]) -> None:
    """Labels are kept as written (`A` and `a` may be different codes), so `pos` and `POS` are two classes: say so,
    since it is far more often one class written two ways."""
    spellings: dict[str, list[str]] = {}
    for name in names:
        spellings.setdefault(" ".join(name.split()).casefold(), []).append(name)
    variants = [group for group in spellings.values() if len(group) > 1]
    if not variants:
        return
    counts = Counter(item.label for item in items)
    named = "; ".join(" / ".join(f"{name!r} ({counts[name]})" for name in group) for group in variants)
    if named not in _WARNED_VARIANTS:  # validation and training both read the labels
        _WARNED_VARIANTS.add(named)
        log.warning("training labels that differ only in case or spacing are separate classes: %s. If each group is "
                    "one class, write its label one way in the data (the run trains a head with %d classes)",
                    named, len(names))


def check_labels(items: list[LabeledText], labels: list[str], what: str) -> None:
    unknown = sorted({item.label for item in items} - set(labels))
    if unknown:
        first = next(item for item in items if item.label in unknown)
        raise DataError(
            f"{first.where}: {what} label(s) {', '.join(map(repr, unknown))} do not occur in the training data "
            f"(its labels: {', '.join(labels)})"
        )


def check_classification_data(cfg: DataConfig) -> list[str]:
    """Validation (no tokenizer): files readable, records well-formed, label sets consistent."""
    problems = []
    try:
        train = load_labeled(cfg.train, cfg.columns)
        labels = label_names(train)
    except DataError as exc:
        return [f"data.train: {exc}"]
    for key in ("eval", "heldout"):
        path = getattr(cfg, key)
        if path is None:
            continue
        try:
            check_labels(load_labeled(path, cfg.columns), labels, key)
        except DataError as exc:
            problems.append(f"data.{key}: {exc}")
    return problems


def tokenize_labeled(
    items: list[LabeledText], tokenizer: Any, label2id: dict[str, int], max_seq_len: int, input_names: set[str] | None = None
) -> list[dict[str, Any]]:
    """`input_names`: the model's accepted inputs (a Llama takes no token_type_ids; BERT does)."""
    if not items:
        return []
    encoded = tokenizer([item.text for item in items], truncation=True, max_length=max_seq_len)
    rows = []
    for i, item in enumerate(items):
        row = {key: values[i] for key, values in encoded.items() if input_names is None or key in input_names}
        row["labels"] = label2id[item.label]
        rows.append(row)
    return rows


def cut_texts(items: list[LabeledText], rows: list[dict[str, Any]], tokenizer: Any, max_seq_len: int) -> list[LabeledText]:
    """The texts that `tokenize_labeled` cut at `max_seq_len`: only rows filling it whole are tokenized again."""
    full = [item for item, row in zip(items, rows) if len(row["input_ids"]) >= max_seq_len]
    if not full:
        return []
    lengths = tokenizer([item.text for item in full], truncation=False, verbose=False)["input_ids"]
    return [item for item, ids in zip(full, lengths) if len(ids) > max_seq_len]


def _warn_cut(what: str, cut: list[LabeledText], total: int, max_seq_len: int) -> None:
    if cut:
        log.warning("%d of %d %s text(s) are longer than data.max_seq_len=%d tokens: the classifier sees only their "
                    "first %d tokens (first: %s). Raise data.max_seq_len if the label depends on the rest",
                    len(cut), total, what, max_seq_len, max_seq_len, cut[0].where)


def general_inputs(tokenizer: Any, max_seq_len: int) -> list[dict[str, Any]]:
    """The built-in general set's prompts as plain text: what a classifier's backbone was good at before
    tuning (calibration for knowledge-preserving inits such as `corda_kpm`; only the inputs matter)."""
    from peftkit.data.replay import BUILTIN_PREFIX, load_replay

    texts = [next(m["content"] for m in e.messages if m["role"] == "user")
             for e in load_replay(f"{BUILTIN_PREFIX}general") if e.messages]
    return [{"input_ids": ids} for ids in tokenizer(texts, truncation=True, max_length=max_seq_len)["input_ids"]]


def labeled_train_eval(cfg: DataConfig, seed: int, items: list[LabeledText] | None = None
                       ) -> tuple[list[LabeledText], list[LabeledText]]:
    """The training and eval examples: `data.eval`'s file, or a seeded split of the training file (`items`, when
    already read)."""
    from peftkit.data.build import split_train_eval

    items = load_labeled(cfg.train, cfg.columns) if items is None else items
    if cfg.eval:
        return items, load_labeled(cfg.eval, cfg.columns)
    return split_train_eval(items, cfg.eval_fraction, seed, cfg.max_eval_examples)  # type: ignore[arg-type]


def build_classification_data(
    cfg: DataConfig, tokenizer: Any, seed: int = 42, input_names: set[str] | None = None, labels: list[str] | None = None
) -> ClassificationData:
    """`labels`: the ids a resumed run started with (the data's own `label_names` otherwise)."""
    from peftkit.data.build import warn_duplicates

    items = load_labeled(cfg.train, cfg.columns)
    labels = labels or label_names(items)
    train_items, eval_items = labeled_train_eval(cfg, seed, items)
    warn_duplicates(items, train_items, eval_items, split=not cfg.eval)
    heldout_items = load_labeled(cfg.heldout, cfg.columns) if cfg.heldout else []
    check_labels(eval_items, labels, "eval")
    check_labels(heldout_items, labels, "heldout")
    label2id = {name: i for i, name in enumerate(labels)}
    data = ClassificationData(
        labels,
        tokenize_labeled(train_items, tokenizer, label2id, cfg.max_seq_len, input_names),
        tokenize_labeled(eval_items, tokenizer, label2id, cfg.max_seq_len, input_names),
        tokenize_labeled(heldout_items, tokenizer, label2id, cfg.max_seq_len, input_names),
    )
    cut: dict[str, list[LabeledText]] = {}
    for what, split_items, rows in (("training", train_items, data.train), ("eval", eval_items, data.eval),
                                    ("held-out", heldout_items, data.heldout)):
        cut[what] = cut_texts(split_items, rows, tokenizer, cfg.max_seq_len)
        _warn_cut(what, cut[what], len(split_items), cfg.max_seq_len)
    counts = {name: sum(item.label == name for item in train_items) for name in labels}
    untrained = [name for name, count in counts.items() if count == 0]
    if untrained and not cfg.eval:  # the split drew every example of these labels (a resumed run's old labels too)
        log.warning("label(s) %s have no training example: the eval split drew all of them, so the classifier "
                    "cannot learn them. Add examples (a few per label at least), fix a misspelt label, or give "
                    "data.eval a file of its own", ", ".join(repr(name) for name in untrained))
    data.stats = {
        "train_rows": len(data.train),
        "eval_rows": len(data.eval),
        "heldout_rows": len(data.heldout),
        "train_label_counts": counts,
        "train_tokens": sum(len(r["input_ids"]) for r in data.train),
        "train_truncated": len(cut["training"]),
    }
    return data


# Reloading a classification run (peftkit.runs.load_run).


def label_config(model: Any, labels: list[str], pad_token_id: int | None) -> None:
    """id2label/label2id in the model config; decoder models need pad_token_id to find the last token."""
    config = model.config
    config.id2label = dict(enumerate(labels))
    config.label2id = {name: i for i, name in enumerate(labels)}
    if getattr(config, "pad_token_id", None) is None and pad_token_id is not None:
        config.pad_token_id = pad_token_id


def read_labels(run_dir: Path) -> list[str]:
    path = run_dir / LABELS_FILE
    if not path.is_file():
        raise RunDirError(f"{run_dir} is a classification run without {LABELS_FILE}; it may not have finished")
    data = json.loads(path.read_text(encoding="utf-8"))
    return [data["id2label"][str(i)] for i in range(len(data["id2label"]))]


def load_kwargs(run_dir: Path, recipe: Recipe) -> dict[str, Any]:
    """Extra `load_model` arguments that rebuild a run's model (task head and label count)."""
    if getattr(recipe, "task", "causal_lm") != TASK:
        return {}
    return {"task": TASK, "num_labels": len(read_labels(run_dir))}


def finish_loaded_model(model: Any, run_dir: Path, recipe: Recipe, tokenizer: Any) -> None:
    """Label names and pad id on a reloaded classification model (a peft base config lacks them)."""
    if getattr(recipe, "task", "causal_lm") != TASK:
        return
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    label_config(base, read_labels(run_dir), tokenizer.pad_token_id)
