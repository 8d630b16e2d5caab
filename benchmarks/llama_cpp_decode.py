"""Run inside an environment that has llama-cpp-python (never lmforge's: it must not touch torch).

    python llama_cpp_decode.py THREADS CONTEXT MODEL.gguf [MODEL.gguf ...]

Loads every model, prints "ready", then serves requests until standard input ends:
each request is a line of JSON {"model": index, "prompt": [ids], "new_tokens": n}; the
reply is a line of JSON {"tokens": [...]}, the greedy continuation. benchmarks/decode.py
times the round trip, so that llama.cpp runs interleaved with the other variants and a
noisy machine slows them alike.
"""

import json
import sys

from llama_cpp import Llama


def main() -> None:
    threads, context, paths = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3:]
    models = [Llama(model_path=path, n_ctx=context, n_threads=threads, n_batch=context, verbose=False)
              for path in paths]
    print("ready", flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        llm = models[request["model"]]
        llm.reset()
        tokens = []
        for token in llm.generate(request["prompt"], top_k=1, temp=0.0, repeat_penalty=1.0, reset=True):
            tokens.append(token)
            if len(tokens) == request["new_tokens"]:
                break
        print(json.dumps({"tokens": tokens}), flush=True)


if __name__ == "__main__":
    main()
