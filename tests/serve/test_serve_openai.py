"""Conformance: the official `openai` client against a live `lmforge serve`, unchanged.

Every parameter the server takes is sent through the client, streaming and not, and the
answers are checked against what the model computes directly; error cases must come back
as 4xx with OpenAI's error object, and the server must keep serving after them.
"""

from __future__ import annotations

import json
import math
import time

import httpx
import openai
import pytest
import torch

from lmforge.infer.request import Request
from lmforge.infer.sampling import SamplingConfig

MODEL = "tiny"  # the live server's model name (conftest.py)


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, content="Tell me about Paris.", **params):
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **params)


def test_models_and_health(client, live_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(live_server + "/health").json()["status"] == "ok"


def test_chat_answer_usage_and_its_stream_agree(client, served):
    answer = chat(client, temperature=0, max_tokens=12)
    choice = answer.choices[0]
    prompt = served.chat_ids([{"role": "user", "content": "Tell me about Paris."}])
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert answer.usage.prompt_tokens == len(prompt)
    assert answer.usage.total_tokens == answer.usage.prompt_tokens + answer.usage.completion_tokens
    stream = chat(client, temperature=0, max_tokens=12, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == choice.message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert reasons == [choice.finish_reason]


def test_chat_matches_a_direct_engine_run(client, tiny_lm):
    from lmforge.infer.engine import Engine
    from lmforge.tokenizer.chat import end_of_turn_ids

    answer = chat(client, temperature=0.9, top_p=0.9, seed=7, max_tokens=16, extra_body={"top_k": 30})
    prompt = tiny_lm.chat_prompt([{"role": "user", "content": "Tell me about Paris."}])
    config = SamplingConfig(max_new_tokens=16, temperature=0.9, top_p=0.9, top_k=30, seed=7,
                            stop_token_ids=end_of_turn_ids(tiny_lm.tokenizer))
    direct = Engine(tiny_lm.model).generate([Request(prompt, config, decode=tiny_lm.tokenizer.decode)])[0]
    assert answer.choices[0].message.content == direct.text


def test_seed_n_and_sampling_parameters(client):
    params = dict(temperature=1.0, top_p=0.95, max_tokens=10, seed=3, n=3)
    first, again = chat(client, **params), chat(client, **params)
    texts = [c.message.content for c in first.choices]
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in again.choices]  # same seed, same answers
    assert len(set(texts)) > 1  # each choice draws with its own seed
    plain = chat(client, temperature=0, max_tokens=30).choices[0].message.content
    penalised = chat(client, temperature=0, max_tokens=30, presence_penalty=2.0, frequency_penalty=2.0)
    assert penalised.choices[0].message.content != plain


def test_max_completion_tokens_and_stop(client):
    long = chat(client, temperature=0, max_completion_tokens=20)
    assert long.usage.completion_tokens <= 20
    text = long.choices[0].message.content
    assert len(text) > 6
    stop = text[4:6]
    cut = chat(client, temperature=0, max_tokens=20, stop=[stop])
    assert cut.choices[0].message.content == text[:text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or "" for c in chat(client, temperature=0, max_tokens=20,
                                                                       stop=stop, stream=True) if c.choices)
    assert streamed == text[:text.index(stop)]


def test_chat_logprobs(client):
    answer = chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3)
    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens or len(content) == answer.usage.completion_tokens - 1
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.token == entry.top_logprobs[0].token  # greedy takes the likeliest
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob
    raw = bytes(b for e in content for b in e.bytes)  # a token may hold part of a character: join the bytes
    assert raw.decode("utf-8", errors="replace") == answer.choices[0].message.content
    streamed = [e for c in chat(client, temperature=0, max_tokens=6, logprobs=True, top_logprobs=3, stream=True)
                if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == [e.token for e in content]


def test_completions_echo_logprobs_score_the_prompt(client, tiny_lm):
    prompt = "The quick brown fox jumps"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=1, echo=True, logprobs=1, temperature=0)
    choice = out.choices[0]
    ids = tiny_lm.encode_prompt(prompt)
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and len(lp.tokens) == len(ids) + 1
    with torch.no_grad():
        reference = torch.log_softmax(tiny_lm.model(torch.tensor([ids]))[0], dim=-1)
    for i in range(1, len(ids)):
        assert lp.token_logprobs[i] == pytest.approx(float(reference[i - 1, ids[i]]), abs=1e-4)
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, echo=True, logprobs=0)
    assert scored.choices[0].logprobs.token_logprobs[1:] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-5)
    assert scored.choices[0].text == tiny_lm.tokenizer.decode(ids) and scored.usage.completion_tokens == 0


def test_completions_batch_of_prompts_stream_and_usage(client):
    out = client.completions.create(model=MODEL, prompt=["Paris is", "The dog"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]
    assert out.choices[0].text == out.choices[1].text  # greedy: both choices agree
    stream = client.completions.create(model=MODEL, prompt="Paris is", max_tokens=5, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == out.choices[0].text
    assert chunks[-1].choices == [] and 1 <= chunks[-1].usage.completion_tokens <= 5


def test_json_object_and_json_schema_always_parse(client):
    obj = chat(client, max_tokens=80, temperature=1.0, seed=1, response_format={"type": "json_object"})
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                               "days": {"type": "integer"},
                                               "sunny": {"type": "boolean"}},
              "required": ["city", "days", "sunny"], "additionalProperties": False}
    for seed in range(3):
        answer = chat(client, max_tokens=60, temperature=1.0, seed=seed,
                      response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}})
        value = json.loads(answer.choices[0].message.content)
        assert set(value) == {"city", "days", "sunny"} and isinstance(value["days"], int)
        assert isinstance(value["sunny"], bool) and len(value["city"]) <= 12


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "weather in a city",
                                            "parameters": {"type": "object",
                                                           "properties": {"city": {"type": "string", "maxLength": 10}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}


def test_tool_calls_forced_named_and_required(client):
    named = chat(client, "Weather in Paris?", tools=[WEATHER, TIME], max_tokens=40, temperature=0.8, seed=2,
                 tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    required = chat(client, "Time?", tools=[WEATHER, TIME], tool_choice="required", max_tokens=40, seed=3)
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    deltas = [c.choices[0].delta for c in chat(client, "Weather in Paris?", tools=[WEATHER], max_tokens=40,
                                                  seed=2, temperature=0.8, stream=True,
                                                  tool_choice={"type": "function", "function": {"name": "get_weather"}})
              if c.choices]
    streamed = [t for d in deltas for t in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].function.name == "get_weather"
    assert json.loads(streamed[0].function.arguments) == json.loads(call.function.arguments)
    # the conversation goes on with the tool's answer
    follow = client.chat.completions.create(model=MODEL, max_tokens=5, messages=[
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "sunny"}], tools=[WEATHER])
    assert follow.choices[0].message.role == "assistant"


def test_auto_tool_choice_without_a_call_is_plain_content(client):
    answer = chat(client, "Hello", tools=[WEATHER], max_tokens=10, temperature=0)
    assert answer.choices[0].message.tool_calls is None
    assert isinstance(answer.choices[0].message.content, str)
    assert answer.choices[0].finish_reason in ("stop", "length")


def test_embeddings(client, tiny_lm):
    floats = client.embeddings.create(model=MODEL, input=["Paris", "The dog"], encoding_format="float")
    packed = client.embeddings.create(model=MODEL, input=["Paris", "The dog"])  # the client asks for base64
    assert len(floats.data) == 2 and len(floats.data[0].embedding) == tiny_lm.model.config.dim
    assert math.isclose(sum(x * x for x in floats.data[0].embedding), 1.0, rel_tol=1e-4)
    assert packed.data[1].embedding == pytest.approx(floats.data[1].embedding, abs=1e-6)
    assert floats.usage.prompt_tokens == len(tiny_lm.tokenizer.encode("Paris")) + len(tiny_lm.tokenizer.encode("The dog"))


@pytest.mark.parametrize("params, status, param", [
    ({"model": "nope"}, 404, "model"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"n": 100}, 400, "n"),
    ({"max_tokens": 5000}, 400, "max_tokens"),
    ({"top_p": 0}, 400, "top_p"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages"),
    ({"response_format": {"type": "yaml"}}, 400, "response_format"),
    ({"tool_choice": "required"}, 400, "tool_choice"),
])
def test_bad_requests_get_openai_errors(live_server, params, status, param):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **params}
    response = httpx.post(live_server + "/v1/chat/completions", json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] is None or error["param"].startswith(param)
    assert httpx.get(live_server + "/health").status_code == 200


def test_malformed_json_too_long_prompt_and_client_errors(client, live_server):
    response = httpx.post(live_server + "/v1/chat/completions", content=b"{not json",
                          headers={"content-type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="word " * 3000, max_tokens=4)
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="missing", messages=[{"role": "user", "content": "x"}])
    assert chat(client, max_tokens=2).choices  # still serving


def metric(base: str, name: str) -> float:
    for line in httpx.get(base + "/metrics").text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def test_metrics_and_prefix_cache_across_turns(client, live_server):
    first = chat(client, "Tell me a story about a fox.", max_tokens=8, temperature=0)
    second = client.chat.completions.create(model=MODEL, max_tokens=8, temperature=0, messages=[
        {"role": "user", "content": "Tell me a story about a fox."},
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And then?"}])
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens - 1
    text = httpx.get(live_server + "/metrics").text
    for name in ("lmforge_requests_total", "lmforge_prompt_tokens_total", "lmforge_completion_tokens_total",
                 "lmforge_time_to_first_token_seconds_bucket", "lmforge_inter_token_latency_seconds_bucket",
                 "lmforge_queue_length", "lmforge_running_batch_size", "lmforge_kv_cache_usage_ratio",
                 "lmforge_prefix_cache_hit_rate"):
        assert name in text, name
    assert metric(live_server, "lmforge_prefix_cache_hit_rate") > 0
    assert 'lmforge_requests_total{endpoint="/v1/chat/completions",status="200"}' in text


def test_a_client_that_disconnects_frees_its_row(live_server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", live_server + "/v1/chat/completions", json=body) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        assert metric(live_server, "lmforge_running_batch_size") == 1
    deadline = time.monotonic() + 10
    while metric(live_server, "lmforge_running_batch_size") != 0:
        assert time.monotonic() < deadline, "the aborted request still holds its row"
        time.sleep(0.05)


def test_api_key(tiny_lm, start_server):
    from lmforge.serve.served_model import ServedModel

    with start_server({MODEL: ServedModel(MODEL, tiny_lm, max_batch_size=1)}, api_key="secret") as url:
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        assert httpx.get(url + "/v1/models").status_code == 401
        assert openai.OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0).models.list().data
        assert httpx.get(url + "/health").status_code == 200


def test_a_speculative_server_answers_as_the_plain_one(client, tiny_lm, start_server):
    """``lmforge serve --prompt-lookup``: every request gets a drafter of its own; greedy answers, streamed
    or not, equal the plain server's; requests speculation cannot keep exact (penalties, JSON mode)
    decode plainly; /metrics counts the guesses."""
    import dataclasses

    from lmforge.cli import _speculative_options, make_parser
    from lmforge.infer.speculative import PromptLookup
    from lmforge.serve.served_model import ServedModel

    options = _speculative_options(make_parser().parse_args(["serve", "m", "--prompt-lookup", "--draft-tokens", "3"]))
    assert options == {"draft": None, "prompt_lookup": 3, "draft_layers": 0, "draft_tokens": 3}
    looked = dataclasses.replace(tiny_lm, drafter=PromptLookup(options["prompt_lookup"]), draft_tokens=3)
    with start_server({MODEL: ServedModel(MODEL, looked, max_batch_size=4, context=2048)}) as url:
        fast = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=60)
        for content in ("Paris is the capital of France. Paris is", "Repeat: true false null, true false"):
            want = chat(client, content, temperature=0, max_tokens=40).choices[0].message.content
            assert chat(fast, content, temperature=0, max_tokens=40).choices[0].message.content == want
            streamed = chat(fast, content, temperature=0, max_tokens=40, stream=True)
            assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == want
        assert chat(fast, presence_penalty=0.5, max_tokens=6).choices[0].finish_reason in ("stop", "length")
        answer = chat(fast, "Give me JSON.", max_tokens=40, response_format={"type": "json_object"})
        json.loads(answer.choices[0].message.content)
        assert 0 < metric(url, "lmforge_draft_accepted_tokens") <= metric(url, "lmforge_draft_tokens")


def test_full_queue_answers_429_with_retry_after(tiny_lm, start_server):
    from lmforge.serve.served_model import ServedModel

    one_slot = ServedModel(MODEL, tiny_lm, max_batch_size=1, context=2048)
    with start_server({MODEL: one_slot}, max_queue=0) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "max_tokens": 1500,
                "stream": True, "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body) as busy:
            next(busy.iter_lines())
            response = httpx.post(url + "/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            assert response.status_code == 429 and response.headers["retry-after"] == "1"
            assert response.json()["error"]["type"] == "rate_limit_exceeded"
            with pytest.raises(openai.RateLimitError):
                openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "x"}], max_tokens=2)


def test_sigterm_ends_in_flight_streams_and_exits_cleanly(tiny_lm, tmp_path, port):
    import os
    import signal
    import subprocess
    import sys

    from lmforge.checkpoint import save_checkpoint

    save_checkpoint(tmp_path / "model", tiny_lm.model, tiny_lm.tokenizer)
    server = subprocess.Popen([sys.executable, "-m", "lmforge.cli", "serve", str(tmp_path / "model"), "--port",
                               str(port), "--graceful-seconds", "1", "--max-batch-size", "2"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                assert time.monotonic() < deadline and server.poll() is None, "the server did not start"
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 2000, "stream": True,
                "ignore_eos": True}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=30) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(server.pid, signal.SIGTERM)
            rest = [line for line in lines if line]  # the stream ends instead of hanging
        assert server.wait(timeout=30) == 0
        assert rest[-1] == "data: [DONE]"  # closed properly, not cut
        assert len(rest) < 2 * 2000
    finally:
        if server.poll() is None:
            server.kill()
        output = server.stdout.read()
    assert "Traceback" not in output, output


def test_remote_tokenizer_routes_for_lm_evaluation_harness(live_server, tiny_lm):
    info = httpx.get(live_server + "/tokenizer_info").json()
    assert info["eos_token"] == tiny_lm.tokenizer.decode([tiny_lm.tokenizer.eos_id]) and info["chat_template"]
    text = "The quick brown fox"
    plain = httpx.post(live_server + "/tokenize", json={"prompt": text, "add_special_tokens": False}).json()
    assert plain["tokens"] == tiny_lm.tokenizer.encode(text) and plain["count"] == len(plain["tokens"])
    framed = httpx.post(live_server + "/tokenize", json={"prompt": text}).json()["tokens"]
    assert framed == tiny_lm.encode_prompt(text)
    back = httpx.post(live_server + "/detokenize", json={"tokens": plain["tokens"]}).json()["prompt"]
    assert back == text
    assert httpx.post(live_server + "/detokenize", json={"tokens": [10**9]}).status_code == 400


def test_an_engine_failure_fails_its_requests_and_the_server_goes_on(tiny_lm, start_server):
    from lmforge.serve.served_model import ServedModel

    served = ServedModel(MODEL, tiny_lm, max_batch_size=2)
    real_step, calls = served.engine.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real_step()

    served.engine.step = failing_step
    with start_server({MODEL: served}) as url:
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
        failed = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
        assert failed.status_code == 500 and "boom" in failed.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", json=body, timeout=30).status_code == 200


def test_several_models_by_name(tiny_lm, start_server):
    from lmforge.api import LanguageModel
    from lmforge.model import DecoderLM, preset
    from lmforge.serve.served_model import ServedModel

    torch.manual_seed(5)
    other = LanguageModel(DecoderLM(preset("tiny", vocab_size=tiny_lm.model.config.vocab_size, max_seq_len=256)).eval(),
                          tiny_lm.tokenizer, tiny_lm.runtime)
    models = {"first": ServedModel("first", tiny_lm, max_batch_size=1), "second": ServedModel("second", other, 1)}
    with start_server(models) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in client.models.list().data] == ["first", "second"]
        assert client.models.retrieve("second").model_dump()["max_model_len"] == 256
        answers = {name: client.completions.create(model=name, prompt="The quick", max_tokens=8, temperature=0,
                                                   logprobs=0).choices[0].logprobs.token_logprobs
                   for name in ("first", "second")}
        assert answers["first"] != answers["second"]  # each name reaches its own weights
        assert models["second"].engine.stats.decode_steps > 0 and models["first"].engine.stats.decode_steps > 0


def test_an_encoder_decoder_serves_completions_and_chat(start_server, tiny_lm):
    """An encoder-decoder behind the server: the prompt (or the chat) is its source, the answer what
    generate and chat write; echo with log-probs (a source has none) gets a 400."""
    import dataclasses

    from lmforge.model import ModelConfig, build_model
    from lmforge.serve.served_model import ServedModel

    torch.manual_seed(0)
    config = ModelConfig(vocab_size=tiny_lm.tokenizer.vocab_size, max_seq_len=128, dim=64, num_layers=2,
                         decoder_layers=2, num_heads=2, num_kv_heads=2, position="relative")
    lm = dataclasses.replace(tiny_lm, model=build_model(config).eval())
    with start_server({"t5": ServedModel("t5", lm, max_batch_size=2, context=128)}) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        prompts = ["Paris is", "The quick brown fox"]
        out = client.completions.create(model="t5", prompt=prompts, max_tokens=8, temperature=0)
        assert [c.text for c in sorted(out.choices, key=lambda c: c.index)] == \
               [lm.generate(p, max_new_tokens=8, temperature=0) for p in prompts]
        messages = [{"role": "user", "content": "Tell me about Paris."}]
        answer = client.chat.completions.create(model="t5", messages=messages, max_tokens=8, temperature=0)
        assert answer.choices[0].message.content == lm.chat(messages, max_new_tokens=8, temperature=0)
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model="t5", prompt="Paris", max_tokens=1, echo=True, logprobs=1)
