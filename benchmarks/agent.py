"""Agents: lmforge's agent loop against smolagents' ToolCallingAgent, same tasks, same model, same server.

One `lmforge serve` (in this process, a uvicorn thread) serves the model; both agents talk to
it through the OpenAI-compatible API with the same tools, so what differs is the agent:
its prompt, its loop and how it ends.

- lmforge: :class:`lmforge.agent.Agent` on :class:`~lmforge.agent.backend.RemoteChat`
  (defaults: every turn a tool call, the first one of the task's tools, ``final_answer``
  ends the run, a repeated call is answered from the earlier result and the next turn asks
  for the answer), a row for each ``--answer``: ``task`` (each task's own, as `lmforge eval`
  asks: ``words`` for agent_code, ``tool`` for agent_arith), ``tool`` (the answer is
  final_answer's argument) and ``words`` (final_answer() and then a turn without tools, asked
  the question again).
- smolagents: ``ToolCallingAgent`` with ``OpenAIServerModel`` (every turn a tool call too;
  its own ``final_answer``), greedy (temperature 0) and the same ``max_tokens`` per turn.

Tasks: the built-in ``agent_arith`` (calculator) and ``agent_code`` (the sandboxed python
tool) of :mod:`lmforge.agent.tasks`, checked the same way for both (the last number; the
function passing its unit tests in the sandbox). Per agent and task: success rate, turns,
tokens (prompt + completion, as the server counts them) and wall seconds per item, and
tokens and seconds per solved task.

    python benchmarks/agent.py                         # SmolLM2-135M-Instruct, 10 items per task
    python benchmarks/agent.py --limit 24 --answer task tool words
    python benchmarks/agent.py --limit 4 --tasks agent_arith
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from common import machine  # noqa: E402


def smolagents_tools(names: tuple[str, ...]):
    """lmforge's built-in tools of ``names`` as smolagents tools: the same functions and descriptions
    (smolagents rebuilds a tool from its source, so each imports what it needs inside)."""
    import smolagents

    @smolagents.tool
    def calculator(expression: str) -> str:
        """Evaluate an arithmetic expression such as 12*(3+4) or sqrt(2). Returns the number.

        Args:
            expression: numbers with + - * / // % ** and parentheses; functions sqrt, log, exp, sin, cos, tan, floor, ceil, abs, round, min, max, factorial, gcd; constants pi and e.
        """
        from lmforge.agent.builtin import calculator as evaluate

        return evaluate(expression)

    @smolagents.tool
    def python(code: str) -> str:
        """Run Python code. Returns what it prints, or the error. Use print() to show results.

        Args:
            code: the Python program to run.
        """
        from lmforge.agent.sandbox import run_python

        return run_python(code).summary()

    known = {"calculator": calculator, "python": python}
    return [known[name] for name in names]


def run_lmforge(url: str, task, items, args, answer: str = "task") -> list[dict]:
    from lmforge.agent import Agent, AgentConfig, RemoteChat, Toolbox, builtin_tools
    from lmforge.agent.tasks import solved
    from lmforge.eval.run import agent_answer

    backend = RemoteChat(url, "model")
    agent = Agent(backend, Toolbox(builtin_tools(list(task.tools))),
                  AgentConfig(max_steps=args.max_steps, max_new_tokens=args.max_tokens,
                              answer=agent_answer(answer, task)))
    rows = []
    for item in items:
        start = time.perf_counter()
        result = agent.run(item.question)
        rows.append({"success": solved(task, item, result.answer), "steps": result.steps,
                     "tokens": result.prompt_tokens + result.completion_tokens,
                     "seconds": time.perf_counter() - start, "answer": result.answer})
    return rows


def run_smolagents(url: str, task, items, args) -> list[dict]:
    import smolagents

    from lmforge.agent.tasks import solved

    model = smolagents.OpenAIServerModel(model_id="model", api_base=url + "/v1", api_key="unused",
                                         max_tokens=args.max_tokens, temperature=0)
    rows = []
    for item in items:
        agent = smolagents.ToolCallingAgent(tools=smolagents_tools(task.tools), model=model, max_steps=args.max_steps,
                                            verbosity_level=0)
        start = time.perf_counter()
        try:
            answer = str(agent.run(item.question))
        except Exception as err:  # noqa: BLE001 - a framework failure is a failed item, recorded
            answer = f"(smolagents failed: {type(err).__name__}: {err})"
        usage = [s.token_usage for s in agent.memory.steps if getattr(s, "token_usage", None)]
        steps = sum(1 for s in agent.memory.steps if isinstance(s, smolagents.memory.ActionStep))
        rows.append({"success": solved(task, item, answer), "steps": steps,
                     "tokens": sum(u.input_tokens + u.output_tokens for u in usage),
                     "seconds": time.perf_counter() - start, "answer": answer})
    return rows


def summary(rows: list[dict]) -> dict:
    solved = sum(r["success"] for r in rows)
    return {"items": len(rows), "solved": solved, "success": solved / len(rows),
            "steps": statistics.mean(r["steps"] for r in rows), "tokens": statistics.mean(r["tokens"] for r in rows),
            "seconds": statistics.mean(r["seconds"] for r in rows),
            "tokens_per_solved": sum(r["tokens"] for r in rows) / solved if solved else None,
            "seconds_per_solved": sum(r["seconds"] for r in rows) / solved if solved else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--tasks", nargs="+", default=["agent_arith", "agent_code"])
    parser.add_argument("--limit", type=int, default=10, help="items per task")
    parser.add_argument("--max-steps", type=int, default=5, help="turns per item, both agents")
    parser.add_argument("--max-tokens", type=int, default=128, help="tokens per turn, both agents")
    parser.add_argument("--dtype", default="fp32")
    parser.add_argument("--answer", nargs="+", default=["task"], choices=["task", "tool", "words"],
                        help="lmforge's agent, a row each: the answer as each task asks for it (what `lmforge "
                             "eval` does: words for agent_code, tool for the rest), as final_answer's argument, "
                             "or in a turn of its own")
    parser.add_argument("--agents", nargs="+", default=["lmforge", "smolagents"], choices=["lmforge", "smolagents"])
    parser.add_argument("--out", help="also write the figures here as JSON")
    args = parser.parse_args()

    from lmforge.api import load
    from lmforge.eval.tasks_builtin import builtin_task
    from lmforge.serve.served_model import ServedModel
    from lmforge.serve.server import background_server

    print(f"machine: {machine()}\nmodel {args.model} ({args.dtype}), {args.limit} items a task, at most "
          f"{args.max_steps} turns of {args.max_tokens} tokens, one lmforge serve for both agents", flush=True)
    served = ServedModel("model", load(args.model, dtype=args.dtype), max_batch_size=1)
    figures = {}
    with background_server({"model": served}) as url:
        for name in args.tasks:
            task = builtin_task(name, limit=args.limit)
            sides = [(f"lmforge ({answer})", functools.partial(run_lmforge, answer=answer)) for answer in args.answer
                     if "lmforge" in args.agents] + [("smolagents", run_smolagents)] * ("smolagents" in args.agents)
            for side, run in sides:
                rows = run(url, task, task.test, args)
                figures[f"{name}/{side}"] = {"summary": summary(rows), "answers": [r["answer"] for r in rows]}
                s = figures[f"{name}/{side}"]["summary"]
                print(f"  {name} {side}: {s['solved']}/{s['items']} solved in {s['seconds'] * s['items']:.0f}s",
                      flush=True)
    print("\n| task | agent | solved | turns/item | tokens/item | s/item | tokens per solved | s per solved |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for key, value in figures.items():
        s = value["summary"]
        task, side = key.split("/", 1)

        def per(x):
            return "-" if x is None else f"{x:.0f}"

        print(f"| {task} | {side} | {s['solved']}/{s['items']} | {s['steps']:.1f} | {s['tokens']:.0f} | "
              f"{s['seconds']:.1f} | {per(s['tokens_per_solved'])} | {per(s['seconds_per_solved'])} |")
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": machine(), "args": vars(args), "figures": figures},
                                             indent=2) + "\n")


if __name__ == "__main__":
    main()
