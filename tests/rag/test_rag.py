"""Knowledge bases: reading, chunking, indexing, updating, searching."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from lmforge.cli import main
from lmforge.errors import InputError
from lmforge.rag import KnowledgeBase, Retriever, index_paths
from lmforge.rag.bm25 import bm25_tokens
from lmforge.rag.chunk import chunk_document
from lmforge.rag.documents import SourceDocument, html_to_text, read_documents

GUIDE = """# Guide

Intro. lmforge trains small language models on a laptop CPU.

## Install

Run the setup script once; it installs PyTorch first.

```bash
bash scripts/setup.sh

echo done
```

## Serving

The server speaks the OpenAI API. Point any client at port 8000.
"""
CODE = '''"""Helpers."""


def area(radius):
    """The area of a circle."""
    return 3.14159 * radius ** 2


class Stack:
    """Last in, first out."""

    def push(self, item):
        self.items.append(item)
'''
CHINESE = "机器学习是人工智能的一个分支。它研究计算机怎样模拟人类的学习行为。\n\n长城是中国古代的军事防御工程，全长两万多公里。"


def count_words(text: str) -> int:
    return len(re.findall(r"\w+|[^\w\s]", text))


@pytest.fixture(scope="module")
def embedder():
    from lmforge.embed import load

    return load("all-minilm-l6-v2", device="cpu")


def write_corpus(folder):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "guide.md").write_text(GUIDE, encoding="utf-8")
    (folder / "shapes.py").write_text(CODE, encoding="utf-8")
    (folder / "wall.txt").write_text(CHINESE, encoding="utf-8")
    (folder / "page.html").write_text("<html><head><style>p{}</style><script>var x</script></head><body>"
                                      "<h1>Kettles</h1><p>A kettle boils water for tea.</p></body></html>",
                                      encoding="utf-8")
    (folder / "faq.jsonl").write_text(json.dumps({"text": "The capital of France is Paris.", "title": "geo"}) + "\n"
                                      + json.dumps({"text": "Rust has no garbage collector."}) + "\n", encoding="utf-8")
    (folder / "notes.bin").write_bytes(b"\x00ignored")  # unknown kinds inside a folder are skipped
    return folder


def test_chunks_follow_structure_and_are_spans_of_their_document():
    document = SourceDocument(GUIDE, "guide.md", "markdown", "guide.md")
    chunks = chunk_document(document, count_words, max_tokens=20, overlap=4)
    assert all(GUIDE[c.start:c.end] == c.text and c.tokens <= 20 for c in chunks)
    assert [c.title for c in chunks][0] == "guide.md > Guide"
    fence = next(c for c in chunks if "```bash" in c.text)
    assert fence.text.endswith("```") and fence.title == "guide.md > Guide > Install"  # the code block whole
    assert {c.title for c in chunks} == {"guide.md > Guide", "guide.md > Guide > Install", "guide.md > Guide > Serving"}
    assert len({c.id for c in chunks}) == len(chunks)
    # a paragraph too long for the budget is cut at sentence ends, Chinese ones included
    chinese = chunk_document(SourceDocument(CHINESE, "wall.txt", "text"), lambda t: len(t), max_tokens=20, overlap=0)
    assert [c.text for c in chinese[:2]] == ["机器学习是人工智能的一个分支。", "它研究计算机怎样模拟人类的学习行为。"]
    assert all(len(c.text) <= 20 for c in chinese)  # a 23-character sentence: cut by length
    assert "".join(CHINESE[c.start:c.end] for c in chinese).replace("\n", "") == CHINESE.replace("\n", "")
    code = chunk_document(SourceDocument(CODE, "shapes.py", "code", "shapes.py"), count_words, max_tokens=64)
    assert [c.title for c in code] == ["shapes.py", "shapes.py > def area(radius):", "shapes.py > class Stack:"]
    # ids follow content: an unchanged paragraph keeps its id when text before it changes
    edited = chunk_document(SourceDocument("# Guide\n\nA new first line.\n\n" + GUIDE[8:], "guide.md", "markdown",
                                           "guide.md"), count_words, max_tokens=20, overlap=4)
    assert {c.id for c in chunks if "OpenAI" in c.text} <= {c.id for c in edited}
    with pytest.raises(ValueError, match="overlap"):
        chunk_document(document, count_words, max_tokens=20, overlap=20)


def test_readers(tmp_path):
    write_corpus(tmp_path)
    assert html_to_text((tmp_path / "page.html").read_text()) == "# Kettles\n\nA kettle boils water for tea."
    faq = read_documents(tmp_path / "faq.jsonl")
    assert [(d.source.rsplit(":", 1)[1], d.title) for d in faq] == [("1", "geo"), ("2", "faq.jsonl")]
    (tmp_path / "bad.jsonl").write_text('{"title": "no text"}\n')
    with pytest.raises(InputError, match=r"bad.jsonl:1: .*'text'"):
        read_documents(tmp_path / "bad.jsonl")
    (tmp_path / "bad.txt").write_bytes(b"fine\n\xff\xfe")
    with pytest.raises(InputError, match=r"bad.txt:2: invalid UTF-8"):
        read_documents(tmp_path / "bad.txt")
    from pypdf import PdfWriter

    writer = PdfWriter()
    writer.add_blank_page(72, 72)
    writer.encrypt("secret")
    with (tmp_path / "locked.pdf").open("wb") as handle:
        writer.write(handle)
    with pytest.raises(InputError, match="encrypted"):
        read_documents(tmp_path / "locked.pdf")


def test_index_search_and_update_equal_a_rebuild(tmp_path, embedder):
    corpus = write_corpus(tmp_path / "docs")
    kb_path = tmp_path / "kb"
    first = index_paths([corpus], kb_path, encoder=embedder, max_tokens=64, overlap=8, progress=False)
    assert first.files == 5 and first.added == first.chunks > 5 and first.kept == first.removed == 0
    kb = KnowledgeBase(kb_path)
    assert kb.vectors.shape == (first.chunks, 384)
    retriever = Retriever(kb, embedder)
    top = retriever.search("capital of France", k=1, method="bm25")[0]
    assert "Paris" in top.chunk.text and top.chunk.title == "geo"
    assert "kettle" in retriever.search("How do I make hot water for a cup of tea?", k=1, method="dense")[0].chunk.text
    assert "长城" in retriever.search("长城有多长", k=1, method="bm25")[0].chunk.text  # Chinese, no spaces
    hybrid = retriever.search("OpenAI server port", k=3, method="hybrid")
    assert "8000" in hybrid[0].chunk.text and [h.rank for h in hybrid] == [1, 2, 3]
    assert retriever.search("zzzz qqqq", method="bm25") == []  # no word in common: no hit, not a random one

    # change one paragraph, delete a file, add one: only new chunks are embedded
    (corpus / "guide.md").write_text(GUIDE.replace("port 8000", "port 9000"), encoding="utf-8")
    (corpus / "shapes.py").unlink()
    (corpus / "more.md").write_text("# More\n\nTea tastes best with fresh water.\n", encoding="utf-8")
    update = index_paths([corpus], kb_path, encoder=embedder, max_tokens=64, overlap=8, progress=False)
    assert update.files_read == 2 and 0 < update.added < 4 and update.removed >= 3 and update.kept > 0
    rebuilt = index_paths([corpus], tmp_path / "fresh", encoder=embedder, max_tokens=64, overlap=8, progress=False)
    a, b = KnowledgeBase(kb_path), KnowledgeBase(tmp_path / "fresh")
    assert [(c.id, c.file, c.title, c.start, c.text) for c in a.chunks] == \
           [(c.id, c.file, c.title, c.start, c.text) for c in b.chunks]
    assert a.files == b.files and rebuilt.chunks == update.chunks
    assert np.abs(np.asarray(a.vectors) - np.asarray(b.vectors)).max() < 1e-5
    assert "9000" in Retriever(a, embedder).search("server port", k=1, method="bm25")[0].chunk.text


def test_bad_input_leaves_the_knowledge_base_intact(tmp_path, embedder):
    from lmforge.embed import Embedder
    from lmforge.model import DecoderLM, preset
    from lmforge.runtime import Runtime

    corpus = write_corpus(tmp_path / "docs")
    kb_path = tmp_path / "kb"
    index_paths([corpus], kb_path, encoder=embedder, max_tokens=64, progress=False)
    before = (kb_path / "kb.sqlite").read_bytes()
    (corpus / "broken.txt").write_bytes(b"\xff\xfe")
    with pytest.raises(InputError, match="broken.txt"):
        index_paths([corpus], kb_path, encoder=embedder, max_tokens=64, progress=False)
    assert (kb_path / "kb.sqlite").read_bytes() == before
    other = Embedder(DecoderLM(preset("bert-tiny", vocab_size=30522, head="hidden")).eval(), embedder.tokenizer,
                     Runtime.resolve("cpu", "fp32"))
    (corpus / "broken.txt").unlink()
    with pytest.raises(InputError, match="encoder"):
        index_paths([corpus], kb_path, encoder=other, max_tokens=64, progress=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no files to index"):
        index_paths([empty], tmp_path / "kb2", encoder=embedder, progress=False)
    with pytest.raises(InputError, match="not a knowledge base"):
        KnowledgeBase(empty)


def test_bm25_words_for_chinese_and_english():
    assert bm25_tokens("Hello, World_2!") == ["hello", "world_2"]
    assert bm25_tokens("学习") == ["学", "习", "学习"]


def test_an_hnsw_graph_finds_the_nearest_chunks(tmp_path, embedder, capsys):
    """On 2000 vectors in 40 clusters the default graph finds the exact top 10; a graph with few links
    and a short walk misses many (the settings matter). A knowledge base built with the graph answers
    dense and hybrid searches as exact search does; updating it without the graph removes the file."""
    from lmforge.rag.ann import ANN_FILE, HNSWIndex

    rng = np.random.default_rng(0)

    def unit(x):
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    data = unit(rng.normal(size=(40, 64))[rng.integers(40, size=2000)] + 0.5 * rng.normal(size=(2000, 64)))
    queries = unit(data[:50] + 0.1 * rng.normal(size=(50, 64)))
    exact = np.argsort(-(queries @ data.T), axis=1)[:, :10]

    def recall(graph, ef_search):
        return np.mean([len(set(graph.search(q, 10, ef_search)[0]) & set(e)) / 10 for q, e in zip(queries, exact)])

    graph = HNSWIndex.build(data)
    assert recall(graph, 128) > 0.98 and len(graph) == 2000
    assert recall(HNSWIndex.build(data, m=4, ef_construction=8), 10) < 0.8
    rows, scores = graph.search(queries[0], 5)
    np.testing.assert_allclose(scores, data[rows] @ queries[0], atol=1e-5)
    assert list(scores) == sorted(scores, reverse=True)

    corpus = write_corpus(tmp_path / "docs")
    report = index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, ann="on", progress=False)
    kb = KnowledgeBase(tmp_path / "kb")
    assert report.ann and (tmp_path / "kb" / ANN_FILE).is_file() and len(kb.ann) == len(kb)
    walked, read_all = Retriever(kb, embedder), Retriever(kb, embedder, exact=True)
    assert walked.ann is not None and read_all.ann is None
    for query in ("How do I make hot water for a cup of tea?", "capital of France", "install the software"):
        for method in ("dense", "hybrid"):
            assert [h.chunk.id for h in walked.search(query, k=4, method=method)] == \
                   [h.chunk.id for h in read_all.search(query, k=4, method=method)]
    index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, ann="off", progress=False)
    assert not (tmp_path / "kb" / ANN_FILE).exists() and KnowledgeBase(tmp_path / "kb").ann is None
    assert main(["rag", "index", str(corpus), "--out", str(tmp_path / "kb"), "--quiet", "--ann", "on"]) == 0
    assert "HNSW graph built" in capsys.readouterr().out
    assert main(["rag", "search", str(tmp_path / "kb"), "tea", "--method", "dense", "--exact"]) == 0
    assert "kettle" in capsys.readouterr().out


def test_cli_index_and_search(tmp_path, capsys):
    corpus = write_corpus(tmp_path / "docs")
    assert main(["rag", "index", str(corpus), "--out", str(tmp_path / "kb"), "--quiet", "--max-tokens", "64"]) == 0
    assert "5 files" in capsys.readouterr().out
    assert main(["rag", "search", str(tmp_path / "kb"), "capital of France", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("[1]") and "Paris" in out
    assert main(["rag", "search", str(tmp_path / "nowhere"), "x"]) == 2
    assert main(["rag", "index", str(tmp_path / "missing"), "--out", str(tmp_path / "kb3")]) == 2


def test_ask_cites_its_sources_and_does_not_guess(tmp_path, embedder, tiny_lm, capsys):
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.rag.ask import NOT_FOUND, ask, build_messages

    corpus = write_corpus(tmp_path / "docs")
    index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, progress=False)
    retriever = Retriever(KnowledgeBase(tmp_path / "kb"), embedder)
    seen = []

    def answer_with(text):
        def generate(messages, max_new_tokens):
            seen.append(messages)
            return text
        return generate

    answer = ask(retriever, "What is the capital of France?", answer_with("Paris [1], see also [9]."), k=3)
    assert answer.found and answer.cited == [1] and len(answer.sources) == 3
    system = seen[0][0]["content"]
    assert "[1] geo\nThe capital of France is Paris." in system and "[1] or [2]" in system
    assert seen[0][1] == {"role": "user", "content": "What is the capital of France?"}
    assert build_messages("q", answer.sources)[0]["content"] == system
    # nothing relevant: the model is not asked at all
    unrelated = ask(retriever, "Which football club won the 1998 cup final?", answer_with("guess"), min_score=0.5)
    assert (unrelated.found, unrelated.text, unrelated.sources) == (False, NOT_FOUND, []) and len(seen) == 1

    class NoJudge:  # nor is a reranker: relevance is checked first
        def loglikelihood(self, pairs, desc=""):
            raise AssertionError("the reranker was asked about an unanswerable question")

    from lmforge.rag.rerank import LMReranker

    picky = Retriever(retriever.kb, embedder, reranker=LMReranker(NoJudge()))
    assert not ask(picky, "Which football club won the 1998 cup final?", answer_with("guess"), min_score=0.5,
                   rerank=True).found
    # the command line, with a local model (random weights: the words are noise, the plumbing is not)
    write_checkpoint(tmp_path / "model", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    assert main(["rag", "ask", str(tmp_path / "kb"), "What is the capital of France?", "--model",
                 str(tmp_path / "model"), "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32"]) == 0
    out = capsys.readouterr().out
    assert "sources:" in out and "[1] geo" in out
    # many questions at once: answered together on the engine, each as it would be alone
    from lmforge.rag.ask import local_generator

    generate = local_generator(tiny_lm)
    chats = [build_messages(q, answer.sources) for q in ("Where is Paris?", "What boils water?", "Rust?")]
    assert generate.batch(chats, 6) == [generate(m, 6) for m in chats]


def test_rag_eval_scores_each_retriever(tmp_path, embedder, capsys):
    from lmforge.rag.evaluate import Question, evaluate_retrieval, read_questions, sampled_questions

    corpus = write_corpus(tmp_path / "docs")
    index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, progress=False)
    kb = KnowledgeBase(tmp_path / "kb")
    retriever = Retriever(kb, embedder)
    paris = next(c for c in kb.chunks if "Paris" in c.text)
    questions = [Question("capital of France", (paris.source,)),  # one relevant chunk, found first by every method
                 Question("Which keyword hides in the text?", ("no-such-file.md", "faq.jsonl"))]
    results = evaluate_retrieval(retriever, questions[:1])
    for figures in results.values():
        assert figures == {"recall@1": 1.0, "recall@5": 1.0, "recall@10": 1.0, "mrr": 1.0, "ndcg@10": 1.0}
    with pytest.raises(InputError, match="none of its sources"):
        evaluate_retrieval(retriever, [Question("x", ("no-such-file.md",))])
    half = evaluate_retrieval(retriever, questions[1:], ("bm25",))["bm25"]
    assert half["recall@10"] <= 0.5  # one of its two sources does not exist: at most half can be found
    drawn = sampled_questions(kb, count=5, seed=3)
    assert drawn == sampled_questions(kb, count=5, seed=3) and len(drawn) == 5
    assert all(len(q.text.split()) == 6 and q.sources[0] in kb.files for q in drawn)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "capital of France", "sources": ["faq.jsonl"]}) + "\n")
    assert read_questions(tmp_path / "qa.jsonl") == [Question("capital of France", ("faq.jsonl",))]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "no sources"}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: 'sources'"):
        read_questions(tmp_path / "bad.jsonl")
    assert main(["rag", "eval", str(tmp_path / "kb"), str(tmp_path / "qa.jsonl"), "--out", str(tmp_path / "r.json")]) == 0
    assert "| hybrid | 1.000 | 1.000 | 1.000 | 1.000 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["questions"] == 1
    assert main(["rag", "eval", str(tmp_path / "kb"), str(tmp_path / "bad.jsonl")]) == 2
    # fusion weights: with dense's weight 0, hybrid ranks as BM25 does
    drawn = sampled_questions(kb, count=20, seed=1)
    only_bm25 = evaluate_retrieval(retriever, drawn, ("bm25", "hybrid"), weights=(1.0, 0.0))
    assert only_bm25["hybrid"]["mrr"] == pytest.approx(only_bm25["bm25"]["mrr"], abs=0.05)



def test_claims_are_checked_against_the_chunks_they_cite():
    from lmforge.rag.retrieve import Hit
    from lmforge.rag.store import StoredChunk
    from lmforge.rag.support import LexicalJudge, ModelJudge, check_claims, split_claims, strip_citations

    def hit(text, rank):
        chunk = StoredChunk(f"id{rank}", f"doc{rank}.md", "t", 0, len(text), text, 10, file=f"doc{rank}.md")
        return Hit(chunk, 1.0, rank, "hybrid")

    sources = [hit("The with statement calls __exit__ when the block ends, even after an exception.", 1),
               hit("Paris is the capital of France. It lies on the Seine.", 2)]
    answer = ("The with statement calls __exit__ when the block ends [1]. Paris lies on the Seine [2]. "
              "Paris has ten million dragons [2]. See [1]. Lyon is older.")
    assert strip_citations("Paris [1].") == "Paris."
    assert split_claims(answer, 2) == [("The with statement calls __exit__ when the block ends.", (1,)),
                                       ("Paris lies on the Seine.", (2,)), ("Paris has ten million dragons.", (2,)),
                                       ("Lyon is older.", (1, 2))]  # "See [1]." is not a claim; Lyon: every citation
    claims = check_claims(answer, sources)
    assert [c.supported for c in claims] == [True, True, False, False]
    assert claims[0].score == 1.0 and claims[2].score == pytest.approx(1 / 4)  # paris / ten million dragons
    # a claim in the wrong source is not supported by the one it cites
    assert not check_claims("Paris lies on the Seine [1].", sources)[0].supported
    # an answer that cites nothing supports nothing; numbers past the sources are not citations
    assert [c.supported for c in check_claims("Paris lies on the Seine [7].", sources)] == [False]
    assert LexicalJudge(threshold=0.2).supported(0.25)
    # grounded: every claim against all the sources shown, whatever it cites
    assert [c.supported for c in check_claims("Paris lies on the Seine [1].", sources, cited_only=False)] == [True]

    class Judge:  # yes for claims about Paris: the prompts carry the claim and the text it cites
        def __init__(self):
            self.pairs = []

        def loglikelihood(self, pairs, desc=""):
            from lmforge.eval.harness import Loglikelihood

            self.pairs += pairs
            return [Loglikelihood(-1.0 if ("Claim: Paris" in p) == (a == " yes") else -3.0, True, 1) for p, a in pairs]

    judge = Judge()
    judged = check_claims(answer, sources, ModelJudge(judge))
    assert [c.supported for c in judged] == [False, True, True, False] and judged[1].score == 2.0
    assert len(judge.pairs) == 8 and "Passage:\nParis is the capital" in judge.pairs[2][0]
    assert "__exit__" in judge.pairs[6][0] and "Paris is" in judge.pairs[6][0]  # uncited claim: every cited chunk


def test_rag_eval_scores_answers(tmp_path, embedder, tiny_lm, capsys):
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.rag.evaluate import BUILTIN, Question, evaluate_answers, read_questions

    corpus = write_corpus(tmp_path / "docs")
    index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, progress=False)
    retriever = Retriever(KnowledgeBase(tmp_path / "kb"), embedder)
    replies = {"What is the capital of France?": "Paris [1].",
               "Does Rust have a garbage collector?": "Rust has a garbage collector made of gold.",
               "Which football club won the 1998 cup final?": "never asked"}
    questions = [Question("What is the capital of France?", ("faq.jsonl",), ("Paris",)),
                 Question("Does Rust have a garbage collector?", ("faq.jsonl",), ("no",)),
                 Question("Which football club won the 1998 cup final?", ("guide.md",), ("none",))]
    summary, records = evaluate_answers(retriever, questions, lambda messages, n: replies[messages[1]["content"]],
                                        k=2, min_score=0.5, progress=False)
    assert [r["exact_match"] for r in records] == [1.0, 0.0, 0.0]
    assert [r["contains"] for r in records] == [1.0, 0.0, 0.0]
    assert [r["cited"] for r in records] == [1.0, 0.0, 0.0]
    assert [r["not_found"] for r in records] == [0.0, 0.0, 1.0]
    assert records[0]["claims"] == [] and records[1]["supported"] == 0.0  # "Paris." is no claim; uncited fails
    assert records[1]["grounded"] == 0.0  # the sources say no such thing ("gold" is in no chunk)
    assert summary["supported"]["n"] == 1 and summary["exact_match"]["mean"] == pytest.approx(1 / 3)
    assert summary["source_found"]["mean"] == pytest.approx(2 / 3)
    with pytest.raises(InputError, match="needs an 'answer'"):
        evaluate_answers(retriever, [Question("q", ("faq.jsonl",))], lambda m, n: "", progress=False)
    # the command line: answers from a local model (random weights: the plumbing, not the words)
    (tmp_path / "qa.jsonl").write_text(json.dumps({"question": "What is the capital of France?",
                                                   "sources": ["faq.jsonl"], "answer": ["Paris"]}) + "\n")
    write_checkpoint(tmp_path / "model", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    assert main(["rag", "eval", str(tmp_path / "kb"), str(tmp_path / "qa.jsonl"), "--model", str(tmp_path / "model"),
                 "--max-new-tokens", "4", "--device", "cpu", "--dtype", "fp32", "--out", str(tmp_path / "r.json")]) == 0
    assert "| contains |" in capsys.readouterr().out
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["answers"]["cited"]["n"] == 1 and report["replies"][0]["answers"] == ["Paris"]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"question": "q", "sources": ["faq.jsonl"], "answer": 3}) + "\n")
    with pytest.raises(InputError, match=r"bad.jsonl:1: 'answer'"):
        read_questions(tmp_path / "bad.jsonl")
    assert BUILTIN["langref"].is_file()


def test_builtin_langref_questions_are_answered_by_their_sources(tmp_path):
    """The packaged question set names only topics that exist, and each short answer is in its sources' text."""
    from lmforge.eval.metrics import answer_tokens
    from lmforge.rag.evaluate import read_questions

    assert main(["rag", "langref", str(tmp_path / "ref")]) == 0
    texts = {p.name: " ".join(answer_tokens(p.read_text(encoding="utf-8"))) for p in (tmp_path / "ref").glob("*.md")}
    assert len(texts) > 70 and "with.md" in texts
    questions = read_questions("langref")
    assert len(questions) >= 100 and len({q.text for q in questions}) == len(questions)
    for question in questions:
        assert set(question.sources) <= set(texts), question
        assert question.answers and any(" ".join(answer_tokens(a)) in " ".join(texts[s] for s in question.sources)
                                        for a in question.answers), question

def test_train_retriever_beats_the_untrained_encoder(tmp_path, embedder):
    """60 topics, each a document of 3 sentences: 7 words from a pool of 10 shared by every document, and
    the topic's own word. A random-weight encoder (BERT layout, the MiniLM tokenizer) pools all words
    alike and is misled by the shared ones; 100 steps of in-batch-negative training on 192 questions
    drawn from the documents teach it to weigh the rare word, and retrieval for 48 held-out questions
    improves (MRR 0.51 -> 0.68 when written)."""
    import torch

    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.embed import load
    from lmforge.model import DecoderLM, preset
    from lmforge.rag.train import train_retriever

    rng = np.random.default_rng(0)
    vocab = sorted(w for w in embedder.tokenizer.hf.get_vocab() if w.isalpha() and w.isascii() and len(w) > 4)[:3000]
    topics = [str(w) for w in rng.choice(vocab, 60, replace=False)]
    shared = [w for w in vocab if w not in set(topics)][:10]
    folder = tmp_path / "docs"
    folder.mkdir()
    for topic in topics:
        sentences = []
        for _ in range(3):
            words = [str(w) for w in rng.choice(shared, 7)]
            words.insert(int(rng.integers(8)), topic)
            sentences.append(" ".join(words) + ".")
        (folder / f"{topic}.md").write_text(" ".join(sentences) + "\n")
    torch.manual_seed(0)
    model = DecoderLM(preset("bert-tiny", vocab_size=30522, head="hidden", max_seq_len=64))
    write_checkpoint(tmp_path / "random", model.config, model_state(model), embedder.tokenizer)
    index_paths([folder], tmp_path / "kb", encoder=str(tmp_path / "random"), max_tokens=48, progress=False)
    report = train_retriever(tmp_path / "kb", tmp_path / "trained", encoder=str(tmp_path / "random"), steps=100,
                             batch_size=32, lr=1e-3, questions_per_chunk=4, progress=False)
    assert (report["train_pairs"], report["test_questions"]) == (192, 48)
    assert report["after"]["mrr"] > report["before"]["mrr"] + 0.1
    assert report["after"]["recall@1"] > report["before"]["recall@1"]
    trained = load(report["checkpoint"])  # carries its pooling settings: usable as an --encoder
    assert (trained.pooling, trained.normalize) == ("mean", True) and trained.encode("x").shape == (64,)
    index_paths([write_corpus(tmp_path / "small") / "faq.jsonl"], tmp_path / "kb-small", encoder=embedder,
                progress=False)
    with pytest.raises(InputError, match="at least 10"):
        train_retriever(tmp_path / "kb-small", tmp_path / "x", encoder="all-minilm-l6-v2", steps=1, progress=False)


def test_a_language_model_reranks_the_candidates(tmp_path, embedder, tiny_lm, capsys):
    from lmforge.checkpoint import model_state, write_checkpoint
    from lmforge.eval.harness import LocalModel, Loglikelihood
    from lmforge.rag.evaluate import Question, evaluate_retrieval
    from lmforge.rag.rerank import LMReranker

    corpus = write_corpus(tmp_path / "docs")
    index_paths([corpus], tmp_path / "kb", encoder=embedder, max_tokens=64, progress=False)
    kb = KnowledgeBase(tmp_path / "kb")

    class Judge:  # says "yes" to the passage about kettles only
        def __init__(self):
            self.pairs = []

        def loglikelihood(self, pairs, desc=""):
            self.pairs += pairs
            return [Loglikelihood(0.0 if ("kettle" in context) == (answer == " yes") else -5.0, True, 1)
                    for context, answer in pairs]

    judge = Judge()
    retriever = Retriever(kb, embedder, reranker=LMReranker(judge), rerank_candidates=4)
    plain = retriever.search("capital of France", k=4, method="bm25")
    reranked = retriever.search("capital of France", k=6, method="bm25", rerank=True)
    expected = sorted(plain, key=lambda h: ("kettle" not in h.chunk.text, h.rank))  # the judge's order, ties kept
    assert [h.chunk.id for h in reranked[:len(plain)]] == [h.chunk.id for h in expected]
    assert [h.rank for h in reranked] == list(range(1, len(reranked) + 1))
    assert len(judge.pairs) == 2 * len(plain) and "Question: capital of France" in judge.pairs[0][0]
    kettle = next(c for c in kb.chunks if "kettle" in c.text)
    results = evaluate_retrieval(retriever, [Question("kettle water tea", (kettle.source,))], ("hybrid", "hybrid+rerank"))
    assert results["hybrid+rerank"]["mrr"] == 1.0
    with pytest.raises(InputError, match="reranker"):
        Retriever(kb, embedder).search("x", rerank=True)
    # a real model through the engine (random weights: any order, but one score per candidate)
    scores = LMReranker(LocalModel(tiny_lm, chat=True, progress=False)).scores("capital of France", plain)
    assert len(scores) == len(plain) and all(np.isfinite(scores))
    write_checkpoint(tmp_path / "model", tiny_lm.model.config, model_state(tiny_lm.model), tiny_lm.tokenizer)
    assert main(["rag", "search", str(tmp_path / "kb"), "capital of France", "--rerank", str(tmp_path / "model"),
                 "--device", "cpu", "--dtype", "fp32", "-k", "2"]) == 0
    assert capsys.readouterr().out.startswith("[1]")
