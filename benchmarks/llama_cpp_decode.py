"""Run inside an environment that has llama-cpp-python (never lmforge's: it must not touch torch).

    python llama_cpp_decode.py MODEL.gguf PROMPT_IDS_JSON NEW_TOKENS REPEATS THREADS

Greedy-decodes NEW_TOKENS after the prompt REPEATS times (after one warm-up) and prints
JSON: the tokens of the last run and the median ms per new token (prefill included,
as in benchmarks/decode.py).
"""

import json
import statistics
import sys
import time

from llama_cpp import Llama


def main() -> None:
    path, prompt, count, repeats, threads = sys.argv[1], json.loads(sys.argv[2]), *map(int, sys.argv[3:6])
    llm = Llama(model_path=path, n_ctx=len(prompt) + count, n_threads=threads, n_batch=len(prompt), verbose=False)

    def run() -> list[int]:
        llm.reset()
        out = []
        for token in llm.generate(prompt, top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == count:
                return out
        return out

    run()
    times, tokens = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = run()
        times.append((time.perf_counter() - start) * 1000 / count)
    print(json.dumps({"tokens": tokens, "ms_per_token": statistics.median(times)}))


if __name__ == "__main__":
    main()
