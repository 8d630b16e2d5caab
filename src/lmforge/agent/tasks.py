"""The built-in agent tasks, and how `lmforge eval` scores a model on them with and without tools.

Offline and deterministic from a seed:

- ``agent_arith``: multi-step arithmetic word problems with 3-4 digit numbers (a small
  model gets them wrong in its head); tool: the calculator. Solved when the last number in
  the answer is the right one.
- ``agent_memory``: two sessions. The first tells the agent a fact to remember ("My locker
  number is 4821. Please remember it."); the second, a new run with the same long-term
  memory, asks for it. Solved when the answer contains the fact's value.
- ``agent_code``: 24 small Python functions to write; tool: the sandboxed interpreter. Solved
  when the function in the answer passes unit tests run in the sandbox. Its answer comes in
  words (``Task.agent_answer``): a program is written as it is, in a turn of its own, not
  escaped into final_answer's JSON string (SmolLM2-135M: 0 of 8 that way, 5 of 8 in words);
  the other tasks' answers (a number, a value, a phrase) come as final_answer's argument.
- ``agent_langref``: the 100 questions about Python's language reference of ``lmforge rag
  eval KB langref``; tool: ``search`` over a knowledge base of the reference's topics (BM25,
  built once per run from ``pydoc_data.topics``, no encoder needed). Solved when the answer
  contains one of the accepted answers, as ``lmforge rag eval`` decides it (whole words, SQuAD
  normalization).

Each task is scored twice: ``agent`` (the agent loop with the task's tools) and
``no_tools`` (the same model asked the same question once, in its chat format). Per item:
success, turns, tool calls, failed calls, calls that did not parse, tokens and seconds;
per task: the success rate with a bootstrap standard error and a 95% Wilson interval, the
parse rate (of the turns that tried to call a tool, the share that parsed), the mean turns
and tokens, and the tokens per solved task.
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from pathlib import Path

from lmforge.eval.task import Item, Task

NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


# ---- the tasks -------------------------------------------------------------------------------------

ARITH = [  # (question, answer from a, b, c)
    ("A crate holds {a} boxes and every box holds {b} pens. How many pens are in {c} crates?",
     lambda a, b, c: a * b * c),
    ("What is ({a} * {b}) - {c}?", lambda a, b, c: a * b - c),
    ("Add {a} and {b}, then multiply the sum by {c}. What do you get?", lambda a, b, c: (a + b) * c),
    ("A train runs {a} km an hour for {b} hours, then {c} km more. How far does it go in all?",
     lambda a, b, c: a * b + c),
    ("A farm has {a} rows of {b} apple trees and sells {c} trees. How many trees are left?",
     lambda a, b, c: a * b - c),
]


def agent_arith(limit: int | None = None, seed: int = 0) -> Task:
    rng = random.Random(f"agent_arith:{seed}")
    items = []
    for index in range(40):
        template, solve = ARITH[index % len(ARITH)]
        a, b, c = rng.randint(101, 999), rng.randint(11, 99), rng.randint(11, 999)
        items.append(Item(f"arith-{index}", template.format(a=a, b=b, c=c), answer=str(solve(a, b, c))))
    return Task("agent_arith", "agent", items[:limit] if limit is not None else items, chat=True,
                source="builtin (seeded)", tools=("calculator",))


MEMORY = [  # (what to remember, the later question, the value)
    ("My locker number is {n}. Please remember it.", "What is my locker number?"),
    ("The door code for the lab is {n}. Remember it for me.", "What is the door code for the lab?"),
    ("My bike lock combination is {n}; keep it in mind.", "What is my bike lock combination?"),
    ("Our team's meeting room is number {n}. Please remember that.", "Which room number is our team's meeting room?"),
]


def agent_memory(limit: int | None = None, seed: int = 0) -> Task:
    rng = random.Random(f"agent_memory:{seed}")
    items = []
    for index in range(20):
        tell, ask = MEMORY[index % len(MEMORY)]
        value = str(rng.randint(1000, 9999))
        items.append(Item(f"memory-{index}", ask, answer=value, meta={"setup": tell.format(n=value)}))
    return Task("agent_memory", "agent", items[:limit] if limit is not None else items, chat=True,
                source="builtin (seeded)", tools=("memory",))


CODE = [  # (name, what it does, tests as (call, expected))
    ("add", "add(a, b) that returns the sum of two numbers", [("add(2, 3)", 5), ("add(-1, 1)", 0)]),
    ("is_even", "is_even(n) that returns True when the integer n is even, else False",
     [("is_even(4)", True), ("is_even(7)", False), ("is_even(0)", True)]),
    ("reverse", "reverse(s) that returns the string s backwards", [("reverse('abc')", "cba"), ("reverse('')", "")]),
    ("largest", "largest(xs) that returns the largest number in the list xs",
     [("largest([3, 9, 2])", 9), ("largest([-5, -2])", -2)]),
    ("count_vowels", "count_vowels(s) that returns how many of the letters a, e, i, o, u are in s",
     [("count_vowels('banana')", 3), ("count_vowels('sky')", 0)]),
    ("factorial", "factorial(n) that returns n! for n >= 0", [("factorial(0)", 1), ("factorial(5)", 120)]),
    ("square_all", "square_all(xs) that returns a list with the square of every number in xs",
     [("square_all([1, 2, 3])", [1, 4, 9]), ("square_all([])", [])]),
    ("is_palindrome", "is_palindrome(s) that returns True when s reads the same backwards",
     [("is_palindrome('level')", True), ("is_palindrome('abc')", False)]),
    ("multiply", "multiply(a, b) that returns the product of two numbers", [("multiply(3, 4)", 12), ("multiply(-2, 5)", -10)]),
    ("smallest", "smallest(xs) that returns the smallest number in the list xs",
     [("smallest([4, 1, 7])", 1), ("smallest([-3, 2])", -3)]),
    ("total", "total(xs) that returns the sum of the numbers in the list xs", [("total([1, 2, 3])", 6), ("total([])", 0)]),
    ("average", "average(xs) that returns the mean of the numbers in the non-empty list xs",
     [("average([2, 4])", 3), ("average([5])", 5)]),
    ("count_words", "count_words(s) that returns how many words, separated by spaces, the string s has",
     [("count_words('a b c')", 3), ("count_words('hello')", 1)]),
    ("upper", "upper(s) that returns the string s in capital letters", [("upper('abc')", "ABC"), ("upper('Hi')", "HI")]),
    ("first", "first(xs) that returns the first item of the list xs", [("first([7, 8])", 7), ("first(['a'])", "a")]),
    ("last", "last(xs) that returns the last item of the list xs", [("last([7, 8])", 8), ("last(['a'])", "a")]),
    ("absolute", "absolute(n) that returns the absolute value of the number n",
     [("absolute(-4)", 4), ("absolute(3)", 3), ("absolute(0)", 0)]),
    ("square", "square(n) that returns n times n", [("square(3)", 9), ("square(-2)", 4)]),
    ("is_positive", "is_positive(n) that returns True when the number n is greater than 0, else False",
     [("is_positive(5)", True), ("is_positive(-1)", False), ("is_positive(0)", False)]),
    ("double_all", "double_all(xs) that returns a list with every number in xs times two",
     [("double_all([1, 2])", [2, 4]), ("double_all([])", [])]),
    ("length", "length(s) that returns how many characters the string s has", [("length('abc')", 3), ("length('')", 0)]),
    ("repeat", "repeat(s, n) that returns the string s written n times in a row",
     [("repeat('ab', 3)", "ababab"), ("repeat('x', 0)", "")]),
    ("evens", "evens(xs) that returns a list of the even numbers in xs, in order",
     [("evens([1, 2, 3, 4])", [2, 4]), ("evens([1, 3])", [])]),
    ("contains", "contains(xs, x) that returns True when x is in the list xs, else False",
     [("contains([1, 2], 2)", True), ("contains([1, 2], 5)", False)]),
]


def agent_code(limit: int | None = None, seed: int = 0) -> Task:
    items = []
    for name, what, cases in CODE:
        tests = "\n".join(f"        self.assertEqual({call}, {expected!r})" for call, expected in cases)
        test_file = (f"import unittest\nfrom solution import {name}\n\n\nclass T(unittest.TestCase):\n"
                     f"    def test(self):\n{tests}\n\n\nunittest.main()\n")
        items.append(Item(f"code-{name}", f"Write a Python function {what}. Reply with the code of the function.",
                          answer=name, meta={"tests": test_file}))
    random.Random(f"agent_code:{seed}").shuffle(items)
    return Task("agent_code", "agent", items[:limit] if limit is not None else items, chat=True,
                source="builtin", tools=("python",), agent_answer="words")


def agent_langref(limit: int | None = None, seed: int = 0) -> Task:
    from lmforge.rag.evaluate import read_questions

    items = [Item(f"langref-{index}", q.text, answer=q.answers[0], aliases=q.answers[1:], meta={"match": "contains"})
             for index, q in enumerate(read_questions("langref"))]
    random.Random(f"agent_langref:{seed}").shuffle(items)
    return Task("agent_langref", "agent", items[:limit] if limit is not None else items, chat=True,
                source="builtin (lmforge/rag/langref_questions.jsonl)", tools=("search",))


def langref_knowledge_base(folder: str | Path) -> Path:
    """A BM25-only knowledge base of the language reference's topics at ``folder`` (its vectors are
    zeros: no encoder is loaded); the path."""
    import numpy as np

    from lmforge.rag.chunk import chunk_document
    from lmforge.rag.documents import read_documents
    from lmforge.rag.langref import write_topics
    from lmforge.rag.store import write_knowledge_base

    folder = Path(folder)
    chunks = []
    for path in write_topics(folder / "topics"):
        for document in read_documents(path):
            chunks += [(str(path), c) for c in chunk_document(document, lambda text: len(text.split()), 200, 20)]
    out = folder / "kb"
    write_knowledge_base(out, {"encoder": "none"}, {file: "0" for file, _ in chunks}, chunks,
                         np.zeros((len(chunks), 1), dtype=np.float32))
    return out


AGENT_TASKS = {"agent_arith": agent_arith, "agent_memory": agent_memory, "agent_code": agent_code,
               "agent_langref": agent_langref}


# ---- checking an answer ----------------------------------------------------------------------------

def solved(task: Task, item: Item, answer: str) -> bool:
    """Whether ``answer`` solves ``item``: the right number (arith), the remembered value (memory),
    code that passes the item's tests in the sandbox (code)."""
    if "tests" in item.meta:
        return passes_tests(answer, item.meta["tests"])
    if "setup" in item.meta:
        return item.gold_text in answer
    if item.meta.get("match") == "contains":  # as `lmforge rag eval` scores answers
        from lmforge.rag.evaluate import contains_answer

        return bool(contains_answer(answer, (item.gold_text, *item.aliases)))
    numbers = NUMBER.findall(answer)
    return bool(numbers) and numbers[-1].replace(",", "") == item.gold_text


def passes_tests(answer: str, tests: str) -> bool:
    """The code in ``answer`` (a fenced block, else the whole answer) passes ``tests`` in the sandbox."""
    from lmforge.agent.sandbox import run_python

    fenced = re.findall(r"```(?:python|py)?\s*\n(.*?)```", answer, re.DOTALL)
    code = fenced[0] if fenced else answer
    result = run_python("import runpy\nrunpy.run_path('test_solution.py', run_name='__main__')", timeout=10,
                        files={"solution.py": code, "test_solution.py": tests})
    return result.ok


# ---- scoring ---------------------------------------------------------------------------------------

def chat_backend(model, constrain: bool = True):
    """The agent backend for an evaluation model: the loaded model (tool calls decoded under the
    tools' schemas with ``constrain``), or the server it talks to."""
    from lmforge.agent.backend import LocalChat, RemoteChat

    if hasattr(model, "lm"):
        return LocalChat(model.lm, name=getattr(model, "name", "local"), constrain=constrain)
    return RemoteChat(model.base_url, model.name, getattr(model, "api_key", None))


def score_agent(model, task: Task, items: list[Item], with_tools: bool, seed: int = 0,
                max_steps: int = 6, constrain: bool = True, answer: str = "tool") -> list[dict]:
    """One record per item: the agent with the task's tools (``with_tools``), or the model asked once."""
    from tqdm import tqdm

    from lmforge.agent.builtin import builtin_tools
    from lmforge.agent.loop import Agent, AgentConfig
    from lmforge.agent.memory import Memory
    from lmforge.agent.tools import Toolbox

    backend = chat_backend(model, constrain)
    config = AgentConfig(max_steps=max_steps, max_new_tokens=192, seed=seed, answer=answer)
    records = []
    label = "agent" if with_tools else "no tools"
    search = None
    if with_tools and "search" in task.tools:  # the language reference, searched by BM25
        from lmforge.agent.builtin import search_tool
        from lmforge.rag import KnowledgeBase, Retriever

        kb_folder = tempfile.TemporaryDirectory()
        search = search_tool(Retriever(KnowledgeBase(langref_knowledge_base(kb_folder.name))), method="bm25")
    for item in tqdm(items, desc=f"{task.name} {label}", unit="task", leave=False,
                     disable=not getattr(model, "progress", False)):
        start = time.perf_counter()
        if not with_tools:
            reply = backend.complete([{"role": "user", "content": item.question}], [], max_tokens=192)
            answer, fields = (reply.content or "").strip(), {
                "steps": 1, "tool_calls": 0, "failed_calls": 0, "malformed": 0, "parse_rate": None,
                "prompt_tokens": reply.prompt_tokens, "completion_tokens": reply.completion_tokens, "stopped": "answer"}
        else:
            with tempfile.TemporaryDirectory() as folder:
                memory = Memory(Path(folder) / "memory.sqlite") if "memory" in task.tools else None
                tools = Toolbox(builtin_tools([t for t in task.tools if t not in ("memory", "search")])
                                + ([search] if search is not None else []))
                agent = Agent(backend, tools, config, memory=memory)
                setup_tokens = [0, 0]
                if "setup" in item.meta:  # an earlier session, with the same memory
                    earlier = agent.run(item.meta["setup"])
                    setup_tokens = [earlier.prompt_tokens, earlier.completion_tokens]
                result = agent.run(item.question)
                if memory is not None:
                    memory.close()
            tried = result.tool_call_turns + result.malformed
            answer, fields = result.answer, {
                "steps": result.steps, "tool_calls": result.tool_calls, "failed_calls": result.failed_calls,
                "malformed": result.malformed, "parse_rate": result.parse_rate if tried else None,
                "prompt_tokens": result.prompt_tokens + setup_tokens[0],
                "completion_tokens": result.completion_tokens + setup_tokens[1], "stopped": result.stopped}
        records.append({"id": item.id, "question": item.question, "gold": item.gold_text, "answer": answer,
                        "success": float(solved(task, item, answer)), **fields,
                        "tokens": fields["prompt_tokens"] + fields["completion_tokens"],
                        "seconds": round(time.perf_counter() - start, 3)})
    if search is not None:
        kb_folder.cleanup()
    return records
