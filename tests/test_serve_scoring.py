"""The legacy completions API spoken whole (issue 14): prompt scoring in the engine and through `distill serve`
(echo with log-probs, `max_tokens` 0, vLLM's `prompt_logprobs`), token-id prompts, frequency and presence penalties,
and their errors; every log-prob checked against the model's own log-softmax."""

from __future__ import annotations

import pytest
import torch
from fastapi.testclient import TestClient

from distill.engine import Engine, SamplingParams, Sequence
from distill.hf import load_causal_lm, load_tokenizer
from distill.scoring import head_problem
from distill.serve import create_app, serve_in_thread
from test_serve import events, tiny_chat_lm

PROMPT = "the movie was really good and the acting"
OTHERS = ["the", "a good film", "i hate this dull boring movie , it was the worst of the year"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("scoring") / "tiny"
    tiny_chat_lm(directory)
    return directory


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine(load_causal_lm(model_dir), load_tokenizer(model_dir))


@pytest.fixture(scope="module")
def client(model_dir):
    with TestClient(create_app(model_dir, model_name="tiny", batch_wait_ms=1)) as test_client:
        yield test_client


def own_logprobs(model, ids: list[int]) -> torch.Tensor:
    """(T, V): the model's log-softmax after each prefix of `ids`, in one plain forward pass."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)


def prompt_targets(model, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """The log-prob of each prompt token after the ones before it (T - 1,), and the full rows (T - 1, V)."""
    rows = own_logprobs(model, ids)[:-1]  # (T - 1, V)
    return rows.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0], rows


def complete(client, **fields) -> dict:
    response = client.post("/v1/completions", json={"model": "tiny", **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_close_json(got, want, atol: float = 1e-5) -> None:
    """`got` equals `want` in every key, string and integer, and in every float to `atol`."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (got, want)
        for key in want:
            assert_close_json(got[key], want[key], atol)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (got, want)
        for a, b in zip(got, want, strict=True):
            assert_close_json(a, b, atol)
    elif isinstance(want, float):
        assert isinstance(got, float) and abs(got - want) <= atol, (got, want)
    else:
        assert got == want


def refused(response, status: int, code: str, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert (error["code"], error["param"]) == (code, param), error
    return error


def scored(engine: Engine, ids: list[int], k: int = 5, **params) -> Sequence:
    fields = {"max_tokens": 0, "prompt_ranks": True} | params
    row = Sequence(list(ids), SamplingParams(**fields, prompt_logprobs=k))
    engine.generate([row])
    return row


def test_scores_are_the_models_own_log_softmax_at_every_position(engine, monkeypatch):
    ids = engine.encode(PROMPT)
    ids.append(int(own_logprobs(engine.model, ids)[-1].argmax()))  # a last token the model likes best
    row = scored(engine, ids)
    target, rows = prompt_targets(engine.model, ids)
    scores = row.prompt_scores
    assert row.finish_reason == "length" and row.generated == 0 and row.text == "" and row.token_ids == []
    assert len(scores.logprobs) == len(ids) - 1
    torch.testing.assert_close(torch.tensor(scores.logprobs), target, atol=1e-5, rtol=0)
    best = rows.topk(5, dim=-1)
    assert scores.top_ids == best.indices.tolist()
    torch.testing.assert_close(torch.tensor(scores.top_logprobs), best.values, atol=1e-5, rtol=0)
    assert scores.ranks == (rows >= target[:, None]).sum(dim=-1).tolist()
    assert scores.ranks[-1] == 1 and max(scores.ranks) > 5  # the model's favourite, and tokens it did not expect
    monkeypatch.setattr(engine, "score_chunk", 2 * engine.vocab_size)  # two positions' logits at a time
    chunked = scored(engine, ids).prompt_scores
    assert chunked.top_ids == scores.top_ids and chunked.ranks == scores.ranks
    torch.testing.assert_close(torch.tensor(chunked.logprobs), torch.tensor(scores.logprobs), atol=1e-6, rtol=0)
    assert scored(engine, ids[:1]).prompt_scores.logprobs == []  # a one-token prompt has nothing to score
    unranked = scored(engine, ids, prompt_ranks=False).prompt_scores
    assert unranked.ranks is None and unranked.top_ids == scores.top_ids
    torch.testing.assert_close(torch.tensor(unranked.logprobs), torch.tensor(scores.logprobs), atol=1e-6, rtol=0)


def test_a_batch_of_mixed_lengths_scores_each_prompt_as_alone(engine):
    prompts = [engine.encode(text) for text in [PROMPT, *OTHERS]]
    alone = [scored(engine, ids, 3).prompt_scores for ids in prompts]
    greedy = Sequence(list(prompts[0]), SamplingParams(max_tokens=6, temperature=0))
    engine.generate([greedy])
    rows = [Sequence(list(ids), SamplingParams(max_tokens=0, prompt_logprobs=3)) for ids in prompts]
    both = Sequence(list(prompts[0]), SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=3))
    plain = Sequence(list(prompts[2]), SamplingParams(max_tokens=4, temperature=0))
    engine.generate([*rows, both, plain])
    for row, expected in zip([*rows, both], [*alone, alone[0]]):
        torch.testing.assert_close(
            torch.tensor(row.prompt_scores.logprobs), torch.tensor(expected.logprobs), atol=1e-5, rtol=0
        )
        assert row.prompt_scores.top_ids == expected.top_ids
    assert both.text == greedy.text and both.finish_reason == greedy.finish_reason  # the scoring pass went on
    assert plain.prompt_scores is None and plain.generated > 0


def test_scoring_alone_costs_one_forward_pass(engine):
    calls: list[str] = []
    hooks = [
        engine.model.register_forward_hook(lambda *_: calls.append("model")),
        engine.model.base_model.register_forward_hook(lambda *_: calls.append("body")),
    ]
    try:
        rows = [Sequence(engine.encode(text), SamplingParams(max_tokens=0, prompt_logprobs=1)) for text in OTHERS]
        engine.generate(rows)
        assert calls == ["body"]  # one pass of the body for the whole batch, no generation step
        calls.clear()
        engine.generate([Sequence(engine.encode(PROMPT), SamplingParams(max_tokens=0))])
        assert calls == []  # nothing asked: nothing computed
    finally:
        for hook in hooks:
            hook.remove()


def test_models_whose_logits_are_not_their_head_are_not_scored(tmp_path, model_dir):
    from transformers import CohereConfig, CohereForCausalLM, GPT2LMHeadModel

    class Doubled(GPT2LMHeadModel):  # a logit scale no config field tells of
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2
            return out

    def raising(*args, **kwargs):
        raise TypeError("this body wants other inputs")

    gpt2, cpu = load_causal_lm(model_dir), torch.device("cpu")
    assert head_problem(gpt2, [0, 0], cpu) is None
    assert "not its output head" in head_problem(Doubled(gpt2.config).eval(), [0, 0], cpu)
    assert "no output head" in head_problem(gpt2.base_model, [0, 0], cpu)
    odd = load_causal_lm(model_dir)
    odd.transformer.forward = lambda input_ids, **kwargs: (input_ids,)  # no last_hidden_state
    assert "last hidden states" in head_problem(odd, [0, 0], cpu)
    odd.transformer.forward = raising
    assert "cannot be run apart" in head_problem(odd, [0, 0], cpu)
    cohere = CohereConfig(
        vocab_size=gpt2.config.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, logit_scale=0.5,
        bos_token_id=0, eos_token_id=0, pad_token_id=0,
    )  # fmt: skip
    torch.manual_seed(0)
    CohereForCausalLM(cohere).save_pretrained(tmp_path / "cohere")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "cohere")
    engine = Engine(load_causal_lm(tmp_path / "cohere"), load_tokenizer(tmp_path / "cohere"))
    assert "logit_scale" in engine.scoring_problem
    with pytest.raises(ValueError, match="cannot be scored"):
        engine.generate([Sequence([1, 2], SamplingParams(max_tokens=0, prompt_logprobs=1))])
    with TestClient(create_app(tmp_path / "cohere", model_name="tiny", batch_wait_ms=1)) as http:
        for fields, param in (({"echo": True, "logprobs": 1}, "echo"), ({"prompt_logprobs": 0}, "prompt_logprobs")):
            response = http.post("/v1/completions", json={"model": "tiny", "prompt": PROMPT, **fields})
            assert "logit_scale" in refused(response, 400, "prompt_scoring_unavailable", param)["message"]
        echoed = complete(http, prompt=PROMPT, echo=True, max_tokens=2, temperature=0)["choices"][0]
        assert echoed["text"].startswith(PROMPT) and echoed["logprobs"] is None  # echo alone needs no scores


def test_echo_with_logprobs_and_no_tokens_scores_the_prompt(client, engine):
    ids = engine.encode(PROMPT)
    target, rows = prompt_targets(engine.model, ids)
    body = complete(client, prompt=PROMPT, echo=True, logprobs=3, max_tokens=0)
    (choice,) = body["choices"]
    assert choice["text"] == PROMPT and choice["finish_reason"] == "length" and "prompt_logprobs" not in choice
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}
    logprobs = choice["logprobs"]
    assert "".join(logprobs["tokens"]) == PROMPT and len(logprobs["tokens"]) == len(ids)
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    torch.testing.assert_close(torch.tensor(logprobs["token_logprobs"][1:]), target, atol=1e-5, rtol=0)
    for offset, token in zip(logprobs["text_offset"], logprobs["tokens"]):
        assert PROMPT[offset : offset + len(token)] == token
    for t in range(1, len(ids)):
        top, token = logprobs["top_logprobs"][t], logprobs["tokens"][t]
        best = rows[t - 1].topk(3)
        texts = [
            engine.decode([*ids[max(0, t - 4) : t], i])[len(engine.decode(ids[max(0, t - 4) : t])) :]
            for i in best.indices.tolist()
        ]
        assert list(top)[:3] == texts and len(top) == (3 if token in texts else 4)  # the top 3, and the prompt's
        torch.testing.assert_close(torch.tensor([top[text] for text in texts]), best.values, atol=1e-5, rtol=0)
        assert top[token] == logprobs["token_logprobs"][t]


def test_echo_puts_the_prompt_before_the_completion(client, engine):
    count = len(engine.encode(PROMPT))
    plain = complete(client, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=2)
    echoed = complete(client, prompt=PROMPT, temperature=0, max_tokens=5, logprobs=2, echo=True)
    assert echoed["choices"][0]["text"] == PROMPT + plain["choices"][0]["text"]
    assert echoed["usage"] == plain["usage"]
    for key, values in plain["choices"][0]["logprobs"].items():
        assert echoed["choices"][0]["logprobs"][key][count:] == values
    assert echoed["choices"][0]["logprobs"]["text_offset"][count] == len(PROMPT)
    no_logprobs = complete(client, prompt=[PROMPT, "a dog"], temperature=0, max_tokens=0, echo=True)["choices"]
    assert [c["text"] for c in no_logprobs] == [PROMPT, "a dog"] and no_logprobs[0]["logprobs"] is None


def test_prompts_as_token_ids_answer_as_their_text(client, engine):
    ids, other = engine.encode(PROMPT), engine.encode(OTHERS[1])
    fields = {"echo": True, "logprobs": 1, "max_tokens": 3, "temperature": 0}
    by_text = complete(client, prompt=[PROMPT, OTHERS[1]], **fields)
    by_ids = complete(client, prompt=[ids, other], **fields)
    assert by_ids["choices"] == by_text["choices"] and by_ids["usage"] == by_text["usage"]
    one = complete(client, prompt=ids, **fields)  # alone, not padded beside a longer prompt: equal to rounding
    assert_close_json(one["choices"], by_text["choices"][:1])
    assert complete(client, prompt=[0] * 64, max_tokens=0)["usage"]["prompt_tokens"] == 64  # fills the context


@pytest.mark.parametrize(
    "prompt, fields, code, param",
    [
        ([500], {}, "invalid_token_id", "prompt"),
        ([[1, 2], [3, -1]], {}, "invalid_token_id", "prompt.1"),
        ([], {}, "empty_prompt", "prompt"),
        ([[]], {}, "empty_prompt", "prompt"),
        ([[1], []], {}, "empty_prompt", "prompt.1"),
        ([[1]] * 257, {}, "too_many_prompts", "prompt"),
        ([[1]] * 3, {"n": 200}, "n_too_large", "n"),
        ([0] * 65, {"max_tokens": 0}, "context_length_exceeded", "prompt"),
        ([0] * 64, {}, "context_length_exceeded", "prompt"),  # no room for the default completion
        ([0] * 60, {"max_tokens": 5}, "context_length_exceeded", "max_tokens"),
    ],
)
def test_bad_token_id_prompts_are_openai_400s(client, prompt, fields, code, param):
    refused(client.post("/v1/completions", json={"model": "tiny", "prompt": prompt, **fields}), 400, code, param)


def test_prompt_logprobs_in_vllms_format(client, engine):
    ids = engine.encode(PROMPT)
    target, rows = prompt_targets(engine.model, ids)
    body = complete(client, prompt=PROMPT, prompt_logprobs=2, max_tokens=3, temperature=0, n=2)
    first, second = body["choices"]
    assert first["prompt_logprobs"] == second["prompt_logprobs"] and first["logprobs"] is None
    positions = first["prompt_logprobs"]
    assert len(positions) == len(ids) and positions[0] is None
    for t in range(1, len(ids)):
        entry, token = positions[t], ids[t]
        best = rows[t - 1].topk(2)
        assert list(entry) == list(dict.fromkeys([str(token), *map(str, best.indices.tolist())]))
        assert entry[str(token)]["logprob"] == pytest.approx(float(target[t - 1]), abs=1e-5)
        assert entry[str(token)]["rank"] == int((rows[t - 1] >= target[t - 1]).sum())
        for rank, (value, index) in enumerate(zip(best.values.tolist(), best.indices.tolist()), 1):
            assert entry[str(index)]["logprob"] == pytest.approx(value, abs=1e-5)
            assert entry[str(index)]["rank"] == rank
            assert entry[str(index)]["decoded_token"] == engine.tokenizer.decode([index])
    alone = complete(client, prompt=PROMPT, prompt_logprobs=0, max_tokens=0)["choices"][0]["prompt_logprobs"]
    assert [list(entry) for entry in alone[1:]] == [[str(token)] for token in ids[1:]]
    wide = complete(client, prompt=PROMPT, echo=True, logprobs=20, max_tokens=2, temperature=0)["choices"][0]
    assert all(20 <= len(top) <= 21 for top in wide["logprobs"]["top_logprobs"][1:])


def penalized_greedy(model, ids: list[int], steps: int, frequency: float, presence: float, eos: set[int]):
    """Greedy decoding under OpenAI's penalties, step by step with the model itself: the tokens and their raw
    log-probs."""
    generated: list[int] = []
    logprobs: list[float] = []
    for _ in range(steps):
        logits = own_logprobs(model, ids + generated)[-1]  # (V,) log-softmax: the same argmax as the logits
        with torch.no_grad():
            raw = model(torch.tensor([ids + generated])).logits[0, -1].float()  # (V,)
        counts = torch.bincount(torch.tensor(generated, dtype=torch.long), minlength=raw.shape[-1]).float()
        token = int((raw - counts * frequency - (counts > 0).float() * presence).argmax())
        logprobs.append(float(logits[token]))
        if token in eos:
            break
        generated.append(token)
    return generated, logprobs


def test_frequency_and_presence_penalties_follow_openais_formula(client, engine):
    ids = engine.encode(PROMPT)
    plain = penalized_greedy(engine.model, ids, 10, 0.0, 0.0, engine.eos_ids)[0]
    assert len(set(plain)) < len(plain), "the tiny model does not repeat itself after this prompt"
    found = {}
    for frequency, presence in ((2.0, 0.0), (0.0, 2.0), (0.1, 0.0), (0.0, 0.1), (0.02, 0.02), (-2.0, 0.0)):
        tokens, logprobs = penalized_greedy(engine.model, ids, 10, frequency, presence, engine.eos_ids)
        fields = {"frequency_penalty": frequency, "presence_penalty": presence, "logprobs": 0}
        choice = complete(client, prompt=ids, max_tokens=10, temperature=0, **fields)["choices"][0]
        assert choice["text"] == engine.decode(tokens), (frequency, presence)
        assert choice["logprobs"]["token_logprobs"] == pytest.approx(logprobs, abs=1e-5)  # the model's, unpenalized
        found[frequency, presence] = tokens
    assert len(set(found[2.0, 0.0])) > len(set(plain)) < len(set(found[0.0, 2.0]))  # strong penalties break loops
    assert found[0.1, 0.0] != found[0.0, 0.1]  # a count and a presence weigh differently
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "tiny", "messages": [{"role": "user", "content": "a"}], "presence_penalty": 1.5},
    )
    assert chat.status_code == 200


def test_streamed_echo_matches_the_response(client):
    fields = {"prompt": PROMPT, "echo": True, "logprobs": 2, "prompt_logprobs": 1, "max_tokens": 4, "temperature": 0}
    expected = complete(client, **fields)
    request = {"model": "tiny", "stream": True, "stream_options": {"include_usage": True}, **fields}
    with client.stream("POST", "/v1/completions", json=request) as response:
        chunks = events(response)
    assert chunks[-1] == "[DONE]" and chunks[-2]["usage"] == expected["usage"]
    choices = [c["choices"][0] for c in chunks[:-2]]
    want = expected["choices"][0]
    assert "".join(c["text"] for c in choices) == want["text"]
    assert choices[0]["prompt_logprobs"] == want["prompt_logprobs"]
    assert all("prompt_logprobs" not in c for c in choices[1:])
    for key, values in want["logprobs"].items():
        assert [v for c in choices if c["logprobs"] for v in c["logprobs"][key]] == values
    request = {"model": "tiny", "stream": True, "prompt": [PROMPT, "a dog"], "echo": True, "max_tokens": 0}
    with client.stream("POST", "/v1/completions", json=request) as response:
        chunks = events(response)
    assert sorted((c["choices"][0]["index"], c["choices"][0]["text"]) for c in chunks[:-1]) == [
        (0, PROMPT),
        (1, "a dog"),
    ]
    assert all(c["choices"][0]["finish_reason"] == "length" for c in chunks[:-1]) and chunks[-1] == "[DONE]"


def test_a_generation_that_ends_lists_its_end_token(tmp_path, model_dir, engine):
    """As vLLM's: the end-of-sequence token closes the legacy log-probs (empty text), so a client that takes the
    last entry as the generated token (lm-evaluation-harness) reads the prompt's log-probs right."""
    from transformers import AutoModelForCausalLM

    ids = engine.encode(PROMPT)
    first = penalized_greedy(engine.model, ids, 1, 0, 0, set())[0][0]
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.config.eos_token_id = [0, first]  # the greedy continuation now ends at once
    model.save_pretrained(tmp_path / "ends")
    load_tokenizer(model_dir).save_pretrained(tmp_path / "ends")
    with TestClient(create_app(tmp_path / "ends", model_name="tiny", batch_wait_ms=1)) as http:
        body = complete(http, prompt=ids, echo=True, logprobs=1, max_tokens=1, temperature=0)
        choice = body["choices"][0]
        assert choice["text"] == PROMPT and choice["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 1 and len(choice["logprobs"]["tokens"]) == len(ids) + 1
        assert choice["logprobs"]["tokens"][-1] == "" and choice["logprobs"]["text_offset"][-1] == len(PROMPT)
        own = own_logprobs(engine.model, ids)[-1]
        assert choice["logprobs"]["token_logprobs"][-1] == pytest.approx(float(own[first]), abs=1e-5)
        chat = http.post(
            "/v1/chat/completions",
            json={"model": "tiny", "messages": [{"role": "user", "content": PROMPT}], "logprobs": True},
        ).json()["choices"][0]
        assert all(entry["token"] for entry in chat["logprobs"]["content"])  # chat shows no end token


def test_an_unexpected_failure_is_a_500_in_openais_shape(model_dir, monkeypatch):
    def broken(self, rows):
        raise RuntimeError("the device fell over")

    monkeypatch.setattr(Engine, "generate", broken)
    app = create_app(model_dir, model_name="tiny", batch_wait_ms=1)
    with TestClient(app, raise_server_exceptions=False) as http:
        response = http.post("/v1/completions", json={"model": "tiny", "prompt": "a"})
    assert response.status_code == 500
    error = response.json()["error"]
    assert error["type"] == "server_error" and "the device fell over" in error["message"]


def test_the_openai_client_scores_a_prompt(model_dir, engine):
    openai = pytest.importorskip("openai")
    ids = engine.encode(PROMPT)
    target, _ = prompt_targets(engine.model, ids)
    with serve_in_thread(model_dir, model_name="tiny", batch_wait_ms=1) as base:
        api = openai.OpenAI(base_url=base, api_key="unused", max_retries=0)
        completion = api.completions.create(model="tiny", prompt=PROMPT, echo=True, logprobs=5, max_tokens=0)
        by_ids = api.completions.create(model="tiny", prompt=[ids], max_tokens=0, extra_body={"prompt_logprobs": 1})
    (choice,) = completion.choices
    assert choice.text == PROMPT and choice.finish_reason == "length" and completion.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    torch.testing.assert_close(torch.tensor(logprobs.token_logprobs[1:]), target, atol=1e-4, rtol=0)
    assert all(5 <= len(top) <= 6 for top in logprobs.top_logprobs[1:])
    positions = by_ids.choices[0].model_extra["prompt_logprobs"]
    got = [positions[t][str(ids[t])]["logprob"] for t in range(1, len(ids))]
    torch.testing.assert_close(torch.tensor(got), target, atol=1e-4, rtol=0)


def test_the_services_lm_students_score_and_its_classifiers_refuse(tmp_path):
    pytest.importorskip("sqlalchemy")
    import httpx

    from _service import finished_lm_job
    from distill.service.app import create_app as service_app
    from distill.service.settings import Settings
    from test_hardening_serve import finished_classifier_job, running

    settings = Settings(data_dir=tmp_path / "data").prepare()
    classifier, lm = finished_classifier_job(settings), finished_lm_job(tmp_path / "data")
    signal = str([0.5] * 40)
    with running(service_app(settings)) as origin, httpx.Client(base_url=f"{origin}/v1", timeout=60) as http:
        scored_ = http.post(
            "/completions", json={"model": lm, "prompt": [[3, 4, 5]], "echo": True, "logprobs": 1, "max_tokens": 0}
        )
        assert scored_.status_code == 200, scored_.text
        logprobs = scored_.json()["choices"][0]["logprobs"]
        assert logprobs["token_logprobs"][0] is None and len(logprobs["token_logprobs"]) == 3
        for fields, param in (
            ({"prompt": [[1, 2]]}, "prompt"),
            ({"prompt": signal, "echo": True}, "echo"),
            ({"prompt": signal, "prompt_logprobs": 1}, "prompt_logprobs"),
        ):
            refused(http.post("/completions", json={"model": classifier, **fields}), 400, "invalid_input", param)
        assert http.post("/completions", json={"model": classifier, "prompt": signal}).status_code == 200


def test_sixteen_stop_strings_are_taken_and_seventeen_refused(client):
    """lm-evaluation-harness adds the end-of-text string to a task's own stop strings: more than OpenAI's 4."""
    stops = [f"zz{i}" for i in range(16)]
    answer = client.post(
        "/v1/completions", json={"model": "tiny", "prompt": "the movie", "max_tokens": 2, "stop": stops}
    )
    assert answer.status_code == 200, answer.text
    refused = client.post("/v1/completions", json={"model": "tiny", "prompt": "the", "stop": [*stops, "zz16"]})
    assert refused.status_code == 422 and refused.json()["error"]["param"].startswith("stop")
