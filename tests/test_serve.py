"""The OpenAI-compatible server on a tiny random GPT-2 with a word-level tokenizer built offline."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch
from fastapi.testclient import TestClient

from conftest import TINY_WORDS
from distill.engine import Engine
from distill.serve import Message, chat_prompt, create_app

PROMPT = "the movie was"


def tiny_chat_lm(directory) -> None:
    """A random 2-layer GPT-2 (context 64) over whole words, the chat fallback's role words included.

    Only <eos> is special, so every other token the random model picks shows up in the text."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    tokens = list(dict.fromkeys(["<eos>", "<unk>", *TINY_WORDS, "System:", "User:", "Assistant:"]))
    core = Tokenizer(models.WordLevel({token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<eos>", pad_token="<eos>")
    config = GPT2Config(
        vocab_size=len(tokens), n_positions=64, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("serve") / "tiny"
    tiny_chat_lm(directory)
    return directory


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, model_name="tiny", batch_wait_ms=1)) as test_client:
        yield test_client


def complete(client, **fields):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def chat(client, **fields):
    messages = [{"role": "user", "content": "i love this film"}]
    response = client.post("/v1/chat/completions", json={"model": "tiny", "messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def events(response) -> list:
    """The JSON payloads of a server-sent event stream, with the final [DONE] as a string."""
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines]


def test_models_unknown_model_and_bad_payloads(client):
    assert client.get("/v1/models").json()["data"][0]["id"] == "tiny"
    for response in (
        client.post("/v1/completions", json={"model": "other", "prompt": "a"}),
        client.post("/v1/chat/completions", json={"model": "other", "messages": [{"role": "user", "content": "a"}]}),
        client.get("/v1/models/other"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "model_not_found"
        assert "other" in response.json()["error"]["message"]
    for bad in (
        {"model": "tiny"},  # no prompt
        {"model": "tiny", "prompt": "a", "temperature": 5},
        {"model": "tiny", "prompt": "a", "n": 0},
        {"model": "tiny", "prompt": "a", "logprobs": 21},
        {"model": "tiny", "prompt": "a", "prompt_logprobs": -1},
        {"model": "tiny", "prompt": "a", "stop": ""},
        {"model": "tiny", "prompt": "a", "best_of": 2},  # unsupported: refused, not ignored
        {"model": "tiny", "prompt": "a", "max_tokens": -1},
        {"model": "tiny", "prompt": ["a", [1, 2]]},  # none of the four prompt forms
        {"model": "tiny", "prompt": [1, True]},
        {"model": "tiny", "prompt": [[1.5]]},
    ):
        assert client.post("/v1/completions", json=bad).status_code == 422, bad
    for bad in (
        {"model": "tiny", "prompt": ["a", [1, 2]]},
        {"model": "tiny", "prompt": [1, True]},
    ):  # one message for a prompt of none of the forms
        error = client.post("/v1/completions", json=bad).json()["error"]
        assert error["param"] == "prompt" and "list of token ids" in error["message"], error
    no_logprobs = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "top_logprobs": 2}
    assert client.post("/v1/chat/completions", json=no_logprobs).status_code == 422
    zero = {"model": "tiny", "messages": [{"role": "user", "content": "a"}], "max_tokens": 0}
    assert client.post("/v1/chat/completions", json=zero).status_code == 422  # chat always answers something
    assert client.post("/v1/chat/completions", json={"model": "tiny", "messages": []}).status_code == 422


def test_prompt_longer_than_context_is_a_400(client):
    response = client.post("/v1/completions", json={"model": "tiny", "prompt": "the " * 80})
    assert response.status_code == 400
    assert "context" in response.json()["error"]["message"]
    too_many = client.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 200})
    assert too_many.status_code == 400 and "at most 61" in too_many.json()["error"]["message"]


def test_greedy_is_deterministic_and_stops_at_max_tokens(client, model_dir):
    first = complete(client, temperature=0, max_tokens=5)
    assert complete(client, temperature=0, max_tokens=5)["choices"] == first["choices"]
    choice = first["choices"][0]
    assert first["object"] == "text_completion" and choice["finish_reason"] == "length"
    assert len(choice["text"].split()) == 5
    assert first["usage"] == {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}
    longer = complete(client, temperature=0, max_tokens=9)["choices"][0]["text"]
    assert longer.startswith(choice["text"])


def test_n_choices_and_seed_reproducibility(client):
    first = complete(client, n=3, temperature=1.0, seed=7, max_tokens=8)
    assert [c["index"] for c in first["choices"]] == [0, 1, 2]
    texts = [c["text"] for c in first["choices"]]
    assert len(set(texts)) == 3  # each choice samples with its own seed
    assert [c["text"] for c in complete(client, n=3, temperature=1.0, seed=7, max_tokens=8)["choices"]] == texts
    assert [c["text"] for c in complete(client, n=3, temperature=1.0, seed=8, max_tokens=8)["choices"]] != texts
    lengths = [8 if c["finish_reason"] == "length" else len(c["text"].split()) + 1 for c in first["choices"]]
    assert first["usage"]["completion_tokens"] >= sum(lengths)  # words, plus the end-of-sequence token if one came
    nucleus = complete(client, n=2, temperature=0.7, top_p=0.001, seed=1, max_tokens=6)["choices"]
    greedy = complete(client, temperature=0, max_tokens=6)["choices"][0]["text"]
    assert [c["text"] for c in nucleus] == [greedy, greedy]  # a tiny nucleus keeps only the most likely token
    two_prompts = client.post("/v1/completions", json={"model": "tiny", "prompt": ["a", "the dog"], "n": 2}).json()
    assert [c["index"] for c in two_prompts["choices"]] == [0, 1, 2, 3]
    assert two_prompts["usage"]["prompt_tokens"] == 3


def test_stop_strings_cut_the_text(client):
    full = complete(client, temperature=1.0, seed=3, max_tokens=12)["choices"][0]["text"]
    words = full.split()
    stop = next(w for i, w in enumerate(words) if i > 0 and w not in words[:i])
    expected = full[: full.find(stop)]
    for stops in (stop, ["never there", stop]):
        choice = complete(client, temperature=1.0, seed=3, max_tokens=12, stop=stops)["choices"][0]
        assert choice == {"index": 0, "text": expected, "logprobs": None, "finish_reason": "stop"}
    with client.stream(
        "POST",
        "/v1/completions",
        json={
            "model": "tiny",
            "prompt": PROMPT,
            "temperature": 1.0,
            "seed": 3,
            "max_tokens": 12,
            "stop": stop,
            "stream": True,
        },
    ) as response:
        chunks = events(response)
    assert "".join(c["choices"][0]["text"] for c in chunks[:-1]) == expected
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop" and chunks[-1] == "[DONE]"


def test_chat_logprobs_are_the_models_log_probabilities(client, model_dir):
    body = chat(client, temperature=0, max_tokens=4, logprobs=True, top_logprobs=3)
    choice = body["choices"][0]
    entries = choice["logprobs"]["content"]
    assert len(entries) == 4 and choice["finish_reason"] == "length"
    for entry in entries:
        assert entry["logprob"] <= 0 and len(entry["top_logprobs"]) == 3
        assert entry["top_logprobs"][0]["token"] == entry["token"]  # greedy: the chosen token is the most likely
        assert entry["top_logprobs"][0]["logprob"] == pytest.approx(entry["logprob"])
        top = [t["logprob"] for t in entry["top_logprobs"]]
        assert top == sorted(top, reverse=True)
        assert entry["bytes"] == list(entry["token"].encode())
    assert "".join(entry["token"] for entry in entries) == choice["message"]["content"]
    sampled = chat(client, temperature=1.0, seed=5, max_tokens=6, logprobs=True)["choices"][0]["logprobs"]["content"]
    assert all(e["top_logprobs"] == [] and e["logprob"] <= 0 for e in sampled)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer, model = AutoTokenizer.from_pretrained(model_dir), AutoModelForCausalLM.from_pretrained(model_dir)
    text, special = chat_prompt(tokenizer, [Message(role="user", content="i love this film")])
    ids = tokenizer(text, add_special_tokens=special)["input_ids"]
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1], dim=-1)  # (V,)
    assert entries[0]["logprob"] == pytest.approx(logprobs.max().item(), abs=1e-4)
    assert body["usage"]["prompt_tokens"] == len(ids)


def test_legacy_completion_logprobs(client):
    choice = complete(client, temperature=1.0, seed=2, max_tokens=6, logprobs=2)["choices"][0]
    logprobs = choice["logprobs"]
    count = len(logprobs["tokens"])
    assert count >= 1 and all(len(logprobs[key]) == count for key in ("token_logprobs", "top_logprobs", "text_offset"))
    assert all(p <= 0 for p in logprobs["token_logprobs"])
    for token, logprob, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"]):
        assert 1 <= len(top) <= 2 and all(p <= 0 for p in top.values())
        assert logprob <= max(top.values()) + 1e-6
        if token in top:
            assert top[token] == pytest.approx(logprob)
    offsets = logprobs["text_offset"]
    assert offsets[0] == len(PROMPT) and offsets == sorted(offsets)
    for token, offset in zip(logprobs["tokens"], offsets):
        assert (PROMPT + choice["text"])[offset : offset + len(token)] == token


def test_streaming_concatenates_to_the_greedy_text(client):
    expected = chat(client, temperature=0, max_tokens=10)
    request = {"model": "tiny", "messages": [{"role": "user", "content": "i love this film"}], "temperature": 0}
    request |= {"max_tokens": 10, "stream": True, "stream_options": {"include_usage": True}}
    with client.stream("POST", "/v1/chat/completions", json=request) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        chunks = events(response)
    assert chunks[-1] == "[DONE]" and chunks[-2]["choices"] == []
    assert chunks[-2]["usage"] == expected["usage"]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(c["object"] == "chat.completion.chunk" for c in chunks[:-1])
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks[:-2])
    assert text == expected["choices"][0]["message"]["content"]
    assert chunks[-3]["choices"][0]["finish_reason"] == expected["choices"][0]["finish_reason"]


def test_streamed_choices_and_logprobs_match_the_response(client):
    fields = {"n": 2, "seed": 4, "temperature": 1.0, "max_tokens": 8, "logprobs": True, "top_logprobs": 2}
    expected = chat(client, **fields)["choices"]
    request = {"model": "tiny", "messages": [{"role": "user", "content": "i love this film"}], "stream": True}
    with client.stream("POST", "/v1/chat/completions", json=request | fields) as response:
        chunks = [c["choices"][0] for c in events(response)[:-1]]
    for index, choice in enumerate(expected):
        mine = [c for c in chunks if c["index"] == index]
        assert "".join(c["delta"].get("content", "") for c in mine) == choice["message"]["content"]
        logprobs = [entry for c in mine if c["logprobs"] for entry in c["logprobs"]["content"]]
        assert logprobs == choice["logprobs"]["content"]
        assert mine[-1]["finish_reason"] == choice["finish_reason"]


def test_batched_greedy_equals_unbatched(model_dir, monkeypatch):
    sizes = []
    generate = Engine.generate

    def recording(self, rows):
        sizes.append(len(rows))
        return generate(self, rows)

    monkeypatch.setattr(Engine, "generate", recording)
    app = create_app(model_dir, model_name="tiny", max_batch_size=8, batch_wait_ms=200)
    prompts = ["the", "a good film and", "i hate this dull boring movie , it", "the dog"]
    requests = [{"model": "tiny", "prompt": p, "temperature": 0, "max_tokens": 7} for p in prompts]
    requests.append({"model": "tiny", "prompt": "the cat", "temperature": 1.0, "seed": 11, "max_tokens": 7})

    async def run(concurrently: bool) -> list[str]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            calls = [lambda r=r: http.post("/v1/completions", json=r) for r in requests]
            responses = await asyncio.gather(*(c() for c in calls)) if concurrently else [await c() for c in calls]
        return [r.json()["choices"][0]["text"] for r in responses]

    alone = asyncio.run(run(concurrently=False))
    assert sizes == [1] * len(requests)
    together = asyncio.run(run(concurrently=True))
    assert max(sizes[len(requests) :]) > 1  # the concurrent requests did share batches
    assert together == alone


def test_chat_prompt_fallback_and_template(model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    messages = [
        Message(role="system", content="be kind"),
        Message(role="user", content=[{"type": "text", "text": "hi"}]),
    ]
    assert chat_prompt(tokenizer, messages) == ("System: be kind\nUser: hi\nAssistant:", True)
    tokenizer.chat_template = "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}<assistant>"
    assert chat_prompt(tokenizer, messages) == ("<system>be kind<user>hi<assistant>", False)


def test_openai_client_against_a_real_server(model_dir):
    openai = pytest.importorskip("openai")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    code = f"from distill.serve import serve; serve({str(model_dir)!r}, port={port}, model_name='tiny', log_level='warning')"
    server = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=1).raise_for_status()
                break
            except httpx.HTTPError:
                if server.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"server did not start: {server.communicate()[0].decode()[-2000:]}")
                time.sleep(0.2)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused", max_retries=0)
        assert [m.id for m in api.models.list()] == ["tiny"]
        messages = [{"role": "user", "content": "i love this film"}]
        reply = api.chat.completions.create(
            model="tiny", messages=messages, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
        )
        assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6
        assert len(reply.choices[0].logprobs.content) == 6
        stream = api.chat.completions.create(
            model="tiny",
            messages=messages,
            temperature=0,
            max_tokens=6,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        assert (
            "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == reply.choices[0].message.content
        )
        assert chunks[-1].usage.total_tokens == reply.usage.total_tokens
        completion = api.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=5, logprobs=1)
        assert completion.choices[0].logprobs.text_offset[0] == len(PROMPT)
        streamed = api.completions.create(model="tiny", prompt=PROMPT, temperature=0, max_tokens=5, stream=True)
        assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
        with pytest.raises(openai.NotFoundError):
            api.completions.create(model="other", prompt="a")
    finally:
        server.terminate()
        server.wait(timeout=10)
