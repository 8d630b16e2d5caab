"""Evaluation speed: `lmforge eval` against lm-evaluation-harness's Hugging Face backend, same items, same weights.

Scores the same multiple-choice and generation tasks with the same model twice in one
process: with lmforge's evaluation runner (:func:`lmforge.eval.run.evaluate` on a
:class:`~lmforge.eval.harness.LocalModel`, what `lmforge eval` runs) and with lm-eval's
``HFLM`` through ``lm_eval.simple_evaluate``. The model is exported once to a transformers
directory (``lmforge.interop.convert.export_checkpoint``), so both sides load identical
weights; every lmforge task is exported to an lm-eval task (YAML + a local JSONL dataset)
whose prompt is the exact string lmforge built, so both sides score the same requests
(checked: the same prompt text, or in the chat format the same token ids).

    python benchmarks/eval.py                                   # pyref_mc (59 items: all it has) + verifiable (40)
    python benchmarks/eval.py --limit-mc 8 --limit-gen 4        # a quick check
    python benchmarks/eval.py --tasks pyref_mc pyref_qa --dtype bf16 --repeats 3 --out runs/bench-eval.json
    python benchmarks/eval.py --tasks verifiable pyref_qa --shots 5 --dtype bf16  # few-shot: a shared prefix
    python benchmarks/eval.py --tasks verifiable pyref_qa --weights fp16        # lmforge: 16-bit weights, fp32 math

With ``--weights fp16`` (or bf16) lmforge stores its weights rounded to 16 bits and multiplies
in fp32 (`lmforge eval --weights`), while lm-eval keeps ``--dtype``'s weights: not quite the
same model any more, so the agreement columns show how many replies and choices differ.

Generation tasks are asked in the model's chat format on both sides by default (``--chat
generate``: lmforge ``--chat on``, lm-eval ``apply_chat_template``): asked plainly, as
`lmforge eval` asks them by default, smollm2-135m-instruct starts every reply with a newline,
which is the tasks' stop string, so nothing would be decoded. Multiple choice stays plain.

Timing: model loading is timed apart from scoring. lmforge's seconds are those its runner
reports for a task (prompts, tokenization, the engine, the per-item records; not the
aggregation). lm-eval's are the time spent in its request methods (``loglikelihood``,
``generate_until``: tokenization, sorting and padding into batches, the model); the whole
``simple_evaluate`` call (datasets, instances, metrics) is reported beside it. Both models
get one tiny untimed warm-up call first; with ``--compile`` lmforge's decode step is
compiled before that (one graph at the full batch, as `lmforge eval --compile`), timed and
printed apart. Every lmforge run starts with an empty prefix cache (``Engine.clear_prefix_cache``): a
repeat would otherwise find the last run's prompts cached when the engine has a slot for every item, and
lm-eval keeps nothing between runs. A run does reuse what its own prompts share (the chat format's
opening): that is lmforge's prefix cache at work. items/s = items / seconds; the ratio is
lmforge's items/s over lm-eval's. With ``--repeats N`` every task runs N times on each side,
interleaved (the side that goes first takes turns), and the medians are reported. On a
machine whose cores are shared with other work the seconds swing widely (10x seen on 2
busy cores with 2 torch threads); measure on an idle machine, or compare with ``--threads 1``.

Scores: multiple choice: ``acc`` and ``acc_norm`` on both sides (the same definitions),
and the largest absolute difference between the two sides' log-likelihoods of any choice.
Generation: greedy until the task's stop strings on both sides; lm-eval's ``exact_match``
(case, punctuation, articles and surrounding whitespace ignored) stands for lmforge's
``exact_match_strict`` (the whole reply, SQuAD-normalized); lmforge's own scorer is also
applied to lm-eval's replies, and the replies that differ are counted.
"""

from __future__ import annotations

import argparse
import json
import statistics
import string
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402

from lmforge.eval import metrics as M
from lmforge.eval.harness import LocalModel
from lmforge.eval.run import EvalConfig, evaluate, extract_answer, load_tasks
from lmforge.eval.task import Task

LM_EVAL_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
# lm-eval's exact_match deletes these regexes (in order) from reply and reference, then ignores
# case and ASCII punctuation: close to lmforge's SQuAD normalization (lowercase, punctuation and
# articles deleted, whitespace collapsed), which exact_match_strict applies to the whole reply.
SQUAD_LIKE = ["[" + "".join("\\" + c for c in string.punctuation) + "]", r"(?i)\b(a|an|the)\b",
              r"^\s+", r"\s+$", r"\s(?=\s)"]


# ---- lmforge -------------------------------------------------------------------------------------


class LmforgeSide:
    """The model loaded once (``load_seconds``) behind lmforge's evaluation runner."""

    def __init__(self, args: argparse.Namespace):
        from lmforge.api import load

        self.args = args
        start = time.perf_counter()
        lm = load(args.model, device=args.device, dtype=args.dtype, compile=args.compile, weights=args.weights,
                  compile_prefill=args.compile_prefill, autotune=False, prompt_lookup=args.prompt_lookup,
                  draft_tokens=args.draft_tokens)
        self.model = LocalModel(lm, name=args.model, batch_size=args.batch_size, progress=False)
        self.load_seconds = time.perf_counter() - start
        # what `lmforge eval --compile` does: the (B, 1 + k) checking step too when guessing
        self.compile_seconds = self.model.engine.warm_up(lm.draft_width) if args.compile else 0.0
        if args.compile:
            print(f"compiled lmforge's decode step for batch sizes {self.model.engine.decode_buckets}"
                  f"{' and its prefill pass' if args.compile_prefill else ''} in "
                  f"{self.compile_seconds:.0f}s (not in items/s)", flush=True)
        self.model.loglikelihood([("Warm up", " now")])
        self.model.generate(["Warm up"], stop=["\n"], max_new_tokens=2)

    def run(self, name: str, spec: str, limit: int, chat: bool) -> tuple[dict, list[dict]]:
        """(results["tasks"][name][P], results["samples"][f"{name}.{P}"]) of `lmforge eval` on one task,
        P the prompting: ``zero``, or ``few:K`` with ``--shots K``."""
        args = self.args
        self.model.engine.clear_prefix_cache()  # each run computes its prompts, as lm-eval's does: no repeat reuses the last
        prompting = f"few:{args.shots}" if args.shots else "zero"
        config = EvalConfig(tasks=spec, prompting=prompting, limit=limit, seed=args.seed, chat="on" if chat else "off",
                            batch_size=args.batch_size, leaderboard="", out="", device=args.device, dtype=args.dtype,
                            weights=args.weights)
        results = evaluate(self.model, config, args.model)
        entry = results["tasks"][name][prompting]
        print(f"  lmforge {name}: {entry['n']} items in {entry['seconds']:.1f}s", flush=True)
        return entry, results["samples"][f"{name}.{prompting}"]


# ---- lm-eval -------------------------------------------------------------------------------------


def export_task(task: Task, seed: int, shots: int, folder: Path) -> str:
    """``task`` as an lm-eval task (YAML + JSONL of its test items, each with lmforge's prompt, ``shots``
    solved train items first, the ones lmforge's ``few:K`` shows); its name."""
    import yaml

    name = f"lmforge_{task.name}"
    rows = []
    for item in task.test:
        row = {"id": item.id, "prompt": task.context(item, shots, seed)}
        if task.kind == "multiple_choice":
            row.update(choices=list(item.choices), gold=int(item.answer))
        else:
            row.update(gold=item.gold_text)
        rows.append(row)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    config = {"task": name, "dataset_path": "json",
              "dataset_kwargs": {"data_files": {"test": str(data)}, "cache_dir": str(folder / "cache")},
              "test_split": "test", "doc_to_text": "prompt", "doc_to_target": "gold",
              "target_delimiter": task.target_delimiter, "num_fewshot": 0}
    if task.kind == "multiple_choice":
        config.update(output_type="multiple_choice", doc_to_choice="choices",
                      metric_list=[{"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                                   {"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}])
    elif task.kind == "generate":
        if any(item.aliases for item in task.test):
            print(f"note: {task.name} has answer aliases; lm-eval's exact_match sees the gold text only")
        config.update(output_type="generate_until",
                      generation_kwargs={"until": list(task.stop), "max_gen_toks": task.max_new_tokens,
                                         "do_sample": False},
                      metric_list=[{"metric": "exact_match", "aggregation": "mean", "higher_is_better": True,
                                    "ignore_case": True, "ignore_punctuation": True,
                                    "regexes_to_ignore": SQUAD_LIKE}])
    else:
        raise SystemExit(f"{task.name}: only multiple-choice and generation tasks are compared")
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(config, allow_unicode=True, sort_keys=False),
                                         encoding="utf-8")
    return name


class Timed:
    """Wraps a request method of an lm-eval model, adding up the seconds spent in it."""

    def __init__(self, method):
        self.method, self.seconds = method, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.method(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


class LmEvalSide:
    """The exported model loaded once (``load_seconds``) in lm-eval's ``HFLM``, the tasks exported to ``folder``."""

    def __init__(self, args: argparse.Namespace, hf_dir: Path, tasks: dict[str, Task], folder: Path):
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager

        self.args = args
        self.names = {name: export_task(task, args.seed, args.shots, folder) for name, task in tasks.items()}
        self.manager = TaskManager(include_path=str(folder))
        start = time.perf_counter()
        self.lm = HFLM(pretrained=str(hf_dir), dtype=LM_EVAL_DTYPES[args.dtype], device=args.device,
                       batch_size=args.lm_eval_batch_size)
        self.load_seconds = time.perf_counter() - start
        self.lm.loglikelihood([Instance("loglikelihood", {}, ("Warm up", " now"), 0)], disable_tqdm=True)
        self.lm.generate_until([Instance("generate_until", {}, ("Warm up", {"until": ["\n"], "max_gen_toks": 2,
                                                                            "do_sample": False}), 0)],
                               disable_tqdm=True)
        self.timers = {method: Timed(getattr(self.lm, method)) for method in ("loglikelihood", "generate_until")}
        for method, timer in self.timers.items():
            setattr(self.lm, method, timer)

    def run(self, name: str, chat: bool) -> dict:
        """{"seconds" (in the request methods), "whole_call_seconds", "n", "results", "samples"} for one task."""
        import lm_eval

        lm_name, seed = self.names[name], self.args.seed
        for timer in self.timers.values():
            timer.seconds = 0.0
        start = time.perf_counter()
        results = lm_eval.simple_evaluate(model=self.lm, tasks=[lm_name], task_manager=self.manager,
                                          log_samples=True, bootstrap_iters=1000, verbosity="WARNING",
                                          apply_chat_template=chat,
                                          random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed)
        whole = time.perf_counter() - start
        samples = results["samples"][lm_name]
        seconds = sum(t.seconds for t in self.timers.values())
        print(f"  lm-eval {name}: {len(samples)} items in {seconds:.1f}s (whole simple_evaluate call {whole:.1f}s)",
              flush=True)
        return {"seconds": seconds, "whole_call_seconds": whole, "n": len(samples),
                "results": results["results"][lm_name], "samples": samples}


# ---- comparing -----------------------------------------------------------------------------------


def same_prompt(lmforge_side: LmforgeSide, lm_eval_side: LmEvalSide, chat: bool):
    """Whether lm-eval's context is lmforge's prompt: the same text, or in the chat format the same token ids."""
    if not chat:
        return lambda ours, theirs: ours == theirs

    def same_ids(ours: str, theirs: str) -> bool:
        lmforge_side.model.chat = True
        return lmforge_side.model.context_ids(ours) == lm_eval_side.lm.tok_encode(theirs)
    return same_ids


def compare(task: Task, ours: list[tuple[dict, list[dict]]], theirs: list[dict], same_prompt) -> dict:
    """One row of the table from each side's repeats: median speed, each side's scores (of the first
    repeat; greedy scoring gives the same every time), how far apart they are."""
    entry, records = ours[0]
    ours_seconds = statistics.median(run[0]["seconds"] for run in ours)
    theirs_seconds = statistics.median(run["seconds"] for run in theirs)
    whole_seconds = statistics.median(run["whole_call_seconds"] for run in theirs)
    theirs = theirs[0]
    samples = {s["doc"]["id"]: s for s in theirs["samples"]}
    if sorted(samples) != sorted(r["id"] for r in records):
        raise SystemExit(f"{task.name}: lm-eval scored other items than lmforge")
    for r in records:
        their_prompt = samples[r["id"]]["arguments"][0][0]
        if not same_prompt(r["prompt"], their_prompt):
            raise SystemExit(f"{task.name} item {r['id']}: lm-eval's prompt differs from lmforge's:\n"
                             f"{their_prompt!r}\n{r['prompt']!r}")
    metrics = entry["metrics"]
    row = {"task": task.name, "kind": task.kind, "items": entry["n"], "repeats": len(ours),
           "chat_format": entry["chat_template"],
           "lmforge_seconds": ours_seconds, "lmforge_items_per_second": entry["n"] / max(ours_seconds, 1e-9),
           "lm_eval_seconds": theirs_seconds, "lm_eval_whole_call_seconds": whole_seconds,
           "lm_eval_items_per_second": theirs["n"] / max(theirs_seconds, 1e-9)}
    row["ratio"] = row["lmforge_items_per_second"] / row["lm_eval_items_per_second"]
    if task.kind == "multiple_choice":
        row["lmforge"] = {k: metrics[k]["value"] for k in ("acc", "acc_norm")}
        row["lm_eval"] = {k: float(theirs["results"][f"{k},none"]) for k in ("acc", "acc_norm")}
        diffs, same_pred = [], 0
        for r in records:
            lls = np.array([float(resp[0]) for resp in samples[r["id"]]["filtered_resps"]])
            diffs.append(np.abs(lls - np.array(r["loglikelihoods"])).max())
            same_pred += int(lls.argmax()) == r["pred"]
        row["max_abs_loglikelihood_diff"] = float(max(diffs))
        row["same_prediction"] = same_pred
        row["agreement"] = (f"max abs log-lik diff {row['max_abs_loglikelihood_diff']:.1e}; "
                            f"same choice {same_pred}/{len(records)}")
    else:
        row["lmforge"] = {k: metrics[k]["value"] for k in ("exact_match_strict", "exact_match_flexible")}
        row["lm_eval"] = {"exact_match": float(theirs["results"]["exact_match,none"])}
        strict, flexible, identical = [], [], 0
        for r in records:
            reply = samples[r["id"]]["filtered_resps"][0]
            identical += reply.strip() == r["reply"].strip()
            strict.append(M.exact_match(reply.strip(), r["gold"]))
            flexible.append(M.exact_match(extract_answer(reply, task.answer_pattern), r["gold"]))
        row["lm_eval_replies_scored_by_lmforge"] = {"exact_match_strict": float(np.mean(strict)),
                                                    "exact_match_flexible": float(np.mean(flexible))}
        row["same_reply"] = identical
        row["examples"] = [{"gold": r["gold"][0], "lmforge": r["reply"],
                            "lm_eval": samples[r["id"]]["filtered_resps"][0]} for r in records[:3]]
        row["agreement"] = f"same reply {identical}/{len(records)}"
    return row


def _scores(values: dict) -> str:
    return ", ".join(f"{k} {v:.3f}" for k, v in values.items())


def print_table(rows: list[dict], loads: dict[str, float]) -> None:
    print("\n| task | items | lmforge items/s | lm-eval items/s | lmforge / lm-eval | lmforge score | "
          "lm-eval score | agreement |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for row in rows:
        print(f"| {row['task']} ({row['kind'].replace('_', ' ')}{', chat format' if row['chat_format'] else ''}) | "
              f"{row['items']} | "
              f"{row['lmforge_items_per_second']:.2f} | {row['lm_eval_items_per_second']:.2f} | "
              f"{row['ratio']:.2f}x | {_scores(row['lmforge'])} | {_scores(row['lm_eval'])} | {row['agreement']} |")
    print(f"\nload: lmforge {loads['lmforge']:.1f}s"
          + (f" + {loads['lmforge_compile']:.0f}s compiling" if loads.get("lmforge_compile") else "")
          + f", lm-eval (HFLM) {loads['lm_eval']:.1f}s (not in items/s)")
    for row in rows:
        print(f"{row['task']}: lmforge {row['lmforge_seconds']:.1f}s, lm-eval {row['lm_eval_seconds']:.1f}s in its "
              f"request methods ({row['lm_eval_whole_call_seconds']:.1f}s for the whole simple_evaluate call)"
              + (f", medians of {row['repeats']}" if row["repeats"] > 1 else ""))
        if "lm_eval_replies_scored_by_lmforge" in row:
            print(f"  lm-eval's replies scored by lmforge: {_scores(row['lm_eval_replies_scored_by_lmforge'])} "
                  f"(lm-eval's exact_match stands for lmforge's exact_match_strict)")
            for example in row["examples"]:
                print(f"  gold {example['gold']!r}: lmforge replied {example['lmforge']!r}, "
                      f"lm-eval {example['lm_eval']!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct",
                        help="any model lmforge loads: packaged name, checkpoint, HF directory, .gguf")
    parser.add_argument("--tasks", nargs="+", default=["pyref_mc", "verifiable"],
                        help="lmforge tasks (multiple choice or generation), built-in names or task files")
    parser.add_argument("--limit-mc", type=int, default=100, help="items per multiple-choice task")
    parser.add_argument("--limit-gen", type=int, default=40, help="items per generation task")
    parser.add_argument("--dtype", choices=sorted(LM_EVAL_DTYPES), default="fp32",
                        help="compute dtype on both sides")
    parser.add_argument("--weights", choices=["fp32", "fp16", "bf16"], default="fp32",
                        help="lmforge only: store its weights in 16 bits, arithmetic in fp32 (`lmforge eval "
                             "--weights`; needs --dtype fp32); lm-eval keeps --dtype's weights")
    parser.add_argument("--device", default="cpu", help="cpu or cuda, both sides")
    parser.add_argument("--batch-size", type=int, default=16, help="lmforge: requests decoded together (engine slots)")
    parser.add_argument("--lm-eval-batch-size", type=int, default=16,
                        help="lm-eval: requests per padded batch (it sorts them by length)")
    parser.add_argument("--seed", type=int, default=0, help="which items --limit keeps (and which few-shot examples)")
    parser.add_argument("--shots", type=int, default=0,
                        help="K solved train items before every prompt on both sides (lmforge few:K; the same "
                             "K examples for every item of a task, as lm-eval's fixed few-shot tasks)")
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads; 0 keeps torch's default")
    parser.add_argument("--chat", choices=["off", "generate"], default="generate",
                        help="generate: ask the generation tasks in the model's chat format on both sides "
                             "(lmforge --chat on, lm-eval apply_chat_template); multiple choice stays plain")
    parser.add_argument("--compile", action="store_true",
                        help="lmforge: compile the decode step first, as `lmforge eval --compile` (timed apart)")
    parser.add_argument("--compile-prefill", action="store_true",
                        help="lmforge, with --compile: compile the pass that admits prompts too, as `lmforge eval "
                             "--compile --compile-prefill` (timed apart)")
    parser.add_argument("--prompt-lookup", type=int, default=0, metavar="N",
                        help="lmforge: guess tokens from matches of the last N tokens earlier in the prompt and "
                             "reply, checked in one pass (`lmforge eval --prompt-lookup N`); greedy output unchanged")
    parser.add_argument("--draft-tokens", type=int, default=4, help="lmforge: guesses per pass with --prompt-lookup")
    parser.add_argument("--repeats", type=int, default=1,
                        help="score every task this many times on each side, interleaved; median seconds")
    parser.add_argument("--out", help="also write the results here as JSON")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    tasks: dict[str, Task] = {}
    specs: dict[str, tuple[str, int]] = {}  # task name -> (as --tasks names it, its limit)
    for spec in args.tasks:
        kind = load_tasks(spec, 1, args.seed)[0].kind
        limit = args.limit_mc if kind == "multiple_choice" else args.limit_gen
        task = load_tasks(spec, limit, args.seed)[0]
        tasks[task.name], specs[task.name] = task, (spec, limit)
    print(f"machine: {machine()}")
    print(f"model {args.model}, dtype {args.dtype} on both sides (lm-eval dtype={LM_EVAL_DTYPES[args.dtype]}), "
          f"lmforge weights stored in {args.weights}, "
          + (f"lmforge prompt lookup {args.prompt_lookup}-grams, {args.draft_tokens} guesses, " if args.prompt_lookup
             else "")
          + f"batch size lmforge {args.batch_size} / lm-eval {args.lm_eval_batch_size}, {args.shots}-shot; tasks "
          + ", ".join(f"{name} ({task.kind}, {len(task.test)} items)" for name, task in tasks.items()), flush=True)

    from lmforge.interop.convert import export_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        hf_dir = export_checkpoint(args.model, Path(tmp) / "hf", "hf")
        config_dtype = json.loads((hf_dir / "config.json").read_text())["torch_dtype"]
        print(f"exported the weights to a transformers directory in {time.perf_counter() - start:.1f}s "
              f"(its config says {config_dtype}, lm-eval's default dtype)", flush=True)
        (Path(tmp) / "tasks").mkdir()
        lmforge_side = LmforgeSide(args)
        lm_eval_side = LmEvalSide(args, hf_dir, tasks, Path(tmp) / "tasks")
        ours: dict[str, list] = {name: [] for name in tasks}
        theirs: dict[str, list] = {name: [] for name in tasks}
        chat = {name: args.chat == "generate" and task.kind == "generate" for name, task in tasks.items()}
        for repeat in range(args.repeats):  # each repeat runs both sides, the first side taking turns
            print(f"repeat {repeat + 1} of {args.repeats}:", flush=True)
            for name in tasks:
                for side in ("lm-eval", "lmforge") if repeat % 2 else ("lmforge", "lm-eval"):
                    if side == "lmforge":
                        ours[name].append(lmforge_side.run(name, *specs[name], chat[name]))
                    else:
                        theirs[name].append(lm_eval_side.run(name, chat[name]))
        rows = [compare(tasks[name], ours[name], theirs[name], same_prompt(lmforge_side, lm_eval_side, chat[name]))
                for name in tasks]
    loads = {"lmforge": lmforge_side.load_seconds, "lmforge_compile": lmforge_side.compile_seconds,
             "lm_eval": lm_eval_side.load_seconds}
    print_table(rows, loads)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"machine": machine(), "model": args.model, "dtype": args.dtype,
                                              "weights": args.weights,
                                              "batch_size": args.batch_size, "repeats": args.repeats, "chat": args.chat,
                                              "lm_eval_batch_size": args.lm_eval_batch_size, "shots": args.shots,
                                              "compile": args.compile, "prompt_lookup": args.prompt_lookup,
                                              "draft_tokens": args.draft_tokens,
                                              "load_seconds": loads, "tasks": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
