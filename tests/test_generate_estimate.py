"""`distill generate --estimate` and `--max-cost`: the estimate against a full run, a budget that stops a run and a
rerun that completes it, and the budget's hostile inputs. Against the fault-injecting loopback server."""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import httpx
import pytest

from _fake_openai import fake_openai
from distill.errors import DistillError
from distill.generate import PromptRecord, RequestParams, generate
from distill.generate.budget import CostBudget, check_max_cost
from distill.generate.client import Prices, TeacherClient
from distill.generate.estimate import aestimate, request_chars
from distill.generate.output import read_output
from test_cli import assert_one_line_error, distill_cli

PRICES = Prices(input_per_million=1000.0, output_per_million=3000.0)  # a token costs 0.001 or 0.003


@pytest.fixture(scope="module")
def server():
    with fake_openai() as running:
        yield running


def prompts(count: int) -> list[PromptRecord]:
    """Prompts of several lengths (0 to 24 filler words) and both kinds of fake answer (sums and other numbers)."""
    records = []
    for i in range(count):
        filler = " ".join(["please"] * (6 * (i % 5)))
        question = f"what is {i} + {2 * i} ?" if i % 3 else f"name the number of item {i}"
        records.append(PromptRecord(prompt=f"{filler} {question}".strip()))
    return records


def teacher(server, **options) -> TeacherClient:
    return TeacherClient(server.url, "fake", backoff=0.001, prices=PRICES, **options)


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def estimate(records, client, out, **options):
    async def run():
        try:
            return await aestimate(records, client, out, **options)
        finally:
            await client.aclose()

    return asyncio.run(run())


def test_estimate_is_within_20_percent_of_a_full_run(server, tmp_path):
    server.configure()
    out = tmp_path / "answers.jsonl"
    records = prompts(60)
    params = RequestParams(seed=3)
    expected = estimate(records, teacher(server, concurrency=8), out, n=2, params=params, sample_prompts=8)
    assert not out.exists()  # the estimate keeps no answers
    assert server.stats()["requests"] == 8 and expected.sampled_prompts == 8 and expected.sampled_answers == 16
    assert expected.prompts == 60 and expected.samples == 120 and expected.requests == 60
    assert expected.remaining_samples == 120 and expected.remaining_cost == pytest.approx(expected.cost)
    assert expected.seconds > 0 and expected.sample_cost > 0 and expected.within_budget is None

    summary = generate(records, teacher(server, concurrency=8), out, n=2, params=params)
    assert summary.written == 120
    actual_tokens = summary.prompt_tokens + summary.completion_tokens
    assert abs(expected.tokens - actual_tokens) <= 0.2 * actual_tokens, (expected, summary)
    assert abs(expected.prompt_tokens - summary.prompt_tokens) <= 0.2 * summary.prompt_tokens
    assert abs(expected.completion_tokens - summary.completion_tokens) <= 0.2 * summary.completion_tokens
    assert abs(expected.cost - summary.cost) <= 0.2 * summary.cost

    with out.open("a") as handle:
        handle.write('{"id": "cut off by a ki')  # an unfinished last line: a run would drop it, the estimate leaves it
    before = out.read_bytes()
    after = estimate(records, teacher(server), out, n=2, params=params, max_cost=2 * summary.cost)
    assert after.remaining_samples == 0 and after.remaining_cost == 0 and after.remaining_seconds == 0
    assert after.within_budget is True and after.samples == 120
    assert out.read_bytes() == before


def test_estimate_scales_prompt_tokens_by_length():
    long = PromptRecord(messages=(("system", "be brief"), ("user", "abc")))
    assert request_chars(long) == len("be brief") + 3 and request_chars(PromptRecord(prompt="hello")) == 5


def test_estimate_refuses_answers_without_token_counts(tmp_path):
    def handler(request: httpx.Request) -> httpx.Response:
        choice = {"index": 0, "message": {"role": "assistant", "content": "4"}, "finish_reason": "stop"}
        return httpx.Response(200, json={"choices": [choice]})  # no usage

    client = TeacherClient("http://teacher/v1", "m", transport=httpx.MockTransport(handler), prices=PRICES)
    with pytest.raises(DistillError, match="without token counts"):
        estimate(prompts(4), client, tmp_path / "out.jsonl")
    with pytest.raises(DistillError, match="1 to 1000 prompts"):
        estimate(prompts(4), client, tmp_path / "out.jsonl", sample_prompts=0)
    with pytest.raises(DistillError, match="max_cost must be a finite amount"):
        estimate(prompts(4), client, tmp_path / "out.jsonl", max_cost=-1.0)


def test_max_cost_stops_and_a_larger_budget_completes_without_duplicates(server, tmp_path):
    server.configure(delay=0.01)
    out = tmp_path / "answers.jsonl"
    records = prompts(40)
    first = generate(records, teacher(server, concurrency=4), out, max_cost=0.3)
    written = rows(out)
    assert first.budget_reached and first.max_cost == 0.3
    assert 0 < first.written < 40 and first.written + first.not_asked == 40 and first.failed == 0
    assert len(written) == first.written == len({r["id"] for r in written})
    per_sample = first.total_cost / first.written
    assert first.total_cost <= 0.3 + per_sample  # at most one request's misestimate past the limit
    assert first.total_cost + per_sample > 0.3 * 0.8  # and it did not stop far short of it
    assert first.total_cost == pytest.approx(sum(r["usage"]["cost"] for r in written))

    asked = server.stats()["requests"]
    same = generate(records, teacher(server), out, max_cost=0.3)  # the file's cost already counts: nothing to ask
    assert same.budget_reached and same.written == 0 and server.stats()["requests"] == asked
    assert same.skipped == first.written and same.total_cost == pytest.approx(first.total_cost)

    second = generate(records, teacher(server, concurrency=4), out, max_cost=10.0)
    final = rows(out)
    assert not second.budget_reached and second.not_asked == 0 and second.written == first.not_asked
    assert len(final) == 40 and len({r["id"] for r in final}) == 40
    assert {r["prompt"] for r in final} == {r.prompt for r in records}
    assert second.total_cost == pytest.approx(read_output(out)[1]) and second.total_cost > first.total_cost


def test_max_cost_hostile_values(server, tmp_path):
    for bad in (-1.0, math.nan, math.inf, 1e12):
        with pytest.raises(DistillError, match="max_cost must be a finite amount"):
            generate(prompts(2), teacher(server), tmp_path / "o.jsonl", max_cost=bad)
    with pytest.raises(DistillError, match="must be a number"):
        check_max_cost("5")  # type: ignore[arg-type]
    free = TeacherClient(server.url, "fake")
    with pytest.raises(DistillError, match="needs the teacher's prices"):
        generate(prompts(2), free, tmp_path / "o.jsonl", max_cost=1.0)
    assert not (tmp_path / "o.jsonl").exists()


def test_budget_sends_one_request_at_a_time_until_it_knows_a_price():
    spent = [0.0]

    async def scenario() -> None:
        budget = CostBudget(1.0, lambda: spent[0])
        assert await budget.reserve(2) == 0.0
        waiting = asyncio.ensure_future(budget.reserve(2))
        await asyncio.sleep(0.01)
        assert not waiting.done()  # no estimate yet: the second request waits for the first
        spent[0] = 0.2
        await budget.release(0.0, 2, 0.2)
        assert await waiting == pytest.approx(0.2)  # 2 samples at 0.1
        assert budget.reserved == pytest.approx(0.2)
        assert await budget.reserve(4) == pytest.approx(0.4)  # 0.2 spent + 0.2 + 0.4 reserved <= 1
        assert await budget.reserve(3) is None and budget.reached  # 0.2 + 0.6 + 0.3 > 1
        assert await budget.reserve(1) is None  # and stays reached

    asyncio.run(scenario())
    zero = CostBudget(0.0, lambda: 0.0)
    assert asyncio.run(zero.reserve(1)) is None  # a budget of 0 sends nothing
    known = CostBudget(1.0, lambda: 0.5, before_cost=0.5, before_samples=5)
    assert known.per_sample() == pytest.approx(0.1)  # from the output file's earlier rows


def test_cli_estimate_and_max_cost(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": r.prompt}) + "\n" for r in prompts(30)))
    out = tmp_path / "answers.jsonl"
    with fake_openai() as server:
        base = ["generate", "-p", path, "-o", out, "--base-url", server.url, "--model", "fake"]
        base += ["--price-input", "1000", "--price-output", "3000"]
        result = distill_cli(*base, "--estimate", "--estimate-prompts", "5", "--max-cost", "0.01", cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        expected = json.loads(result.stdout)
        assert expected["samples"] == 30 and expected["sampled_prompts"] == 5 and expected["within_budget"] is False
        assert "expected for 30 samples" in result.stderr and "over the budget" in result.stderr
        assert not out.exists()
        stopped = distill_cli(*base, "--max-cost", "0.2", cwd=tmp_path)
        assert stopped.returncode == 0, stopped.stderr
        summary = json.loads(stopped.stdout)
        assert summary["budget_reached"] is True and summary["not_asked"] > 0
        assert "stopped at the cost limit" in stopped.stderr
        done = distill_cli(*base, "--max-cost", "100", cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert json.loads(done.stdout)["budget_reached"] is False
    assert len({r["id"] for r in rows(out)}) == len(rows(out)) == 30
    for value, fragment in (
        ("nan", "--max-cost: Input should be a finite number"),
        ("-1", "--max-cost: Input should be greater than or equal to 0"),
    ):
        assert_one_line_error(distill_cli(*base, "--max-cost", value, cwd=tmp_path), fragment)
    assert_one_line_error(distill_cli(*base, "--estimate", "--estimate-prompts", "0", cwd=tmp_path), "1 to 1000")


def test_a_budget_without_prices_is_refused_by_the_options() -> None:
    from pydantic import ValidationError

    from distill.config import GenerateOptions

    with pytest.raises(ValidationError, match="max_cost needs the teacher's prices"):
        GenerateOptions(max_cost=1.0)
    assert GenerateOptions(max_cost=1.0, price_output=0.6).max_cost == 1.0
