"""`lmforge eval`: score a model on tasks under several prompting strategies, with error bars.

    lmforge eval MODEL --tasks pyref_mc,verifiable --prompting zero,few:5,cot --limit 200
    lmforge eval --base-url http://127.0.0.1:8000 --tasks pyref_mc       # any OpenAI-compatible server

For every (task, prompting strategy) the runner builds the requests, sends them to the model
(:mod:`lmforge.eval.harness`), scores each item and aggregates with bootstrap standard errors.
Prompting strategies:

* ``zero``: the item's prompt alone; ``few:K``: K solved examples from the task's train
  split first (one seeded draw per task);
* ``cot``: chain of thought: the prompt lists the choices (multiple choice), adds a reasoning
  cue, and the model writes; the answer is extracted from what it wrote ("the answer is X");
* ``verbalizer``: multiple choice as classification by label words: the choices are listed
  as A, B, C... and the prediction is the label whose word the model finds likeliest.

Outputs in ``--out``: ``results.json`` (every metric with its standard error, the config and
its hash, whether the chat format was used), ``report.md``, ``samples/TASK.PROMPTING.jsonl``
(each item: prompt, gold, scores, prediction) and ``calibration.png``; each run is also
recorded in the leaderboard database (:mod:`lmforge.eval.leaderboard`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from lmforge.errors import InputError
from lmforge.eval import metrics as M
from lmforge.eval.harness import EvalModel
from lmforge.eval.perturb import PERTURBATIONS, perturb
from lmforge.eval.task import LETTERS, Item, Task
from lmforge.files import holds_output
from lmforge.settings import field

COT_CUE = "Let's think step by step."
COT_ANSWER = re.compile(r"answer is[:\s]*\(?([^\n.]+?)\)?\s*(?:\.|\n|$)", re.IGNORECASE)


@dataclass
class EvalConfig:
    """What `lmforge eval` runs."""

    tasks: str = field("pyref_mc", "comma-separated task names (see --list-tasks) or task files (.jsonl, .yaml)")
    prompting: str = field("task", "comma-separated strategies: task (each task's own few-shot count), zero, "
                                   "few:K, cot, verbalizer")
    limit: int | None = field(None, "at most this many items per task (seeded choice)")
    seed: int = field(0, "seed for task items, few-shot examples and perturbations")
    chat: str = field("auto", "wrap prompts in the model's chat format: auto (chat tasks only), on, off")
    perturb: str = field("", "robustness: comma-separated perturbations to rerun each task under "
                             "(typos, swap_chars, add_distractor, reword_instruction)")
    batch_size: int = field(16, "requests run together (engine slots; with --base-url: requests in flight)")
    context: int = field(4096, "positions per engine slot, at most the model's (a longer prompt loses its start)")
    out: str = field("runs/eval", "folder for results.json, report.md and per-sample logs")
    leaderboard: str = field("runs/leaderboard.sqlite", "SQLite database every run is added to ('' for none)")
    base_url: str | None = field(None, "score an OpenAI-compatible server instead of a local model")
    api_key: str | None = field(None, "bearer token for --base-url")
    device: str = field("auto", "auto, cpu, cuda, mps")
    dtype: str = field("auto", "auto, bf16, fp32")
    weights: str = field("fp32", "fp16 or bf16: store the model's weights in 16 bits, arithmetic in fp32 (a local "
                                 "model; half the memory, and on CPUs without native bf16 faster batched decoding)")
    compile: bool = field(False, "compile the engine's decode step before scoring (one graph at the full batch, "
                                 "a minute or more; pays off on long generation runs)")
    compile_prefill: bool = field(False, "with --compile: also compile the pass that admits new prompts (one "
                                         "more graph, 1-2 minutes on 2 CPU cores; admissions about a third "
                                         "cheaper)")
    bootstrap: int = field(1000, "bootstrap resamples for standard errors")
    agent_constrain: bool = field(True, "agent tasks on a local model: decode tool calls under the tools' JSON "
                                        "schemas (false: as the model writes them, for the parse rate without)")
    agent_answer: str = field("task", "agent tasks: task (each task's own: words for agent_code, tool for the "
                                      "rest), tool (the answer is final_answer's argument) or words (the model "
                                      "writes it in a turn of its own, asked the question again; better for code "
                                      "from small models)")


@dataclass(frozen=True)
class Prompting:
    """One prompting strategy: ``zero``, ``few`` (with ``shots``), ``cot`` or ``verbalizer``."""

    kind: str
    shots: int = 0

    @property
    def label(self) -> str:
        return f"few:{self.shots}" if self.kind == "few" else self.kind

    @classmethod
    def parse(cls, text: str) -> Prompting:
        name, _, count = text.strip().partition(":")
        if name in ("task", "zero", "cot", "verbalizer") and not count:
            return cls(name)
        if name == "few" and count.isdigit() and int(count) > 0:
            return cls("few", int(count))
        raise InputError(f"unknown prompting strategy {text!r}: use task, zero, few:K (K >= 1), cot or verbalizer")

    def for_task(self, task: Task) -> Prompting:
        """``task``: the task's own setting (its ``num_fewshot``), as zero or few:K."""
        if self.kind != "task":
            return self
        return Prompting("few", task.num_fewshot) if task.num_fewshot > 0 else Prompting("zero")


# ---- scoring one task under one strategy -----------------------------------------------------------------

def _mc_prompt(task: Task, item: Item, prompting: Prompting, seed: int) -> str:
    """The prompt for a multiple-choice item. For ``cot`` and ``verbalizer`` the choices are listed
    with letters after the question; a short last line of the template that opens the answer
    ("Answer:", "答案：") moves below them, then the reasoning cue follows it (``cot``)."""
    if prompting.kind not in ("cot", "verbalizer"):
        return task.context(item, prompting.shots, seed)
    head, _, last = task.render(item).rstrip().rpartition("\n")
    if not (head and len(last) <= 20 and last.endswith((":", "："))):
        head, last = task.render(item).rstrip(), "Answer:"
    listed = f"{head}\n{item.fields()['choices']}\n{last}"
    return listed + (" " + COT_CUE if prompting.kind == "cot" else "")


def score_multiple_choice(model: EvalModel, task: Task, items: list[Item], prompting: Prompting,
                          seed: int) -> list[dict]:
    """One record per item: the choices' log-likelihoods, the prediction (``acc``: likeliest choice;
    ``acc_norm``: likeliest per character, as lm-eval), and the probability of each choice."""
    if prompting.kind == "cot":
        return _mc_by_generation(model, task, items, prompting, seed)
    prompts = [_mc_prompt(task, item, prompting, seed) for item in items]
    if prompting.kind == "verbalizer":  # label words " A", " B", ... stand for the choices
        options = [[f" {LETTERS[i]}" for i in range(len(item.choices))] for item in items]
    else:
        options = [[task.target_delimiter + c for c in item.choices] for item in items]
    pairs = [(p, o) for p, opts in zip(prompts, options) for o in opts]
    scores = iter(model.loglikelihood(pairs, desc=f"{task.name} {prompting.label}"))
    records = []
    for item, prompt, opts in zip(items, prompts, options):
        lls = np.array([next(scores).logprob for _ in opts])
        lengths = np.array([max(len(o.strip()), 1) for o in opts])
        probs = np.exp(lls - lls.max())
        probs /= probs.sum()
        pred, pred_norm = int(lls.argmax()), int((lls / lengths).argmax())
        records.append({"id": item.id, "prompt": prompt, "choices": list(item.choices), "gold": int(item.answer),
                        "loglikelihoods": lls.round(6).tolist(), "pred": pred, "pred_norm": pred_norm,
                        "acc": float(pred == item.answer), "acc_norm": float(pred_norm == item.answer),
                        "confidence": float(probs.max()), "probabilities": probs.round(6).tolist(),
                        "group": item.group})
    return records


def _mc_by_generation(model: EvalModel, task: Task, items: list[Item], prompting: Prompting,
                      seed: int) -> list[dict]:
    prompts = [_mc_prompt(task, item, prompting, seed) for item in items]
    replies = model.generate(prompts, stop=("\n\n\n", "Question:"), max_new_tokens=max(task.max_new_tokens, 128),
                             desc=f"{task.name} {prompting.label}")
    records = []
    for item, prompt, reply in zip(items, prompts, replies):
        pred = extract_choice(reply, item.choices)
        records.append({"id": item.id, "prompt": prompt, "choices": list(item.choices), "gold": int(item.answer),
                        "reply": reply, "pred": pred, "acc": float(pred == item.answer), "group": item.group})
    return records


def extract_choice(reply: str, choices: tuple[str, ...]) -> int | None:
    """The choice a written answer settles on: "the answer is (B)" / "... is B" / the choice's text;
    else the last choice text or lone letter mentioned; None when it names none."""
    found = COT_ANSWER.findall(reply)
    candidates = [found[-1].strip()] if found else []
    candidates.append(reply)
    for text in candidates:
        letter = re.fullmatch(r"\(?([A-Z])\)?", text.strip())
        if letter and LETTERS.index(letter.group(1)) < len(choices):
            return LETTERS.index(letter.group(1))
        places = [(text.rfind(c), i) for i, c in enumerate(choices) if c and c in text]
        if places:
            return max(places)[1]
        letters = [m for m in re.findall(r"\b([A-Z])\b", text) if LETTERS.index(m) < len(choices)]
        if letters:
            return LETTERS.index(letters[-1])
    return None


def score_generation(model: EvalModel, task: Task, items: list[Item], prompting: Prompting,
                     seed: int) -> list[dict]:
    """One record per item: the greedy reply, its strict and flexible extractions, and their scores."""
    prompts = [task.context(item, prompting.shots, seed) for item in items]
    max_new = task.max_new_tokens
    stop = task.stop
    if prompting.kind == "cot":  # reasoning takes lines: a stop that is only line breaks waits for a blank line
        prompts = [p + " " + COT_CUE for p in prompts]
        max_new = max(max_new, 128)
        stop = tuple(s for s in task.stop if s.strip()) + ("\n\n",)
    replies = model.generate(prompts, stop=stop, max_new_tokens=max_new, desc=f"{task.name} {prompting.label}")
    records = []
    for item, prompt, reply in zip(items, prompts, replies):
        references = [item.gold_text, *item.aliases]
        strict = reply.strip()
        flexible = extract_answer(reply, task.answer_pattern, cot=prompting.kind == "cot")
        record = {"id": item.id, "prompt": prompt, "gold": references, "reply": reply,
                  "strict": strict, "flexible": flexible,
                  "exact_match_strict": M.exact_match(strict, references),
                  "exact_match_flexible": M.exact_match(flexible, references),
                  "f1": M.token_f1(flexible, references), "group": item.group}
        if "rouge" in task.metrics or task.language != "en":
            record.update({k: v for k, v in M.rouge(flexible, item.gold_text, ("rouge1", "rougeL")).items()})
        records.append(record)
    return records


def extract_answer(reply: str, pattern: str | None, cot: bool = False) -> str:
    """Flexible extraction: after chain of thought, what follows "the answer is"; else the last match
    of the task's pattern (its first group); else the reply's first line without end punctuation."""
    if cot:
        found = COT_ANSWER.findall(reply)
        if found:
            return found[-1].strip()
    if pattern:
        found = list(re.finditer(pattern, reply))
        if found:
            match = found[-1]
            return (match.group(1) if match.groups() else match.group(0)).strip()
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    return lines[0].strip().rstrip(".!?。！？") if lines else ""


def score_perplexity(model: EvalModel, task: Task, items: list[Item]) -> list[dict]:
    texts = [item.question for item in items]
    scores = model.loglikelihood_rolling(texts, desc=f"{task.name} perplexity")
    return [{"id": item.id, "logprob": s.logprob, "tokens": s.tokens, "bytes": len(text.encode("utf-8")),
             "words": len(text.split())} for item, text, s in zip(items, texts, scores)]


# ---- aggregation -----------------------------------------------------------------------------------------

def _stat(values, iterations: int, seed: int) -> dict:
    values = np.asarray(values, dtype=float)
    return {"value": float(values.mean()), "stderr": M.bootstrap_stderr(values, iterations=iterations, seed=seed)
            if len(values) > 1 else float("nan")}


def aggregate(kind: str, records: list[dict], iterations: int = 1000, seed: int = 0,
              extra: tuple[str, ...] = ()) -> dict:
    """Metrics over a task's records, each ``{"value", "stderr"}`` (bootstrap) where it is a mean; ``extra``:
    the task's ``metrics`` (corpus BLEU and chrF of the flexible replies, AURC: values only)."""
    out: dict[str, dict] = {}
    if kind == "perplexity":
        logprob = sum(r["logprob"] for r in records)
        tokens, nbytes, words = (sum(r[k] for r in records) for k in ("tokens", "bytes", "words"))
        bpb = np.array([-r["logprob"] / (math.log(2) * r["bytes"]) for r in records])
        out["bits_per_byte"] = {"value": -logprob / (math.log(2) * nbytes),
                                "stderr": M.bootstrap_stderr(bpb, iterations=iterations, seed=seed)
                                if len(records) > 1 else float("nan")}
        out["token_perplexity"] = {"value": math.exp(-logprob / tokens)}
        out["word_perplexity"] = {"value": math.exp(-logprob / words)}
        out["byte_perplexity"] = {"value": 2 ** out["bits_per_byte"]["value"]}
        return out
    if kind == "agent":
        return _aggregate_agent(records, iterations, seed)
    names = [k for k in ("acc", "acc_norm", "exact_match_strict", "exact_match_flexible", "f1", "rouge1", "rougeL")
             if k in records[0]]
    for name in names:
        out[name] = _stat([r[name] for r in records], iterations, seed)
    if "confidence" in records[0]:  # multiple choice scored by likelihood: calibration
        confidence = [r["confidence"] for r in records]
        correct = [r["acc"] for r in records]
        out["ece"] = {"value": M.expected_calibration_error(confidence, correct, bins=10)}
        width = max(len(r["probabilities"]) for r in records)  # items may have different numbers of choices:
        padded = [r["probabilities"] + [0.0] * (width - len(r["probabilities"])) for r in records]  # 0 adds 0
        out["brier"] = {"value": M.brier_score(np.array(padded), [r["gold"] for r in records])}
        out["selective_auc"] = {"value": M.selective_auc(confidence, correct)}
        if "aurc" in extra:
            out["aurc"] = {"value": M.aurc(confidence, correct)}
    if kind == "generate" and {"bleu", "chrf"} & set(extra):
        replies, references = [r["flexible"] for r in records], [r["gold"][0] for r in records]
        if "bleu" in extra:  # sacrebleu's 13a tokenizer sees a Chinese sentence as one word: "zh" cuts it
            chinese = any(M.is_cjk(c) for text in references for c in text)
            out["bleu"] = {"value": M.bleu(replies, references, tokenize="zh" if chinese else "13a")}
        if "chrf" in extra:
            out["chrf"] = {"value": M.chrf(replies, references)}
    groups = [r.get("group") for r in records]
    if any(g is not None for g in groups):
        main = MAIN_METRIC[kind]
        by_group = {}
        for g in sorted({g for g in groups if g is not None}):
            by_group[g] = float(np.mean([r[main] for r in records if r.get("group") == g]))
        out[f"{main}_by_group"] = {"value": by_group}
        out[f"{main}_group_gap"] = {"value": max(by_group.values()) - min(by_group.values())}
        if "pred" in records[0] and all(len(r["choices"]) == 2 for r in records):
            # a two-way choice is a binary classifier: positive = the first choice ("yes")
            grouped = [r for r in records if r.get("group") is not None and r["pred"] is not None]
            y_true, y_pred = [r["gold"] for r in grouped], [r["pred"] for r in grouped]
            group_of = [r["group"] for r in grouped]
            out["demographic_parity_difference"] = {
                "value": M.demographic_parity_difference(y_pred, group_of, positive=0)}
            out["equalized_odds_difference"] = {
                "value": M.equalized_odds_difference(y_true, y_pred, group_of, positive=0)}
    return out


def _aggregate_agent(records: list[dict], iterations: int, seed: int) -> dict:
    """Success rate (bootstrap standard error; 95% Wilson interval), parse rate, turns, tool calls and tokens."""
    success = [r["success"] for r in records]
    solved = sum(success)
    low, high = M.wilson_interval(int(solved), len(records))
    parsed = [r["parse_rate"] for r in records if r["parse_rate"] is not None]
    out = {"success": _stat(success, iterations, seed), "success_ci95": {"value": {"low": low, "high": high}},
           "parse_rate": {"value": float(np.mean(parsed)) if parsed else float("nan")}}
    for name in ("steps", "tool_calls", "tokens"):
        out[name] = {"value": float(np.mean([r[name] for r in records]))}
    out["tokens_per_success"] = {"value": sum(r["tokens"] for r in records) / solved if solved else float("nan")}
    return out


MAIN_METRIC = {"multiple_choice": "acc", "generate": "exact_match_flexible", "perplexity": "bits_per_byte",
               "agent": "success"}


# ---- the whole run ---------------------------------------------------------------------------------------

def load_tasks(spec: str, limit: int | None, seed: int) -> list[Task]:
    from lmforge.eval.task_file import load_task_file
    from lmforge.eval.tasks_builtin import BUILTIN_TASKS, builtin_task

    tasks = []
    for name in [s.strip() for s in spec.split(",") if s.strip()]:
        if name in BUILTIN_TASKS:
            tasks.append(builtin_task(name, limit=limit, seed=seed))
        elif Path(name).suffix in (".jsonl", ".yaml", ".yml"):
            task = load_task_file(Path(name))
            if limit is not None and len(task.test) > limit:  # a seeded choice, kept in file order
                keep = sorted(np.random.default_rng(seed).choice(len(task.test), limit, replace=False).tolist())
                task.test = [task.test[i] for i in keep]
            tasks.append(task)
        else:
            raise InputError(f"unknown task {name!r}: built-in tasks are {', '.join(BUILTIN_TASKS)}; "
                             "or give a task file (.jsonl, .yaml)")
    if not tasks:
        raise InputError("no tasks given (--tasks)")
    return tasks


def agent_answer(setting: str, task: Task) -> str:
    """How an agent task's answer comes back under ``--agent-answer setting``: ``tool`` or ``words`` as
    said, ``task`` the task's own (:attr:`Task.agent_answer`)."""
    return task.agent_answer if setting == "task" else setting


def config_hash(config: EvalConfig, model_name: str, tasks: Sequence[Task] = ()) -> str:
    """A short hash of what decides the scores (not where they are written) of ``config`` over ``tasks``."""
    keys = ("tasks", "prompting", "limit", "seed", "chat", "perturb")
    decided = {"model": model_name, **{k: getattr(config, k) for k in keys}}
    if config.weights != "fp32":  # rounded weights score a little differently (fp32 runs keep their old hashes)
        decided["weights"] = config.weights
    # likewise: runs whose agent answers all come as final_answer's argument (once the only way) keep theirs
    answers = {task.name: agent_answer(config.agent_answer, task) for task in tasks if task.kind == "agent"}
    if any(mode != "tool" for mode in answers.values()):
        decided["agent_answer"] = answers
    blob = json.dumps(decided, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def uses_chat(config: EvalConfig, task: Task) -> bool:
    if config.chat not in ("auto", "on", "off"):
        raise InputError(f"--chat must be auto, on or off, got {config.chat!r}")
    return config.chat == "on" or (config.chat == "auto" and task.chat)


def plan(config: EvalConfig) -> tuple[list[Task], list[Prompting], list[str]]:
    """The tasks, strategies and perturbations ``config`` names; InputError for any unknown one."""
    strategies = [Prompting.parse(p) for p in config.prompting.split(",") if p.strip()]
    if not strategies:
        raise InputError("no prompting strategy given (--prompting zero,few:5,cot,verbalizer)")
    perturbations = [p.strip() for p in config.perturb.split(",") if p.strip()]
    for name in perturbations:
        if name not in PERTURBATIONS:
            raise InputError(f"unknown perturbation {name!r}; known: {', '.join(PERTURBATIONS)}")
    return load_tasks(config.tasks, config.limit, config.seed), strategies, perturbations


def evaluate(model: EvalModel, config: EvalConfig, model_name: str, tasks: list[Task] | None = None) -> dict:
    """Run every task under every strategy (and perturbation); returns the results dict, writes nothing."""
    planned, strategies, perturbations = plan(config)
    tasks = planned if tasks is None else tasks
    results = {"model": model_name, "config": asdict(config), "config_hash": config_hash(config, model_name, tasks),
               "tasks": {}, "samples": {}}
    for task in tasks:
        model.chat = uses_chat(config, task)
        task_results = results["tasks"].setdefault(task.name, {})
        chosen = {p.label: p for p in (s.for_task(task) for s in strategies)}  # "task" may equal another
        if task.kind == "agent":  # the agent with its tools, beside the model asked once without them
            chosen = {"agent": Prompting("agent"), "no_tools": Prompting("no_tools")}
        for prompting in chosen.values() if task.kind != "perplexity" else [Prompting("zero")]:
            if prompting.kind == "verbalizer" and task.kind != "multiple_choice":
                continue  # label words classify among choices; a generation task has none
            if prompting.kind == "few" and len(task.train) < prompting.shots:
                raise InputError(f"task {task.name!r} has {len(task.train)} train items; {prompting.label} "
                                 f"needs {prompting.shots}")
            start = time.perf_counter()
            records = _score(model, task, task.test, prompting, config.seed, config.agent_constrain,
                             agent_answer(config.agent_answer, task))
            seconds = time.perf_counter() - start
            entry = {"kind": task.kind, "n": len(records), "seconds": round(seconds, 3),
                     "items_per_second": len(records) / max(seconds, 1e-9), "chat_template": model.chat,
                     "language": task.language, "source": task.source,
                     "metrics": aggregate(task.kind, records, config.bootstrap, config.seed, task.metrics)}
            main = MAIN_METRIC[task.kind]
            for name in perturbations if task.kind not in ("perplexity", "agent") else []:
                attacked = _score(model, *_perturbed(task, name, config.seed), prompting, config.seed)
                clean_hits = [r[main] for r in records]
                attacked_hits = [r[main] for r in attacked]
                entry.setdefault("robustness", {})[name] = {
                    main: float(np.mean(attacked_hits)),
                    "performance_drop_rate": M.performance_drop_rate(float(np.mean(clean_hits)),
                                                                     float(np.mean(attacked_hits))),
                    "attack_success_rate": M.attack_success_rate(clean_hits, attacked_hits)}
                results["samples"][f"{task.name}.{prompting.label}.{name}"] = attacked
            task_results[prompting.label] = entry
            results["samples"][f"{task.name}.{prompting.label}"] = records
    return results


def _score(model: EvalModel, task: Task, items: list[Item], prompting: Prompting, seed: int,
           constrain: bool = True, answer: str = "tool") -> list[dict]:
    if task.kind == "multiple_choice":
        return score_multiple_choice(model, task, items, prompting, seed)
    if task.kind == "generate":
        return score_generation(model, task, items, prompting, seed)
    if task.kind == "agent":
        from lmforge.agent.tasks import score_agent

        return score_agent(model, task, items, with_tools=prompting.kind == "agent", seed=seed, constrain=constrain,
                           answer=answer)
    return score_perplexity(model, task, items)


def _perturbed(task: Task, name: str, seed: int) -> tuple[Task, list[Item]]:
    """The task with each test item's question perturbed (seeded per item); ``reword_instruction``
    rewords the task's own instructions (template and description) instead."""
    from dataclasses import replace

    if name == "reword_instruction":
        return replace(task, template=perturb(task.template, name, seed),
                       description=perturb(task.description, name, seed)), task.test
    return task, [replace(item, question=perturb(item.question, name, seed=zlib.crc32(f"{seed}:{item.id}".encode())))
                  for item in task.test]


# ---- writing the results ---------------------------------------------------------------------------------

def _fmt(stat: dict) -> str:
    value, stderr = stat["value"], stat.get("stderr")
    if isinstance(value, dict):
        return ", ".join(f"{k}: {v:.3f}" for k, v in value.items())
    return f"{value:.4f}" + (f" ± {stderr:.4f}" if stderr is not None and not math.isnan(stderr) else "")


def report_markdown(results: dict) -> str:
    """report.md: per task, a line per prompting strategy with every metric ± its bootstrap standard error."""
    config = results["config"]
    lines = [f"# Evaluation of {results['model']}", "",
             f"config hash `{results['config_hash']}`; tasks `{config['tasks']}`; prompting `{config['prompting']}`; "
             f"limit {config['limit']}; seed {config['seed']}; {config['bootstrap']} bootstrap resamples "
             "for the standard errors (±).", ""]
    for task, strategies in results["tasks"].items():
        first = next(iter(strategies.values()))
        names = [m for m in first["metrics"] if not isinstance(first["metrics"][m]["value"], dict)]
        lines += [f"## {task} ({first['kind']}, {first['n']} items, {first['language']}, from {first['source']})", "",
                  "| prompting | chat format | " + " | ".join(names) + " | items/s |",
                  "|---|---|" + "---:|" * (len(names) + 1)]
        for label, entry in strategies.items():
            cells = [_fmt(entry["metrics"][m]) if m in entry["metrics"] else "–" for m in names]
            lines.append(f"| {label} | {'yes' if entry['chat_template'] else 'no'} | " + " | ".join(cells)
                         + f" | {entry['items_per_second']:.1f} |")
        lines.append("")
        for label, entry in strategies.items():
            for metric, stat in entry["metrics"].items():
                if isinstance(stat["value"], dict):
                    lines.append(f"- {label}: {metric}: {_fmt(stat)}")
            for name, figures in entry.get("robustness", {}).items():
                lines.append(f"- {label} under `{name}`: " + ", ".join(f"{k} {v:.4f}" for k, v in figures.items()))
        lines.append("")
    return "\n".join(lines)


def _calibration_plot(results: dict, png: Path) -> Path | None:
    """Reliability diagrams of the multiple-choice runs scored by likelihood (accuracy against confidence)."""
    runs = [(key, records) for key, records in results["samples"].items()
            if records and "confidence" in records[0] and key.count(".") == 1]
    if not runs:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5), dpi=110)
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for key, records in runs:
        table = M.reliability_bins([r["confidence"] for r in records], [r["acc"] for r in records], bins=10)
        filled = table.count > 0
        ax.plot(table.confidence[filled], table.accuracy[filled], marker="o", label=key)
    ax.set_xlabel("confidence (probability of the chosen answer)")
    ax.set_ylabel("accuracy")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)
    return png


def write_outputs(results: dict, out: str | Path) -> Path:
    """results.json (without samples), samples/*.jsonl, report.md and calibration.png in ``out``, a folder
    replaced whole (:func:`lmforge.files.new_folder`): a crash leaves the last run's outputs or this one's."""
    from lmforge.files import new_folder, safe_file_name, write_json_atomic

    out = Path(out)
    with new_folder(out, "the evaluation's outputs (the previous ones, if any, are kept)",
                    marker="results.json") as tmp:
        (tmp / "samples").mkdir()
        for key, records in results["samples"].items():
            with open(tmp / "samples" / f"{safe_file_name(key)}.jsonl", "w", encoding="utf-8") as handle:
                for record in records:
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
        write_json_atomic(tmp / "results.json", {k: v for k, v in results.items() if k != "samples"})
        report = report_markdown(results)
        if _calibration_plot(results, tmp / "calibration.png"):
            report += "\n![reliability diagram](calibration.png)\n"
        (tmp / "report.md").write_text(report, encoding="utf-8")
    return out / "results.json"


@holds_output("config.out")
def run_eval(config: EvalConfig, model_path: str | None = None, progress: bool = True,
             name: str | None = None, speculative: dict | None = None) -> dict:
    """`lmforge eval`: load the model (or reach the server), evaluate, write the outputs and the leaderboard
    (where the model is called ``name``: by default its path, or model@url for a server). ``speculative``:
    :func:`lmforge.load`'s drafter options, for generation tasks on a local model."""
    from lmforge.eval import leaderboard
    from lmforge.eval.harness import EndpointModel, LocalModel

    tasks = plan(config)[0]  # bad task files and flags fail before a model is loaded
    if config.base_url and config.compile:
        raise InputError("--compile is for a local model; the server at --base-url runs its own")
    if config.compile_prefill and not config.compile:
        raise InputError("--compile-prefill compiles the prefill pass beside the decode step: add --compile")
    if config.weights not in ("fp32", "fp16", "bf16"):
        raise InputError(f"--weights {config.weights!r}: choose fp32, fp16 or bf16")
    try:  # the agent's own check of its settings, before a model is loaded ("task": each task's own)
        from lmforge.agent.loop import AgentConfig

        if config.agent_answer != "task":
            AgentConfig(answer=config.agent_answer)
    except ValueError as err:
        raise InputError(f"--agent-answer: {err} (or task: each task's own)") from None
    if config.base_url and config.weights != "fp32":
        raise InputError("--weights is for a local model; the server at --base-url keeps its own")
    if config.base_url and speculative and any(speculative.get(k) for k in ("draft", "prompt_lookup", "draft_layers")):
        raise InputError("speculative decoding is for a local model; the server at --base-url decodes its own way")
    if config.base_url:
        model = EndpointModel(config.base_url, model_path, config.api_key, concurrency=config.batch_size,
                              progress=progress)
        name = name or f"{model.name}@{config.base_url}"
    else:
        from lmforge.api import load
        from lmforge.interop.packaged import DEFAULT_CHAT_MODEL

        model_path = model_path or DEFAULT_CHAT_MODEL
        name = name or str(model_path)
        lm = load(model_path, device=config.device, dtype=config.dtype, compile=config.compile,
                  compile_prefill=config.compile_prefill, weights=config.weights, autotune=False, **(speculative or {}))
        model = LocalModel(lm, name=name, batch_size=config.batch_size, progress=progress, context=config.context)
        if config.compile:
            if progress:
                print(f"compiling the decode step for batch sizes {model.engine.decode_buckets}"
                      f"{' and the prefill pass' if config.compile_prefill else ''} ...", flush=True)
            seconds = model.engine.warm_up(model.lm.draft_width)
            if progress:
                print(f"compiled in {seconds:.0f} s", flush=True)
    results = evaluate(model, config, name, tasks)
    write_outputs(results, config.out)
    if config.leaderboard:
        leaderboard.record(config.leaderboard, results)
    return results
