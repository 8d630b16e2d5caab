"""User tasks from a file: JSONL (items only) or YAML (settings plus items).

**JSONL** (``.jsonl``): one JSON object per line, one item each; blank lines are skipped. The task
is named after the file stem; its kind is ``multiple_choice`` if the first item has ``choices``,
else ``generate``; every other setting is the :class:`~lmforge.eval.task.Task` default::

    {"question": "2 + 2 =", "choices": ["3", "4", "5"], "answer": 1}
    {"question": "The capital of France is", "choices": ["Paris", "Rome"], "answer": "Paris"}
    {"question": "1 + 1 =", "choices": ["2", "3"], "answer": 0, "split": "train"}

Item fields:

* ``question`` (string, required): the text the template fills in (the text scored, for perplexity).
* ``choices`` (list of distinct strings, multiple choice only; at least two).
* ``answer``: multiple choice: the index of the right choice (from 0) or its text; generate: the
  expected reply (a string; a number is turned into one). Required except for perplexity, which
  takes none.
* ``aliases`` (list of strings): other accepted replies (generate).
* ``group`` (string): a group for fairness metrics.
* ``id`` (string or integer): default: the line number (JSONL) or ``items[i]``'s index (YAML);
  ids must be unique in the file.
* ``split``: ``"test"`` (default) or ``"train"`` (a source of few-shot examples only).
* Any other key goes to the item's ``meta`` and may be named by the template (``{passage}``).

**YAML** (``.yaml``/``.yml``): a mapping of task settings and items::

    name: capitals                  # default: the file stem
    kind: multiple_choice           # multiple_choice | generate | perplexity; default: inferred
    description: "Answer with the capital city.\\n\\n"
    template: "Q: What is the capital of {country}?\\nA:"
    target_delimiter: " "
    fewshot_delimiter: "\\n\\n"
    num_fewshot: 1
    stop: ["\\n"]                    # generate: a string or a list of strings
    max_new_tokens: 16
    answer_pattern: "([A-Z]\\\\w+)"   # generate: flexible extraction, the first group of the last match
    metrics: [acc, aurc]            # added to the kind's defaults: rouge, bleu, chrf (generate), aurc
    language: en
    chat: false                     # true: asked in the model's chat format (lmforge eval --chat auto)
    items:                          # or  data: capitals.jsonl  (relative to this file)
      - {question: France, country: France, choices: [Paris, Rome], answer: Paris}
    train_items:                    # or  train_data: capitals_train.jsonl; optional
      - {question: Italy, country: Italy, choices: [Paris, Rome], answer: 1}

A Hugging Face dataset (needs ``datasets`` and a network) stands in for ``data``/``train_data``::

    hf_data: hf:allenai/ai2_arc:ARC-Easy:test       # hf:NAME[:CONFIG]:SPLIT, streamed
    hf_train_data: hf:allenai/ai2_arc:ARC-Easy:train
    fields: {question: question, choices: choices.text, answer: answerKey, id: id}
    max_items: 500                                  # per split (default 1000)

``fields`` maps item fields to columns (dotted paths reach nested ones); an answer that is a letter
(A, B, ...) not among the choices names a choice by position.

Without ``kind`` the kind is inferred as for JSONL. Without ``train_items``/``train_data`` (and no
item with ``split: train``) nothing is held out: ``num_fewshot`` above 0 is then an error.

Every mistake raises :class:`~lmforge.errors.InputError` naming the file, the place (``line 4`` of
a JSONL file, ``items[3]`` of a YAML one) and the field: a missing ``question``, an ``answer``
index out of range or not among the choices, a wrong type, invalid JSON or YAML, an unknown kind
or YAML key, an empty file, a template naming a field an item lacks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lmforge.errors import InputError
from lmforge.eval.task import EXTRA_METRICS, KINDS, METRICS, Item, Task
from lmforge.files import read_text

ITEM_FIELDS = ("question", "choices", "answer", "aliases", "group", "id", "split")
# YAML setting -> the types it may have (str settings are plain strings).
SETTINGS: dict[str, tuple[type, ...]] = {
    "name": (str,), "kind": (str,), "template": (str,), "target_delimiter": (str,),
    "fewshot_delimiter": (str,), "description": (str,), "num_fewshot": (int,), "stop": (str, list),
    "max_new_tokens": (int,), "answer_pattern": (str,), "metrics": (str, list), "language": (str,),
    "chat": (bool,),
}
DATA_KEYS = ("items", "data", "train_items", "train_data", "hf_data", "hf_train_data", "fields", "max_items")
YAML_KEYS = (*SETTINGS, *DATA_KEYS)


def _type_name(value) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _string_list(value, where: str, field: str) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise InputError(f"{where}: field {field!r} must be a list of strings, got {_type_name(value)}")
    return tuple(value)


def parse_item(record, kind: str, where: str, default_id: str) -> tuple[Item, str]:
    """``(item, split)`` from one item mapping; ``where`` names the file and line for errors."""
    if not isinstance(record, dict):
        raise InputError(f"{where}: an item must be a mapping (JSON object), got {_type_name(record)}")
    if "question" not in record:
        raise InputError(f"{where}: field 'question' is missing")
    question = record["question"]
    if not isinstance(question, str):
        raise InputError(f"{where}: field 'question' must be a string, got {_type_name(question)}")

    choices: tuple[str, ...] = ()
    if "choices" in record:
        if kind != "multiple_choice":
            raise InputError(f"{where}: field 'choices' is only for multiple_choice tasks; this task is {kind}")
        choices = _string_list(record["choices"], where, "choices")
        if len(choices) < 2:
            raise InputError(f"{where}: field 'choices' needs at least 2 choices, got {len(choices)}")
        if len(set(choices)) < len(choices):
            raise InputError(f"{where}: field 'choices' has a duplicate choice")
    elif kind == "multiple_choice":
        raise InputError(f"{where}: field 'choices' is missing (the task is multiple_choice)")

    answer = record.get("answer")
    if kind == "perplexity":
        if "answer" in record:
            raise InputError(f"{where}: field 'answer' is not used by perplexity tasks (the question is scored)")
    elif "answer" not in record:
        raise InputError(f"{where}: field 'answer' is missing")
    elif kind == "multiple_choice":
        if isinstance(answer, str):
            if answer not in choices:
                raise InputError(f"{where}: field 'answer': {answer!r} is not one of the choices {list(choices)}")
            answer = choices.index(answer)
        elif isinstance(answer, int) and not isinstance(answer, bool):
            if not 0 <= answer < len(choices):
                raise InputError(f"{where}: field 'answer': answer {answer} is out of range for "
                                 f"{len(choices)} choices (indices start at 0)")
        else:
            raise InputError(f"{where}: field 'answer' must be a choice index or a choice's text, "
                             f"got {_type_name(answer)}")
    elif isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    elif not isinstance(answer, str):
        raise InputError(f"{where}: field 'answer' must be a string, got {_type_name(answer)}")

    aliases = _string_list(record["aliases"], where, "aliases") if "aliases" in record else ()
    group = record.get("group")
    if group is not None and not isinstance(group, str):
        raise InputError(f"{where}: field 'group' must be a string, got {_type_name(group)}")
    item_id = record.get("id", default_id)
    if isinstance(item_id, bool) or not isinstance(item_id, (str, int)):
        raise InputError(f"{where}: field 'id' must be a string or an integer, got {_type_name(item_id)}")
    split = record.get("split", "test")
    if split not in ("test", "train"):
        raise InputError(f"{where}: field 'split' must be 'test' or 'train', got {split!r}")
    meta = {key: value for key, value in record.items() if key not in ITEM_FIELDS}
    return Item(str(item_id), question, choices, answer, aliases, group, meta), split


def _read_jsonl(path: Path) -> list[tuple[dict, str, str]]:
    """``(record, where, default id)`` per non-blank line of a JSONL file."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise InputError(f"{path}: cannot read: {error.strerror or error}") from None
    except UnicodeDecodeError as error:
        raise InputError(f"{path}: not UTF-8 text: {error.reason}") from None
    records = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}, line {number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{where}: invalid JSON: {error.msg} (column {error.colno})") from None
        records.append((record, where, str(number)))
    if not records:
        raise InputError(f"{path}: the file is empty (no items)")
    return records


def _infer_kind(first) -> str:
    return "multiple_choice" if isinstance(first, dict) and "choices" in first else "generate"


def _items(entries, kind: str, forced_split: str | None = None) -> list[tuple[Item, str]]:
    parsed = []
    for record, where, default_id in entries:
        item, split = parse_item(record, kind, where, default_id)
        if forced_split == "train" and split == "test" and isinstance(record, dict) and "split" in record:
            raise InputError(f"{where}: field 'split' is 'test' but the item is in the train items")
        parsed.append((item, forced_split or split))
    return parsed


def _yaml_entries(value, path: Path, key: str, id_prefix: str) -> list[tuple[dict, str, str]]:
    if not isinstance(value, list):
        raise InputError(f"{path}: {key!r} must be a list of items, got {_type_name(value)}")
    return [(record, f"{path}, {key}[{i}]", f"{id_prefix}{i}") for i, record in enumerate(value)]


def _data_entries(value, path: Path, key: str) -> list[tuple[dict, str, str]]:
    if not isinstance(value, str):
        raise InputError(f"{path}: {key!r} must be the path of a .jsonl file, got {_type_name(value)}")
    data = path.parent / value
    if data.suffix != ".jsonl":
        raise InputError(f"{path}: {key!r} must name a .jsonl file, got {value!r}")
    if not data.is_file():
        raise InputError(f"{path}: {key!r}: file not found: {data}")
    return _read_jsonl(data)


def _hf_entries(spec: dict, path: Path, key: str) -> list[tuple[dict, str, str]]:
    """Items from a Hugging Face dataset (``hf:NAME[:CONFIG]:SPLIT``, streamed, at most ``max_items``),
    each record's columns renamed to item fields by ``fields`` (dotted paths reach nested columns;
    an answer that is a letter A, B, ... names a choice by position)."""
    from lmforge.data.sources import iter_hf_records
    from lmforge.eval.task import LETTERS

    fields = spec.get("fields") or {}
    if not isinstance(fields, dict) or not all(isinstance(v, str) for v in fields.values()):
        raise InputError(f"{path}: 'fields' must map item fields to dataset columns, e.g. "
                         "{question: question, choices: choices.text, answer: answerKey}")
    limit = spec.get("max_items", 1000)
    if not isinstance(limit, int) or isinstance(limit, bool) or limit < 1:
        raise InputError(f"{path}: 'max_items' must be a positive integer, got {limit!r}")
    entries = []
    for where, record in iter_hf_records(spec[key]):
        item = dict(record) if isinstance(record, dict) else {"question": record}
        for name, column in fields.items():
            value = record
            for part in column.split("."):
                if not isinstance(value, dict) or part not in value:
                    raise InputError(f"{path}: {key} {where}: no column {column!r} (for field {name!r}); "
                                     f"columns: {', '.join(map(str, record))}")
                value = value[part]
            item[name] = value
        answer, choices = item.get("answer"), item.get("choices")
        if isinstance(answer, str) and isinstance(choices, list) and answer not in choices \
                and len(answer) == 1 and answer in LETTERS[: len(choices)]:
            item["answer"] = LETTERS.index(answer)
        item = {k: v for k, v in item.items() if k in ITEM_FIELDS or k in fields or isinstance(v, (str, int, float))}
        entries.append((item, f"{path}, {where}", where.rsplit(":", 1)[-1]))
        if len(entries) >= limit:
            break
    return entries


def _settings(spec: dict, path: Path) -> dict:
    """The Task keyword arguments of a YAML spec, checked."""
    settings = {}
    for key, types in SETTINGS.items():
        if key not in spec:
            continue
        value = spec[key]
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join({str: "a string", int: "an integer", list: "a list of strings",
                                  bool: "true or false"}[t] for t in types)
            raise InputError(f"{path}: {key!r} must be {wanted}, got {_type_name(value)}")
        if key in ("stop", "metrics"):
            value = (value,) if isinstance(value, str) else _string_list(value, str(path), key)
        if key in ("num_fewshot", "max_new_tokens") and value < (0 if key == "num_fewshot" else 1):
            raise InputError(f"{path}: {key!r} must be {'>= 0' if key == 'num_fewshot' else '>= 1'}, got {value}")
        if key == "answer_pattern":
            try:
                re.compile(value)
            except re.error as error:
                raise InputError(f"{path}: 'answer_pattern' is not a valid regular expression: {error}") from None
        settings[key] = value
    return settings


def _load_yaml(path: Path) -> tuple[dict, list[tuple[Item, str]]]:
    import yaml

    try:
        spec = yaml.safe_load(read_text(path, "task file"))
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark is not None else ""
        raise InputError(f"{path}: invalid YAML{at}: {getattr(error, 'problem', None) or error}") from None
    if spec is None:
        raise InputError(f"{path}: the file is empty")
    if not isinstance(spec, dict):
        raise InputError(f"{path}: expected a mapping of task settings, got {_type_name(spec)}")
    unknown = sorted(str(key) for key in spec if key not in YAML_KEYS)
    if unknown:
        raise InputError(f"{path}: unknown key {unknown[0]!r}; known keys: {', '.join(YAML_KEYS)}")
    settings = _settings(spec, path)
    for keys in (("items", "data", "hf_data"), ("train_items", "train_data", "hf_train_data")):
        given = [k for k in keys if k in spec]
        if len(given) > 1:
            raise InputError(f"{path}: give one of {', '.join(map(repr, keys))}, not {' and '.join(given)}")
    if "items" in spec:
        entries = _yaml_entries(spec["items"], path, "items", "")
    elif "data" in spec:
        entries = _data_entries(spec["data"], path, "data")
    elif "hf_data" in spec:
        entries = _hf_entries(spec, path, "hf_data")
    else:
        raise InputError(f"{path}: no items: give 'items' (a list), 'data' (a .jsonl file) or 'hf_data' "
                         "(hf:NAME[:CONFIG]:SPLIT)")
    if not entries:
        raise InputError(f"{path}: 'items' is empty")
    train_entries = []
    if "train_items" in spec:
        train_entries = _yaml_entries(spec["train_items"], path, "train_items", "train-")
    elif "train_data" in spec:
        train_entries = _data_entries(spec["train_data"], path, "train_data")
    elif "hf_train_data" in spec:
        train_entries = [(r, w, f"train-{i}") for r, w, i in _hf_entries(spec, path, "hf_train_data")]
    kind = settings.setdefault("kind", _infer_kind(entries[0][0]))
    _check_kind(kind, path)
    for metric in settings.get("metrics", ()):
        if metric not in METRICS:
            raise InputError(f"{path}: 'metrics': unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        if EXTRA_METRICS.get(metric, kind) != kind:
            raise InputError(f"{path}: 'metrics': {metric!r} is for {EXTRA_METRICS[metric]} tasks; this task is {kind}")
    return settings, _items(entries, kind) + _items(train_entries, kind, forced_split="train")


def _check_kind(kind: str, path: Path) -> None:
    if kind not in KINDS:
        raise InputError(f"{path}: 'kind': unknown kind {kind!r}; known kinds: {', '.join(KINDS)}")


def load_task_file(path: str | Path) -> Task:
    """The task in a ``.jsonl``, ``.yaml`` or ``.yml`` file (see the module docstring for the format)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".yaml", ".yml"):
        raise InputError(f"{path}: a task file must end in .jsonl, .yaml or .yml")
    if not path.is_file():
        raise InputError(f"{path}: task file not found")
    if path.suffix == ".jsonl":
        entries = _read_jsonl(path)
        settings = {"kind": _infer_kind(entries[0][0])}
        items = _items(entries, settings["kind"])
    else:
        settings, items = _load_yaml(path)
    seen: dict[str, Item] = {}
    for item, _ in items:
        if item.id in seen:
            raise InputError(f"{path}: item id {item.id!r} is used twice")
        seen[item.id] = item
    test = [item for item, split in items if split == "test"]
    train = [item for item, split in items if split == "train"]
    if not test:
        raise InputError(f"{path}: no test items (every item has split: train)")
    task = Task(name=settings.pop("name", path.stem), test=test, train=train, source=str(path), **settings)
    if task.num_fewshot > len(train):
        raise InputError(f"{path}: 'num_fewshot' is {task.num_fewshot} but the file has {len(train)} train "
                         f"items; add train_items, train_data or items with split: train")
    for item in [*test, *train]:
        try:
            task.render(item)
        except ValueError as error:
            raise InputError(f"{path}: 'template' cannot be filled in for item {item.id!r}: {error}") from None
    return task
