"""Human evaluation: answers to rate, raters' 1-5 scores on six criteria, a report, preference pairs.

    store = RatingStore("ratings.sqlite")
    store.add_item("What is 2+2?", "4", "5", model_a="sft", model_b="base")
    shown = store.next_item("alice")             # blinded: the rater sees answers "left" and "right"
    store.rate(shown.token, {"left": {...six criteria...}, "right": {...}}, preference="left")
    print(format_report(human_report(store)))
    export_preferences(store, "prefs.jsonl")     # {"prompt", "chosen", "rejected", ...} per line

An item holds one answer (scored alone) or two (scored side by side, and a preference picked).
A pair is shown in an order drawn per rater and item and recorded with the rating, so the client
only ever names positions ("left", "right"); the store translates them back to the stored answers
``a`` and ``b`` before anything is written. Model names never leave the store through
:meth:`RatingStore.next_item`.

The store is one SQLite file (stdlib ``sqlite3``, WAL journal): one connection shared by the
server's threads behind a lock, each write one transaction.

Left out on purpose: assigning items so that every item gets k raters (each rater sees every item,
in an order of their own), and rater-clustered intervals (the report's intervals treat ratings as
independent; with few raters they are too narrow).
"""

from __future__ import annotations

import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from lmforge.data.jsonl import iter_records
from lmforge.errors import InputError
from lmforge.files import database_errors, write_text_atomic

CRITERIA = ("accuracy", "relevance", "fluency", "transparency", "safety", "human_alignment")
SCALE = (1, 5)  # every score is an integer in this closed range
POSITIONS = ("left", "right")  # what a rater sees; a single answer is shown "left"
PREFERENCES = ("left", "right", "tie")
MAX_RATER_LENGTH = 100

_SCHEMA = """
CREATE TABLE IF NOT EXISTS items (
    id INTEGER PRIMARY KEY, prompt TEXT NOT NULL, answer_a TEXT NOT NULL, answer_b TEXT,
    model_a TEXT NOT NULL, model_b TEXT, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS assignments (
    token TEXT PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), rater TEXT NOT NULL,
    left_answer TEXT NOT NULL CHECK (left_answer IN ('a', 'b')), created REAL NOT NULL,
    UNIQUE (item_id, rater));
CREATE TABLE IF NOT EXISTS ratings (
    id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id), rater TEXT NOT NULL,
    assignment TEXT NOT NULL REFERENCES assignments(token),
    left_answer TEXT NOT NULL CHECK (left_answer IN ('a', 'b')),
    preference TEXT CHECK (preference IN ('a', 'b', 'tie')), comment TEXT NOT NULL DEFAULT '',
    created REAL NOT NULL, UNIQUE (item_id, rater));
CREATE TABLE IF NOT EXISTS scores (
    rating_id INTEGER NOT NULL REFERENCES ratings(id), answer TEXT NOT NULL CHECK (answer IN ('a', 'b')),
    criterion TEXT NOT NULL, score INTEGER NOT NULL CHECK (score BETWEEN 1 AND 5),
    PRIMARY KEY (rating_id, answer, criterion));
"""


class UnknownAssignment(LookupError):
    """The assignment token names nothing this store handed out."""


class AlreadyRated(ValueError):
    """This rater has rated this item already (one rating per rater and item)."""


@dataclass(frozen=True)
class Item:
    id: int
    prompt: str
    answer_a: str
    answer_b: str | None  # None: a single answer, scored alone
    model_a: str
    model_b: str | None
    created: float

    @property
    def is_pair(self) -> bool:
        return self.answer_b is not None

    def answer(self, side: str) -> str:
        return self.answer_a if side == "a" else self.answer_b

    def model(self, side: str) -> str:
        return self.model_a if side == "a" else self.model_b


@dataclass(frozen=True)
class Assignment:
    """One item handed to one rater. ``left``: the stored answer ("a" or "b") shown on the left."""

    token: str
    item: Item
    rater: str
    left: str

    def side(self, position: str) -> str:
        """The stored answer ("a"/"b") at a shown position ("left"/"right")."""
        return self.left if position == "left" else _other(self.left)

    def blinded(self) -> dict:
        """What the rater may see: the prompt and the answers by position, no models, no item id."""
        answers = {"left": self.item.answer(self.side("left"))}
        if self.item.is_pair:
            answers["right"] = self.item.answer(self.side("right"))
        return {"assignment": self.token, "kind": "pair" if self.item.is_pair else "single",
                "prompt": self.item.prompt, "answers": answers}


@dataclass(frozen=True)
class Rating:
    """One rater's judgment of one item, in terms of the stored answers."""

    id: int
    item: Item
    rater: str
    left: str  # the stored answer that was shown on the left
    scores: dict[str, dict[str, int]]  # {"a": {criterion: score}, "b": {...}} ("b" only for pairs)
    preference: str | None  # "a", "b", "tie"; None for a single answer
    comment: str
    created: float


def _other(side: str) -> str:
    return "b" if side == "a" else "a"


def _rank(*parts: object) -> str:
    """A stable pseudo-random key: the order of items for a rater, and which side is shown left."""
    return hashlib.sha256("\x1f".join(map(str, parts)).encode()).hexdigest()


def _text(record: dict, key: str, required: bool = True) -> str | None:
    value = record.get(key)
    if value is None and not required:
        return None
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{key}: must be a non-empty string")
    return value


def item_fields(record: dict) -> dict:
    """``add_item``'s arguments from a record: ``{"prompt", "answer_a", "answer_b"?, "model_a"?, "model_b"?}``,
    or ``{"prompt", "answers": [one or two], "models": [as many]?}``, or ``{"prompt", "answer", "model"?}``."""
    if not isinstance(record, dict):
        raise ValueError("item: a JSON object with a prompt and one or two answers")
    prompt = _text(record, "prompt")
    if "answers" in record:
        answers, models = record["answers"], record.get("models") or []
        if not isinstance(answers, list) or len(answers) not in (1, 2) or \
                not all(isinstance(a, str) and a.strip() for a in answers):
            raise ValueError("answers: must be a list of one or two non-empty strings")
        if not isinstance(models, list) or len(models) not in (0, len(answers)) or \
                not all(isinstance(m, str) for m in models):
            raise ValueError("models: must be a list of strings, one per answer")
        models = models or ["unknown"] * len(answers)
        return {"prompt": prompt, "answer_a": answers[0], "answer_b": answers[1] if len(answers) == 2 else None,
                "model_a": models[0], "model_b": models[1] if len(models) == 2 else None}
    single = "answer" in record
    answer_a = _text(record, "answer" if single else "answer_a")
    answer_b = None if single else _text(record, "answer_b", required=False)
    model_a = record.get("model" if single else "model_a") or "unknown"
    model_b = record.get("model_b") or ("unknown" if answer_b is not None else None)
    if not isinstance(model_a, str) or not (model_b is None or isinstance(model_b, str)):
        raise ValueError("models: model names must be strings")
    return {"prompt": prompt, "answer_a": answer_a, "answer_b": answer_b, "model_a": model_a, "model_b": model_b}


def check_rater(rater: object) -> str:
    if not isinstance(rater, str) or not rater.strip():
        raise ValueError("rater: give a rater id (a non-empty string)")
    if len(rater.strip()) > MAX_RATER_LENGTH:
        raise ValueError(f"rater: the id is longer than {MAX_RATER_LENGTH} characters")
    return rater.strip()


def _check_scores(position: str, scores: object) -> dict[str, int]:
    if not isinstance(scores, dict):
        raise ValueError(f"scores.{position}: give an object of criterion to score")
    unknown = [c for c in scores if c not in CRITERIA]
    if unknown:
        raise ValueError(f"scores.{position}: unknown criterion {unknown[0]!r}; the criteria are {', '.join(CRITERIA)}")
    missing = [c for c in CRITERIA if c not in scores]
    if missing:
        raise ValueError(f"scores.{position}: missing {', '.join(missing)}")
    for criterion, score in scores.items():
        if isinstance(score, bool) or not isinstance(score, int) or not SCALE[0] <= score <= SCALE[1]:
            raise ValueError(f"scores.{position}.{criterion}: {score!r} is not an integer from {SCALE[0]} to {SCALE[1]}")
    return dict(scores)


def _schema_differences(db: sqlite3.Connection) -> list[str]:
    """How the tables of ``db`` differ from :data:`_SCHEMA`'s (a damaged file can rename a column)."""
    expected = sqlite3.connect(":memory:")
    expected.executescript(_SCHEMA)
    tables = [row[0] for row in expected.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
    found = []
    for table in tables:
        columns = [row[1:3] for row in db.execute(f"PRAGMA table_info({table})")]
        if columns != [row[1:3] for row in expected.execute(f"PRAGMA table_info({table})")]:
            found.append(f"table {table} has columns {[name for name, _ in columns]}")
    expected.close()
    return found


class RatingStore:
    """Items to rate and their ratings, in one SQLite file (``":memory:"`` for a throwaway one)."""

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._lock = threading.Lock()
        with database_errors(self.path, "ratings database"):
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.row_factory = sqlite3.Row
            self._db.create_function("rank_for", 2, lambda rater, item: _rank(rater, item), deterministic=True)
            with self._lock:
                self._db.execute("PRAGMA journal_mode=WAL")
                self._db.execute("PRAGMA foreign_keys=ON")
                self._db.executescript(_SCHEMA)
                damage = [row[0] for row in self._db.execute("PRAGMA quick_check") if row[0] != "ok"]
                damage += _schema_differences(self._db)
                damage += [f"{row[0]} row {row[1]} points at a missing {row[2]} row"
                           for row in self._db.execute("PRAGMA foreign_key_check")]
        if damage:
            self._db.close()
            raise InputError(f"{self.path}: the ratings database is damaged: {'; '.join(damage[:3])}")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _write(self, statements):
        """Run ``statements(db)`` as one transaction under the lock; returns its result."""
        with self._lock, database_errors(self.path, "ratings database"):
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = statements(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result

    def _read(self, sql: str, args: Sequence = ()) -> list[sqlite3.Row]:
        with self._lock, database_errors(self.path, "ratings database"):
            return self._db.execute(sql, args).fetchall()

    # ---- items -----------------------------------------------------------------------------------

    def add_item(self, prompt: str, answer_a: str, answer_b: str | None = None, model_a: str = "unknown",
                 model_b: str | None = None) -> int:
        """Add an item (two answers: a pair to compare); returns its id."""
        fields = item_fields({"prompt": prompt, "answer_a": answer_a, "answer_b": answer_b,
                              "model_a": model_a, "model_b": model_b})
        return self._write(lambda db: db.execute(
            "INSERT INTO items (prompt, answer_a, answer_b, model_a, model_b, created) VALUES (?, ?, ?, ?, ?, ?)",
            (*fields.values(), time.time())).lastrowid)

    def import_jsonl(self, path: str | Path) -> int:
        """Add an item per line of a JSONL file (formats: :func:`item_fields`), all or none; returns how many
        were new. An item already stored (same prompt, answers and models) is not added again, so the
        same file can be given at every server start."""
        records = []
        for record, where in iter_records(path):
            try:
                records.append(item_fields(record))
            except ValueError as err:
                raise InputError(f"{where}: {err}") from err
        stored = {(i.prompt, i.answer_a, i.answer_b, i.model_a, i.model_b) for i in self.items()}
        fresh = list(dict.fromkeys(tuple(r.values()) for r in records if tuple(r.values()) not in stored))
        now = time.time()
        self._write(lambda db: db.executemany(
            "INSERT INTO items (prompt, answer_a, answer_b, model_a, model_b, created) VALUES (?, ?, ?, ?, ?, ?)",
            [(*r, now) for r in fresh]))
        return len(fresh)

    def items(self) -> list[Item]:
        return [Item(**row) for row in self._read("SELECT * FROM items ORDER BY id")]

    def item(self, item_id: int) -> Item:
        rows = self._read("SELECT * FROM items WHERE id = ?", (item_id,))
        if not rows:
            raise LookupError(f"no item {item_id}")
        return Item(**rows[0])

    # ---- rating ----------------------------------------------------------------------------------

    def next_item(self, rater: str) -> Assignment | None:
        """An item ``rater`` has not rated yet (None when none is left), the same one until it is rated.
        Items come in an order of the rater's own (a hash of rater and item id, so stable as items are
        added); a pair's left/right order is drawn the same way and recorded with the assignment."""
        rater = check_rater(rater)

        def assign(db: sqlite3.Connection) -> Assignment | None:
            row = db.execute("SELECT * FROM items WHERE id NOT IN (SELECT item_id FROM ratings WHERE rater = ?) "
                             "ORDER BY rank_for(?, id) LIMIT 1", (rater, rater)).fetchone()
            if row is None:
                return None
            item = Item(**row)
            held = db.execute("SELECT token, left_answer FROM assignments WHERE item_id = ? AND rater = ?",
                              (item.id, rater)).fetchone()
            if held:
                return Assignment(held["token"], item, rater, held["left_answer"])
            left = "a" if not item.is_pair or int(_rank(rater, item.id, "left")[-1], 16) % 2 == 0 else "b"
            token = secrets.token_urlsafe(16)
            db.execute("INSERT INTO assignments (token, item_id, rater, left_answer, created) VALUES (?, ?, ?, ?, ?)",
                       (token, item.id, rater, left, time.time()))
            return Assignment(token, item, rater, left)

        return self._write(assign)

    def assignment(self, token: str) -> Assignment:
        rows = self._read("SELECT * FROM assignments WHERE token = ?", (token,))
        if not rows:
            raise UnknownAssignment(f"assignment: no assignment {token!r}; ask for the next item first")
        row = rows[0]
        return Assignment(row["token"], self.item(row["item_id"]), row["rater"], row["left_answer"])

    def progress(self, rater: str) -> tuple[int, int]:
        """(items ``rater`` has rated, items in the store)."""
        rows = self._read("SELECT (SELECT COUNT(*) FROM ratings WHERE rater = ?), (SELECT COUNT(*) FROM items)",
                          (check_rater(rater),))
        return rows[0][0], rows[0][1]

    def rate(self, assignment: str, scores: dict[str, dict[str, int]], preference: str | None = None,
             comment: str = "", rater: str | None = None) -> Rating:
        """Record a rating given in shown positions: ``scores = {"left": {criterion: 1..5}, "right": ...}``
        (six criteria per shown answer; "right" only for a pair), ``preference`` "left"/"right"/"tie"
        (pairs only). Stored un-blinded: in terms of answers "a" and "b". ``rater``, when given, must be
        the rater the assignment went to. Raises ValueError (AlreadyRated) or UnknownAssignment."""
        held = self.assignment(assignment)
        if rater is not None and check_rater(rater) != held.rater:
            raise ValueError(f"rater: this assignment went to another rater, not {rater.strip()!r}")
        positions = POSITIONS if held.item.is_pair else POSITIONS[:1]
        if not isinstance(scores, dict):
            raise ValueError("scores: give an object of position to criterion scores")
        for position in scores:
            if position not in positions:
                raise ValueError(f"scores: unexpected answer {position!r}; this item's answers are "
                                 f"{' and '.join(repr(p) for p in positions)}")
        for position in positions:
            if position not in scores:
                raise ValueError(f"scores.{position}: missing; score every shown answer")
        checked = {held.side(p): _check_scores(p, scores[p]) for p in positions}
        if held.item.is_pair:
            if preference not in PREFERENCES:
                raise ValueError(f"preference: {preference!r} is not one of {', '.join(PREFERENCES)}")
            stored_preference = "tie" if preference == "tie" else held.side(preference)
        elif preference is not None:
            raise ValueError("preference: a single answer takes no preference")
        else:
            stored_preference = None
        comment = "" if comment is None else str(comment)
        created = time.time()

        def insert(db: sqlite3.Connection) -> int:
            try:
                rating_id = db.execute(
                    "INSERT INTO ratings (item_id, rater, assignment, left_answer, preference, comment, created) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (held.item.id, held.rater, held.token, held.left, stored_preference, comment, created)).lastrowid
            except sqlite3.IntegrityError as err:
                raise AlreadyRated(f"assignment: {held.rater!r} has rated this item already") from err
            db.executemany("INSERT INTO scores (rating_id, answer, criterion, score) VALUES (?, ?, ?, ?)",
                           [(rating_id, side, c, s) for side, per in checked.items() for c, s in per.items()])
            return rating_id

        rating_id = self._write(insert)
        return Rating(rating_id, held.item, held.rater, held.left, checked, stored_preference, comment, created)

    def ratings(self) -> list[Rating]:
        items = {item.id: item for item in self.items()}
        scores: dict[int, dict[str, dict[str, int]]] = defaultdict(lambda: defaultdict(dict))
        for row in self._read("SELECT * FROM scores"):
            scores[row["rating_id"]][row["answer"]][row["criterion"]] = row["score"]
        return [Rating(row["id"], items[row["item_id"]], row["rater"], row["left_answer"],
                       {side: dict(per) for side, per in sorted(scores[row["id"]].items())}, row["preference"],
                       row["comment"], row["created"])
                for row in self._read("SELECT * FROM ratings ORDER BY id")]

    def summary(self) -> dict:
        """Counts: items (pairs, single answers), ratings, raters, ratings per rater."""
        items, pairs = self._read("SELECT COUNT(*), COUNT(answer_b) FROM items")[0]
        per_rater = {row[0]: row[1] for row in self._read("SELECT rater, COUNT(*) FROM ratings GROUP BY rater")}
        return {"items": items, "pairs": pairs, "singles": items - pairs, "ratings": sum(per_rater.values()),
                "raters": len(per_rater), "ratings_per_rater": per_rater}


# ---- statistics -----------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def t_quantile(confidence: float, df: int) -> float:
    """The two-sided Student t critical value: P(|T| < t) = ``confidence`` with ``df`` degrees of freedom.

    For integer df, P(|T| < t) has a closed form in theta = atan(t / sqrt(df)) (Abramowitz & Stegun
    26.7.3-4), solved here by bisection on theta; above 1000 df, the Cornish-Fisher expansion
    around the normal quantile (A&S 26.7.5), exact there to about 1e-9."""
    if df < 1 or not 0 < confidence < 1:
        raise ValueError("need df >= 1 and 0 < confidence < 1")
    if df > 1000:
        from statistics import NormalDist

        z = NormalDist().inv_cdf((1 + confidence) / 2)
        return (z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
                + (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / (384 * df**3))

    def inside(theta: float) -> float:  # P(|T| < sqrt(df) tan(theta))
        s, c2 = math.sin(theta), math.cos(theta) ** 2
        if df % 2:
            term, total = math.cos(theta), 0.0
            for j in range(1, (df - 1) // 2 + 1):
                total += term
                term *= c2 * 2 * j / (2 * j + 1)
            return 2 / math.pi * (theta + s * total)
        term, total = 1.0, 0.0
        for j in range(1, df // 2 + 1):
            total += term
            term *= c2 * (2 * j - 1) / (2 * j)
        return s * total

    low, high = 0.0, math.pi / 2
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if inside(middle) < confidence else (low, middle)
    return math.sqrt(df) * math.tan((low + high) / 2)


def mean_interval(values: Sequence[float], confidence: float = 0.95) -> dict:
    """Mean, n, sample standard deviation and the Student t interval mean +- t * sd / sqrt(n)
    (None for fewer than two values)."""
    n = len(values)
    mean = sum(values) / n if n else None
    if n < 2:
        return {"mean": mean, "n": n, "sd": None, "ci_low": None, "ci_high": None}
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = t_quantile(confidence, n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "n": n, "sd": sd, "ci_low": mean - half, "ci_high": mean + half}


def krippendorff_alpha(units: Iterable[Sequence], level: str = "ordinal") -> float:
    """Krippendorff's alpha over ``units``: per unit, the values its raters gave (missing ones left out).

    alpha = 1 - (n - 1) * sum_ck o_ck d_ck / sum_ck n_c n_k d_ck  (Krippendorff 2011, "Computing
    Krippendorff's alpha-reliability", https://repository.upenn.edu/asc_papers/43), where the
    coincidence o_ck = sum over units u of (pairs of values c, k by different raters in u) / (m_u - 1),
    m_u the values in u; n_c = sum_k o_ck, n = sum_c n_c; units with one value are not pairable and
    drop out. Distances d_ck: nominal [c != k]; interval (c - k)^2; ordinal
    (sum_{g from c to k} n_g - (n_c + n_k) / 2)^2 over the values sorted. NaN when undefined
    (no pairable unit, or every value the same)."""
    if level not in ("nominal", "ordinal", "interval"):
        raise ValueError(f"level must be nominal, ordinal or interval, not {level!r}")
    pairable = [list(u) for u in units if len(u) >= 2]
    values = sorted({v for u in pairable for v in u})
    if len(values) < 2:
        return math.nan
    index = {v: i for i, v in enumerate(values)}
    o = np.zeros((len(values), len(values)))  # (V, V) coincidences
    for unit in pairable:
        counts = np.zeros(len(values))
        for value, count in Counter(unit).items():
            counts[index[value]] = count
        o += (np.outer(counts, counts) - np.diag(counts)) / (len(unit) - 1)
    n_c = o.sum(axis=0)
    if level == "nominal":
        d = 1.0 - np.eye(len(values))
    elif level == "interval":
        v = np.array(values, dtype=float)
        d = (v[:, None] - v[None, :]) ** 2
    else:
        cumulative = np.concatenate([[0.0], np.cumsum(n_c)])  # cumulative[i] = n_0 + ... + n_{i-1}
        low, high = np.minimum.outer(np.arange(len(values)), np.arange(len(values))), \
            np.maximum.outer(np.arange(len(values)), np.arange(len(values)))
        d = (cumulative[high + 1] - cumulative[low] - (n_c[:, None] + n_c[None, :]) / 2) ** 2
    expected = (np.outer(n_c, n_c) * d).sum()
    return float(1 - (n_c.sum() - 1) * (o * d).sum() / expected) if expected > 0 else math.nan


# ---- report ---------------------------------------------------------------------------------------

def _number(x: float) -> float | None:
    return None if x is None or math.isnan(x) else x


def human_report(store: RatingStore, confidence: float = 0.95) -> dict:
    """Scores, win rates and agreement of every rating in ``store``, as a JSON-ready dict.

    - ``scores[model][criterion]``: mean, n, sd and a Student t ``confidence`` interval over every
      score that model's answers got (each rating one observation);
    - ``win_rates``: per pair of models (answers of the same model against each other are left out),
      wins, losses, ties and win rate = (wins + ties / 2) / n of the first model;
    - ``agreement``: Krippendorff's alpha per criterion (ordinal; a unit is one answer of one item),
      over all criteria together, and on the preference (nominal: a, b, tie), from items with two or
      more raters; ``single_rater_items`` counts the rated items that have one rater and so do not count.
    """
    ratings, summary = store.ratings(), store.summary()
    scores: dict[str, dict[str, list[int]]] = defaultdict(lambda: {c: [] for c in CRITERIA})
    wins: dict[tuple[str, str], Counter] = defaultdict(Counter)
    by_unit: dict[tuple[int, str, str], list[int]] = defaultdict(list)
    by_item: dict[int, list[str]] = defaultdict(list)
    raters_of: dict[int, set[str]] = defaultdict(set)
    for rating in ratings:
        raters_of[rating.item.id].add(rating.rater)
        for side, per in rating.scores.items():
            for criterion, score in per.items():
                scores[rating.item.model(side)][criterion].append(score)
                by_unit[(rating.item.id, side, criterion)].append(score)
        if rating.preference is not None:
            by_item[rating.item.id].append(rating.preference)
            first, second = sorted((rating.item.model_a, rating.item.model_b))
            if first != second:
                winner = {"a": rating.item.model_a, "b": rating.item.model_b}.get(rating.preference)
                wins[(first, second)]["ties" if winner is None else "wins" if winner == first else "losses"] += 1

    win_rates = []
    for (first, second), count in sorted(wins.items()):
        n = count["wins"] + count["losses"] + count["ties"]
        win_rates.append({"model": first, "opponent": second, "wins": count["wins"], "losses": count["losses"],
                          "ties": count["ties"], "n": n, "win_rate": (count["wins"] + count["ties"] / 2) / n})

    def units(criteria: Sequence[str]) -> list[list[int]]:
        return [v for (_, _, c), v in by_unit.items() if c in criteria]

    agreement = {c: {"alpha": _number(krippendorff_alpha(units([c]), "ordinal")),
                     "units": sum(len(u) >= 2 for u in units([c]))} for c in CRITERIA}
    agreement["all_criteria"] = {"alpha": _number(krippendorff_alpha(units(CRITERIA), "ordinal")),
                                 "units": sum(len(u) >= 2 for u in units(CRITERIA))}
    agreement["preference"] = {"alpha": _number(krippendorff_alpha(by_item.values(), "nominal")),
                               "units": sum(len(u) >= 2 for u in by_item.values())}
    return {
        "ratings": len(ratings), "raters": summary["raters"], "items": summary["items"],
        "rated_items": len(raters_of), "pairs": summary["pairs"], "ratings_per_rater": summary["ratings_per_rater"],
        "confidence": confidence, "interval": "Student t on the mean, ratings taken as independent",
        "scores": {model: {c: mean_interval(v, confidence) for c, v in per.items()}
                   for model, per in sorted(scores.items())},
        "win_rates": win_rates,
        "agreement": agreement,
        "multi_rater_items": sum(len(r) >= 2 for r in raters_of.values()),
        "single_rater_items": sum(len(r) == 1 for r in raters_of.values()),
    }


def _cell(s: dict) -> str:
    if s["mean"] is None:
        return "–"
    if s["ci_low"] is None:
        return f"{s['mean']:.2f}"
    return f"{s['mean']:.2f} [{s['ci_low']:.2f}, {s['ci_high']:.2f}]"


def _alpha(a: dict) -> str:
    return "–" if a["alpha"] is None else f"{a['alpha']:.3f}"


def format_report(report: dict) -> str:
    """The report as Markdown."""
    percent = f"{report['confidence']:.0%}"
    lines = ["# Human evaluation", "",
             f"{report['ratings']} ratings by {report['raters']} raters of {report['rated_items']} of "
             f"{report['items']} items ({report['pairs']} pairs).", "",
             f"## Scores (1-5): mean [{percent} CI]", "",
             f"Intervals: {report['interval']}.", "",
             "| model | n | " + " | ".join(c.replace("_", " ") for c in CRITERIA) + " |",
             "|---|---:|" + "---:|" * len(CRITERIA)]
    for model, per in report["scores"].items():
        lines.append(f"| {model} | {per[CRITERIA[0]]['n']} | " + " | ".join(_cell(per[c]) for c in CRITERIA) + " |")
    lines += ["", "## Win rates (ties count half)", ""]
    if report["win_rates"]:
        lines += ["| model | opponent | wins | losses | ties | n | win rate |", "|---|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {w['model']} | {w['opponent']} | {w['wins']} | {w['losses']} | {w['ties']} | {w['n']} | "
                  f"{w['win_rate']:.3f} |" for w in report["win_rates"]]
    else:
        lines.append("No preferences between different models yet.")
    agreement = report["agreement"]
    lines += ["", "## Inter-rater agreement (Krippendorff's alpha)", "",
              "| measure | alpha | units with 2+ raters |", "|---|---:|---:|"]
    lines += [f"| {c.replace('_', ' ')} (ordinal) | {_alpha(agreement[c])} | {agreement[c]['units']} |"
              for c in CRITERIA]
    lines.append(f"| all criteria (ordinal) | {_alpha(agreement['all_criteria'])} | "
                 f"{agreement['all_criteria']['units']} |")
    lines.append(f"| preference (nominal) | {_alpha(agreement['preference'])} | {agreement['preference']['units']} |")
    lines.append("")
    lines.append(f"{report['multi_rater_items']} rated items have two or more raters; "
                 f"{report['single_rater_items']} have one and do not count towards agreement.")
    if report["multi_rater_items"] == 0:
        lines.append("Agreement is undefined: no item has been rated by two raters.")
    return "\n".join(lines) + "\n"


# ---- preference data --------------------------------------------------------------------------------

def export_preferences(store: RatingStore, path: str | Path, majority: bool = False) -> int:
    """Write the pairs' preferences as JSONL for preference tuning; returns the lines written.

    Default: one line per rating with a non-tie preference, ``{"prompt", "chosen", "rejected",
    "chosen_model", "rejected_model", "item", "rater", "criteria": {"chosen": {...}, "rejected": {...}},
    "comment"}``; raters who disagree give opposite lines (a trainer may weight or drop them).
    ``majority``: one line per item whose non-tie votes favour one answer strictly, with ``"votes"``
    ({"a", "b", "tie"}), ``"raters"`` and the criteria's mean scores."""
    lines = []
    pairs = [r for r in store.ratings() if r.preference is not None]
    if not majority:
        for r in pairs:
            if r.preference == "tie":
                continue
            chosen, rejected = r.preference, _other(r.preference)
            lines.append({"prompt": r.item.prompt, "chosen": r.item.answer(chosen), "rejected": r.item.answer(rejected),
                          "chosen_model": r.item.model(chosen), "rejected_model": r.item.model(rejected),
                          "item": r.item.id, "rater": r.rater,
                          "criteria": {"chosen": r.scores[chosen], "rejected": r.scores[rejected]},
                          "comment": r.comment})
    else:
        by_item: dict[int, list[Rating]] = defaultdict(list)
        for r in pairs:
            by_item[r.item.id].append(r)
        for group in by_item.values():
            votes = Counter(r.preference for r in group)
            if votes["a"] == votes["b"]:
                continue
            item, chosen = group[0].item, "a" if votes["a"] > votes["b"] else "b"
            rejected = _other(chosen)
            means = {role: {c: sum(r.scores[side][c] for r in group) / len(group) for c in CRITERIA}
                     for role, side in (("chosen", chosen), ("rejected", rejected))}
            lines.append({"prompt": item.prompt, "chosen": item.answer(chosen), "rejected": item.answer(rejected),
                          "chosen_model": item.model(chosen), "rejected_model": item.model(rejected),
                          "item": item.id, "raters": sorted(r.rater for r in group),
                          "votes": {k: votes[k] for k in ("a", "b", "tie")}, "criteria": means})
    write_text_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    return len(lines)


def read_prompts(path: str | Path) -> list[str]:
    """The prompts of ``lmforge eval human-items``: a text file with one prompt per line, or JSONL with a
    string field 'prompt' per line; InputError naming the file (and line) on a problem."""
    from lmforge.data.jsonl import iter_records
    from lmforge.files import read_text

    path = Path(path)
    if not path.is_file():
        raise InputError(f"prompts file not found: {path}")
    if path.suffix != ".jsonl":
        return [line for line in read_text(path, "prompts file").splitlines() if line.strip()]
    prompts = []
    for record, where in iter_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("prompt"), str):
            raise InputError(f"{where}: each line must be a JSON object with a string 'prompt'")
        prompts.append(record["prompt"])
    return prompts


def answer_items(prompts: Sequence[str], models: dict[str, object], path: str | Path,
                 max_new_tokens: int = 256, temperature: float = 0.0, seed: int = 0) -> int:
    """Write rating items: each prompt asked (as a chat turn) to one or two models, their answers side
    by side (``prompt``, ``answers``, ``models``), for ``lmforge serve --rating-items``. ``models``:
    name -> :class:`lmforge.api.LanguageModel`; every model answers every prompt in one batched
    run. Returns the number of items written."""
    if len(models) not in (1, 2):
        raise ValueError(f"rating items compare one or two models, got {len(models)}")
    if not prompts:
        raise ValueError("no prompts to answer")
    replies = {}
    for name, lm in models.items():
        batch = [{"messages": [{"role": "user", "content": p}]} for p in prompts]
        replies[name] = [c.text.strip() for c in lm.generate_batch(batch, max_new_tokens=max_new_tokens,
                                                                      temperature=temperature, seed=seed)]
    lines = []
    for index, prompt in enumerate(prompts):
        answers = [(name, replies[name][index]) for name in models if replies[name][index]]
        if answers:  # else nothing to rate: every model replied with nothing
            lines.append(json.dumps({"prompt": prompt, "answers": [a for _, a in answers],
                                     "models": [n for n, _ in answers]}, ensure_ascii=False) + "\n")
    write_text_atomic(path, "".join(lines))
    return len(lines)
