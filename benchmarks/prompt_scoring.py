"""Is scoring a prompt through `distill serve` as fast per token as a forward pass?

A random GPT-2 (4 layers, 256 wide, GPT-2's vocabulary of 50,257 tokens, so the output head weighs as it does in
real models) scores P prompts of T down to T/2 tokens, four ways, side by side in interleaved rounds:

    forward   the model's own forward pass over the right-padded batch, log-softmax of the logits and the prompt
              tokens' log-probs gathered (what lm-evaluation-harness's Hugging Face backend does)
    engine    `Engine.generate` of rows with max_tokens 0 and prompt_logprobs 1 (distill.scoring: the body once, the
              head a chunk of positions at a time, the top token kept)
    http      POST /v1/completions {prompt: [token ids] x P, echo, logprobs: 1, max_tokens: 0} to the served app
              (in-process ASGI): the engine, every token's text decoded, the JSON written and read
    lm-eval   the same with max_tokens 1, the request lm-evaluation-harness's local-completions model sends

and reports each one's time over `forward`'s in the same round, the median over the rounds (the machines are
noisy: rounds interleave the four, so a busy moment hits all of them), with the median and best times. Writes
benchmarks/results/prompt_scoring.json.

    python benchmarks/prompt_scoring.py [--prompts 8] [--tokens 256] [--rounds 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from distill.engine import Engine, SamplingParams, Sequence
from distill.serve import create_app

RESULTS = Path(__file__).parent / "results"
WORDS = [
    "the",
    "a",
    "movie",
    "film",
    "was",
    "is",
    "great",
    "good",
    "bad",
    "and",
    "to",
    "of",
    "it",
    "this",
    "that",
    "i",
    "love",
    "hate",
    "dog",
    "cat",
    "runs",
    "fast",
    "slow",
    "very",
]


def save_model(directory: Path) -> int:
    """The random GPT-2 and a byte-level BPE tokenizer trained on a few words; the tokenizer's size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=1000, special_tokens=["<|endoftext|>"], initial_alphabet=alphabet)
    core.train_from_iterator([" ".join(WORDS[i:] + WORDS[:i]) for i in range(len(WORDS))] * 10, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    end = tokenizer.eos_token_id
    config = GPT2Config(
        vocab_size=50257, n_positions=1024, n_embd=256, n_layer=4, n_head=4, bos_token_id=end, eos_token_id=end
    )
    torch.manual_seed(0)
    GPT2LMHeadModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return len(tokenizer)


def plain_forward(model: torch.nn.Module, prompts: list[list[int]]) -> Callable[[], None]:
    def run() -> None:
        width = max(len(p) for p in prompts)
        ids = torch.zeros((len(prompts), width), dtype=torch.long)  # (B, T), right-padded
        mask = torch.zeros_like(ids)  # (B, T)
        for i, prompt in enumerate(prompts):
            ids[i, : len(prompt)], mask[i, : len(prompt)] = torch.tensor(prompt), 1
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask).logits  # (B, T, V)
            torch.log_softmax(logits.float(), dim=-1)[:, :-1].gather(-1, ids[:, 1:, None])  # (B, T - 1, 1)

    return run


def engine_scoring(engine: Engine, prompts: list[list[int]]) -> Callable[[], None]:
    def run() -> None:
        engine.generate([Sequence(list(p), SamplingParams(max_tokens=0, prompt_logprobs=1)) for p in prompts])

    return run


def served(client: object, prompts: list[list[int]], max_tokens: int) -> Callable[[], None]:
    body = {"model": "m", "prompt": prompts, "echo": True, "logprobs": 1, "max_tokens": max_tokens, "temperature": 0}

    def run() -> None:
        response = client.post("/v1/completions", json=body)  # type: ignore[attr-defined]
        assert response.status_code == 200, response.text
        response.json()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from fastapi.testclient import TestClient
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as folder:
        directory = Path(folder) / "m"
        vocabulary = save_model(directory)
        generator = torch.Generator().manual_seed(0)
        lengths = [args.tokens - i * args.tokens // (2 * args.prompts) for i in range(args.prompts)]
        prompts = [torch.randint(0, vocabulary, (n,), generator=generator).tolist() for n in lengths]
        model = AutoModelForCausalLM.from_pretrained(directory).eval()
        engine = Engine(model, AutoTokenizer.from_pretrained(directory))
        with TestClient(create_app(directory, model_name="m", max_batch_size=64, batch_wait_ms=1)) as client:
            ways = {
                "forward": plain_forward(model, prompts),
                "engine": engine_scoring(engine, prompts),
                "http": served(client, prompts, 0),
                "lm-eval": served(client, prompts, 1),
            }
            times: dict[str, list[float]] = {name: [] for name in ways}
            for run in ways.values():
                run()  # warm-up
            for _ in range(args.rounds):
                for name, run in ways.items():
                    start = time.perf_counter()
                    run()
                    times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in times.items()}
    best = {name: min(values) for name, values in times.items()}
    ratios = {name: statistics.median(t / f for t, f in zip(times[name], times["forward"])) for name in ways}
    result = {
        "prompts": args.prompts,
        "tokens": sum(lengths),
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": platform.processor() or platform.machine(),
        "over_forward": ratios,  # the median over the rounds of each round's time over forward's
        "seconds_median": median,
        "seconds_best": best,
    }
    for name in ways:
        print(
            f"{name:8s} {ratios[name]:.2f} x forward (median {median[name] * 1000:6.1f} ms, "
            f"best {best[name] * 1000:6.1f} ms)"
        )
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "prompt_scoring.json").write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
