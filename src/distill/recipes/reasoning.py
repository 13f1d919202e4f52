"""Reasoning (chain-of-thought) distillation on CPU, end to end: `distill run --recipe reasoning`.

1. Problems: generated multi-step arithmetic word problems with worked solutions (`distill.generate.problems`),
   split into training and held-out problems with no question text in both.
2. Teacher: a byte-level BPE tokenizer and a GPT-2 trained on question -> worked solution (loss on the solution).
3. Traces: the teacher is served by `distill serve` (a thread of this process, real HTTP on loopback) and samples
   `samples` traces for each training question through `ApiTeacher` + `generate` (traces.jsonl, resumable); each
   trace's final answer is checked against the gold one (`cot.split_traces`): verified and rejected traces, a summary.
4. Students: a smaller GPT-2 trained on the verified traces (sequence-level KD: supervised fine-tuning on the
   teacher's text), and the same architecture from the same initialisation trained on final answers only
   (completion "#### x") for at least as many optimizer steps. With `token_kd` = K > 0 the API also returns the
   top K log-probs of every trace token; a third student, from the same initialisation, learns the verified traces
   from them too (sparse token-level KD through a token cache, `distill cache from-generated`).
5. Evaluation: greedy final-answer accuracy on the held-out problems (batched generation), size and tokens/s.

Every model sees a question as the bare prompt `cot.QUESTION_ONLY_TEMPLATE` ("{question}\\n"), the format the teacher
was trained on, so the students learn the reasoning format from the traces themselves.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import evaluate as ev
from distill.config import LossConfig, ReasoningRunConfig, TrainConfig
from distill.data import read_json
from distill.errors import DistillError
from distill.generate.cot import QUESTION_ONLY_TEMPLATE, build_prompt, read_traces, split_traces, write_split
from distill.generate.problems import answer_only, make_problems, split_problems
from distill.generate.sample import Endpoint, PromptRecord, SamplingParams, apply_template, generate, sample_id
from distill.generate.verify import Problem, extract_answer, verify
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.models import count_parameters
from distill.progress import NULL, Reporter
from distill.recipes.lm import gpt2, train_tokenizer, weights_size
from distill.sampling import Engine, context_length
from distill.sampling import SamplingParams as EngineParams
from distill.sampling import Sequence as Row
from distill.serve import serve_in_thread
from distill.teachers.api import ApiTeacher, Prices
from distill.teachers.api_logprobs import cache_from_generated
from distill.teachers.token_cache import TokenCache
from distill.train import train

PROMPT = QUESTION_ONLY_TEMPLATE
TEACHER = "teacher"
TRACES = "student-traces"
ANSWERS = "student-answers"
TRACES_KD = "student-traces-kd"
ENDPOINT: Endpoint = "completions"  # the raw prompt, exactly as the teacher was trained (no chat wrapping)
CALCULATION = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)")
OPERATIONS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


# ----------------------------------------------------------------------------------------------------------------
# Data and models
# ----------------------------------------------------------------------------------------------------------------


def problem_sets(config: ReasoningRunConfig) -> tuple[list[Problem], list[Problem]]:
    """(training, held-out) problems, disjoint by question text, fixed by the seed."""
    problems = make_problems(config.problems + config.held_out, seed=config.seed, steps=config.steps)
    return split_problems(problems, config.held_out, seed=config.seed)


def prompt_of(problem: Problem) -> str:
    return build_prompt(problem.question, PROMPT)


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """Torch's CPU threads set to `threads` inside the block (None: unchanged), restored after it."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def fresh_gpt2(tokenizer: Any, size: dict[str, int], max_length: int, seed: int) -> nn.Module:
    """`recipes.lm.gpt2` without dropout: these runs are a few epochs long and memorise arithmetic facts, which
    dropout only slows down."""
    model = gpt2(tokenizer, size, max_length, seed)
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    for key in ("resid_pdrop", "embd_pdrop", "attn_pdrop"):
        setattr(model.config, key, 0.0)
    return model


def fit(
    name: str,
    size: dict[str, int],
    tokenizer: Any,
    data: LMDataset,
    output: Path,
    train_config: TrainConfig,
    *,
    max_length: int,
    seed: int,
    resume: bool,
    reporter: Reporter,
    teacher: TokenCache | None = None,
    loss: LossConfig | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh GPT-2 of `size` into output/models/name (model and tokenizer, servable as is), or load it when
    a resumed run finished it already; with `teacher` (a token cache over `data`) distilled under `loss`."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # library code reports through the reporter only
    directory = output / "models" / name
    done = directory / "history.json"
    if resume and done.is_file():
        return GPT2LMHeadModel.from_pretrained(directory).eval(), read_json(
            done, ("history", "seconds", "steps", "rows")
        )
    result = train(
        fresh_gpt2(tokenizer, size, max_length, seed),
        data,
        train_config,
        teacher=teacher,
        loss=loss or LossConfig(),
        checkpoint_dir=output / "checkpoints" / name,
        resume=resume,
        reporter=reporter,
        name=name,
    )
    result.model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)
    info = {"history": result.history, "seconds": result.seconds, "steps": result.steps, "rows": len(data)}
    done.write_text(json.dumps(info))
    return result.model.eval(), info


# ----------------------------------------------------------------------------------------------------------------
# Traces through the teacher's API
# ----------------------------------------------------------------------------------------------------------------


def sample_traces(
    config: ReasoningRunConfig,
    teacher_dir: Path,
    questions: Sequence[Problem],
    path: Path,
    max_tokens: int,
    reporter: Reporter,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Serve the teacher, ask it for `config.samples` traces per question into `path` (only the missing ones), and
    return this configuration's trace records (in file order) and what the generation run did."""
    records = [PromptRecord(prompt=p.question, gold=p.answer) for p in questions]
    params = SamplingParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=max_tokens,
        seed=config.seed,
        top_logprobs=config.token_kd or None,
    )
    with serve_in_thread(teacher_dir, model_name=TEACHER, max_batch_size=config.server_batch) as base_url:
        prices = Prices(config.input_price, config.output_price)
        client = ApiTeacher(base_url, TEACHER, concurrency=config.concurrency, timeout=600.0, prices=prices)
        summary = generate(records, client, path, config.samples, params, reporter, template=PROMPT, endpoint=ENDPOINT)
    # This run's samples only (a reused file may hold others), in the record layout split_traces reads: "id" names
    # the question (generate's "id" names the sample: kept as "sample_id") and "cost" sits at the top level.
    wanted = {
        sample_id(apply_template(PROMPT)(record), TEACHER, params, ENDPOINT, i): problem.id
        for record, problem in zip(records, questions)
        for i in range(config.samples)
    }
    traces = []
    for row in read_traces(path):
        if row.get("id") in wanted:
            usage = row.get("usage") or {}
            cost = row.get("cost", usage.get("cost"))
            traces.append({**row, "id": wanted[row["id"]], "sample_id": row["id"], "cost": cost})
    return traces, {key: value for key, value in asdict(summary).items() if key != "path"}


# ----------------------------------------------------------------------------------------------------------------
# Evaluation
# ----------------------------------------------------------------------------------------------------------------


def solve(
    model: nn.Module, tokenizer: Any, problems: Sequence[Problem], max_tokens: int, batch_size: int = 64
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Greedy answers to `problems` (batched generation with the serving engine): the accuracy of their final answers
    and one prediction row per problem."""
    engine = Engine(model, tokenizer)
    rows: list[dict[str, Any]] = []
    generated = 0
    started = time.perf_counter()
    for start in range(0, len(problems), batch_size):
        chunk = problems[start : start + batch_size]
        sequences = [
            Row(engine.encode(prompt_of(p)), EngineParams(max_tokens=max_tokens, temperature=0.0)) for p in chunk
        ]
        engine.generate(sequences)
        for problem, sequence in zip(chunk, sequences):
            predicted, generated = extract_answer(sequence.text), generated + sequence.generated
            ok = verify(predicted, problem.answer).ok
            rows.append({"id": problem.id, "question": problem.question, "gold": problem.answer,
                         "completion": sequence.text, "predicted": predicted, "correct": ok})  # fmt: skip
    seconds = time.perf_counter() - started
    correct = sum(row["correct"] for row in rows)
    scores = {"accuracy": correct / max(len(rows), 1), "correct": correct, "problems": len(rows),
              "calculations": calculations([row["completion"] for row in rows]), "generated_tokens": generated,
              "eval_seconds": seconds}  # fmt: skip
    return scores, rows


def calculations(texts: Sequence[str]) -> dict[str, dict[str, int]]:
    """Per operation (+ - * /), how many of the calculations "a op b = c" written in `texts` are right."""
    tally = {op: {"right": 0, "written": 0} for op in OPERATIONS}
    for text in texts:
        for a, op, b, result in CALCULATION.findall(text):
            tally[op]["written"] += 1
            tally[op]["right"] += int(OPERATIONS[op](int(a), int(b)) == int(result))
    return tally


def _speed(models: dict[str, nn.Module], data: LMDataset, rows: int = 16) -> dict[str, dict[str, float]]:
    """Forward-pass tokens/s at batch `rows` and latency at batch 1, every model timed side by side."""
    index = torch.arange(min(rows, len(data)))
    single, batch = data.batch(index[:1])["inputs"], data.batch(index)["inputs"]
    speed = ev.measure_speed(models, single, batch, rounds=5, min_seconds=0.2)
    tokens = int(batch["attention_mask"].sum())
    return {
        name: {"tokens_per_second": s.throughput * tokens / len(index), "latency_ms": s.latency_ms}
        for name, s in speed.items()
    }


def train_students(
    config: ReasoningRunConfig,
    tokenizer: Any,
    verified: list[dict[str, Any]],
    questions: Sequence[Problem],
    output: Path,
    common: dict[str, Any],
) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """The student on the verified traces, and from the same initialisation the student on final answers only (the
    gold answers of every traced question, or with baseline "verified" of the solved ones), trained for at least
    as many optimizer steps."""
    trace_data = tokenize_examples(
        tokenizer, [Example(row["prompt"], row["completion"]) for row in verified], config.max_length
    )
    solved = {str(row["id"]) for row in verified}
    answered = [p for p in questions if p.id in solved] if config.baseline == "verified" else list(questions)
    answer_data = tokenize_examples(
        tokenizer, [Example(prompt_of(p), answer_only(p)) for p in answered], config.max_length
    )
    batch = config.student_train.batch_size
    trace_steps = config.student_train.epochs * math.ceil(len(trace_data) / batch)
    answer_epochs = math.ceil(trace_steps / math.ceil(len(answer_data) / batch))
    students = {}
    for name, data, epochs in (
        (TRACES, trace_data, config.student_train.epochs),
        (ANSWERS, answer_data, answer_epochs),
    ):
        train_config = config.student_train.model_copy(update={"epochs": epochs})
        students[name] = fit(
            name, config.student, tokenizer, data, output, train_config, seed=config.seed + 1, **common
        )
    if config.token_kd:
        cache, coverage = api_cache(tokenizer, output, trace_data, config.max_length, common["resume"])
        loss = LossConfig(temperature=1.0, alpha=config.token_kd_alpha)
        students[TRACES_KD] = fit(
            TRACES_KD, config.student, tokenizer, trace_data, output, config.student_train, seed=config.seed + 1,
            teacher=cache, loss=loss, **common,
        )  # fmt: skip
        students[TRACES_KD][1]["token_cache"] = coverage
    return students


def api_cache(
    tokenizer: Any, output: Path, data: LMDataset, max_length: int, resume: bool
) -> tuple[TokenCache, dict[str, Any]]:
    """The teacher's top log-probs kept with the verified traces (traces/verified.jsonl), as a token cache over the
    traces student's data (`distill cache from-generated`), and what it covers."""
    directory = output / "cache" / "traces"
    summary_path = directory.parent / "traces-summary.json"
    if not (resume and (directory / "manifest.json").is_file() and summary_path.is_file()):
        shutil.rmtree(directory, ignore_errors=True)
        built = cache_from_generated(output / "traces" / "verified.jsonl", tokenizer, directory, max_length=max_length)
        summary_path.write_text(json.dumps(built.to_json()))
    cache = TokenCache(directory, expect={"data_id": data.fingerprint(), "temperature": 1.0})
    return cache, read_json(summary_path)


def evaluate_models(
    models: dict[str, tuple[nn.Module, dict[str, Any]]],
    tokenizer: Any,
    held_out: Sequence[Problem],
    output: Path,
    *,
    max_length: int,
    max_tokens: int,
    reporter: Reporter,
) -> dict[str, dict[str, Any]]:
    """Held-out accuracy (predictions written to output/predictions/<model>.jsonl), speed, size and training
    figures of every model."""
    reporter.stage("evaluate", total=None)
    held_data = tokenize_examples(tokenizer, [Example(prompt_of(p), p.solution) for p in held_out], max_length)
    speed = _speed({name: model for name, (model, _) in models.items()}, held_data)
    rows: dict[str, dict[str, Any]] = {}
    (output / "predictions").mkdir(exist_ok=True)
    for name, (model, info) in models.items():
        scores, predictions = solve(model, tokenizer, held_out, max_tokens)
        with (output / "predictions" / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in predictions)
        rows[name] = {
            **scores,
            **speed[name],
            "params": count_parameters(model),
            "size_bytes": weights_size(output / "models" / name),
            "train_rows": info["rows"],
            "train_steps": info["steps"],
            "train_seconds": info["seconds"],
            "history": info["history"],
            **({"token_cache": info["token_cache"]} if "token_cache" in info else {}),
        }
    reporter.end()
    return rows


# ----------------------------------------------------------------------------------------------------------------
# The recipe
# ----------------------------------------------------------------------------------------------------------------


def run_reasoning(
    config: ReasoningRunConfig,
    output: Path,
    *,
    cache_dir: Path | None = None,
    resume: bool = False,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    """Teacher, verified traces through its API, a student on the traces and one on answers only; returns metrics.

    With `resume`, what a previous run in `output` finished is reused: the tokenizer, each trained model, and every
    trace already in traces.jsonl (the teacher is asked only for the missing ones). `cache_dir` is unused (nothing
    is downloaded); it is accepted like every recipe's.
    """
    with torch_threads(config.threads):
        return _run(config, output, resume, reporter)


def _run(config: ReasoningRunConfig, output: Path, resume: bool, reporter: Reporter) -> dict[str, Any]:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    reporter.stage("data", total=None)
    train_problems, held_out = problem_sets(config)
    questions = train_problems[: config.questions] if config.questions else train_problems
    tokenizer_dir = output / "tokenizer"
    if resume and (tokenizer_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        texts = [prompt_of(p) + p.solution for p in train_problems]
        tokenizer = train_tokenizer(texts, config.vocab_size, tokenizer_dir)
    worked = tokenize_examples(
        tokenizer, [Example(prompt_of(p), p.solution) for p in train_problems], config.max_length
    )
    reporter.end()
    common: dict[str, Any] = {"max_length": config.max_length, "resume": resume, "reporter": reporter}

    clock = time.perf_counter()
    teacher, teacher_info = fit(
        TEACHER, config.teacher, tokenizer, worked, output, config.teacher_train, seed=config.seed, **common
    )
    seconds["teacher"] = time.perf_counter() - clock

    clock = time.perf_counter()
    context = context_length(teacher.config, tokenizer)
    longest = max(len(tokenizer(prompt_of(p), add_special_tokens=False)["input_ids"]) for p in questions + held_out)
    max_tokens = min(config.max_new_tokens, context - longest)
    if max_tokens < 8:
        raise DistillError(
            f"the longest question takes {longest} of the model's {context} positions, leaving no room for a "
            "solution; raise max_length"
        )
    traces_path = output / "traces.jsonl"
    if not resume:
        traces_path.unlink(missing_ok=True)  # a fresh run must not keep traces of an earlier teacher
    records, generation = sample_traces(
        config, output / "models" / TEACHER, questions, traces_path, max_tokens, reporter
    )
    verified, rejected, trace_summary = split_traces(records, "numeric", dedupe=config.dedupe, student_template=PROMPT)
    write_split(verified, rejected, output / "traces", trace_summary)
    seconds["traces"] = time.perf_counter() - clock
    if not verified:
        raise DistillError(
            f"none of the teacher's {len(records)} traces has the right final answer; train the teacher longer "
            "(teacher_train.epochs) or on more problems"
        )

    clock = time.perf_counter()
    students = train_students(config, tokenizer, verified, questions, output, common)
    seconds["students"] = time.perf_counter() - clock

    clock = time.perf_counter()
    models = {TEACHER: (teacher, teacher_info), **students}
    rows = evaluate_models(models, tokenizer, held_out, output, max_length=config.max_length, max_tokens=max_tokens,
                           reporter=reporter)  # fmt: skip
    seconds["evaluate"] = time.perf_counter() - clock
    return {
        "recipe": "reasoning",
        "description": (
            f"{len(train_problems)} generated word problems ({'/'.join(map(str, config.steps))} calculations) train "
            f"the teacher; {len(questions)} of their questions get {config.samples} sampled traces each; "
            f"{len(held_out)} held-out problems; BPE of {len(tokenizer)} tokens; teacher GPT-2 {config.teacher}, "
            f"students GPT-2 {config.student}"
        ),
        "models": rows,
        "traces": trace_summary,
        "generation": generation,
        "baseline": config.baseline,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": max_tokens},
        "prices": {"input_per_million": config.input_price, "output_per_million": config.output_price},
        "stage_seconds": seconds,
        "seconds": time.perf_counter() - started,
    }
