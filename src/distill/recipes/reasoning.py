"""Reasoning (chain-of-thought) distillation on CPU, end to end: `distill run --recipe reasoning`.

1. Problems: generated multi-step arithmetic word problems with worked solutions (`distill.generate.problems`),
   split into training and held-out problems with no question text in both.
2. Teacher: a byte-level BPE tokenizer and a GPT-2 trained on question -> worked solution (loss on the solution).
3. Traces: the teacher is served by `distill serve` (a thread of this process, real HTTP on loopback) and samples
   `samples` traces for each training question through `TeacherClient` + `generate` (traces.jsonl, resumable); each
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
import shutil
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from distill import evaluate
from distill.config import (
    BatchSize,
    GPT2Size,
    Length,
    LossConfig,
    Rows,
    SamplingTemperature,
    Seed,
    Share,
    Strict,
    TrainConfig,
    Vocab,
    Weight,
    Workers,
    check_gpt2_parameters,
)
from distill.data import read_json
from distill.engine import context_length
from distill.errors import DistillError
from distill.eval_lm import LocalTask, compare, scores, write_tasks
from distill.eval_lm import Model as EvalModel
from distill.generate.answers import Endpoint, PromptRecord, RequestParams, apply_template, generate, sample_id
from distill.generate.client import Prices, TeacherClient
from distill.generate.cot import QUESTION_ONLY_TEMPLATE, build_prompt, read_traces, split_traces, write_split
from distill.generate.problems import answer_only, make_problems, split_problems
from distill.generate.solve import solve
from distill.generate.verify import Problem
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.lm_models import gpt2, run_tokenizer, weights_bytes
from distill.models import count_parameters
from distill.progress import Reporter
from distill.recipes.reasoning_report import report
from distill.recipes.recipe import Recipe
from distill.serve import serve_in_thread
from distill.stages import RunContext, train_or_resume
from distill.teachers.api_logprobs import cache_from_generated
from distill.teachers.token_cache import TokenCache
from distill.train import train

PROMPT = QUESTION_ONLY_TEMPLATE
TEACHER = "teacher"
TRACES = "student-traces"
ANSWERS = "student-answers"
TRACES_KD = "student-traces-kd"
ENDPOINT: Endpoint = "completions"  # the raw prompt, exactly as the teacher was trained (no chat wrapping)


_TRAIN: dict[str, Any] = {"batch_size": 16, "lr": 3e-3, "schedule": "cosine", "warmup": 0.05, "checkpoint_every": 200}


class ReasoningConfig(Strict):
    """`distill run --recipe reasoning`: chain-of-thought distillation on CPU, end to end.

    A teacher GPT-2 learns generated word problems from worked solutions, is served over the OpenAI-compatible API
    and samples `samples` traces per training question; traces whose final answer verifies teach a smaller student,
    compared on held-out problems with the same student trained on final answers only (and, with `token_kd`, with
    the same student also taught the teacher's top log-probs at every trace token).
    """

    recipe: Literal["reasoning"] = "reasoning"
    problems: Annotated[Rows, Field(ge=1)] = Field(
        40000,
        description="training problems: the teacher learns their worked solutions, the students their questions",
    )
    questions: Rows = Field(
        20000, description="training questions the teacher answers with traces (the first); 0 = all"
    )
    held_out: Annotated[Rows, Field(ge=1)] = Field(
        300, description="problems held out for evaluation (no question seen in training)"
    )
    steps: list[Annotated[int, Field(ge=1, le=6)]] = Field(
        default_factory=lambda: [2], min_length=1, max_length=6, description="calculations per problem (1..6)"
    )
    vocab_size: Vocab = Field(
        1000, description="byte-level BPE vocabulary (an upper bound: the regular text of the problems may fill fewer)"
    )
    tokenizer: Literal["bpe", "bpe-digits"] = Field(
        "bpe",
        description="bpe: byte-level BPE, where most numbers up to 200 become one token each (arithmetic is a table "
        "to learn); bpe-digits: numbers split into single digits (as Llama-3 and Qwen tokenizers do), which these "
        "small models learn more slowly (19.7 % against 63.3 % for the same teacher and budget)",
    )
    max_length: Annotated[Length, Field(ge=32, le=1024)] = Field(160, description="tokens of question + solution")
    teacher: GPT2Size = Field(default_factory=lambda: {"layers": 4, "width": 128, "heads": 4})
    student: GPT2Size = Field(default_factory=lambda: {"layers": 2, "width": 64, "heads": 2})
    teacher_train: TrainConfig = Field(default_factory=lambda: TrainConfig(epochs=2, **_TRAIN))
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=10, **_TRAIN),
        description="both students; the answers-only one runs as many epochs as it needs to match the other's steps",
    )
    samples: Annotated[int, Field(ge=1, le=64)] = Field(1, description="traces sampled per question (n)")
    temperature: SamplingTemperature = Field(0.7, description="sampling temperature of the traces")
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    max_new_tokens: Annotated[Length, Field(ge=8)] = Field(96, description="longest trace, in tokens")
    concurrency: Workers = Field(16, description="requests in flight to the teacher's server")
    server_batch: BatchSize = Field(64, description="rows the server generates together")
    dedupe: bool = Field(False, description="keep one copy of identical verified traces of a question")
    token_kd: Annotated[int, Field(ge=0, le=20)] = Field(
        5,
        description="top log-probs the API returns per trace token; > 0 adds a third student trained on the "
        "verified traces with sparse token-level KD from them (0 = two students)",
    )
    token_kd_alpha: Share = Field(0.5, description="weight of the token-level KD term (CE: 1 - alpha)")
    baseline: Literal["all", "verified"] = Field(
        "all",
        description="the answers-only student learns the gold answers of all traced questions (all) or only of "
        "those with a verified trace (verified)",
    )
    input_price: Weight = Field(0.15, description="nominal price per million prompt tokens (the report's cost)")
    output_price: Weight = Field(0.6, description="nominal price per million completion tokens")
    threads: Workers | None = Field(
        1, description="torch CPU threads during the run (restored after); null leaves torch's setting"
    )
    tasks: Rows = Field(
        300,
        description="held-out problems in the lm-evaluation-harness tasks (answers, solutions' perplexity); 0 = none",
    )
    seed: Seed = 0

    @field_validator("teacher", "student")
    @classmethod
    def _bounded_model(cls, size: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        check_gpt2_parameters(size, info.data.get("vocab_size", 300))
        return size


def problem_sets(config: ReasoningConfig) -> tuple[list[Problem], list[Problem]]:
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
    """`lm_models.gpt2` without dropout: these runs are a few epochs long and memorise arithmetic facts, which
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
    train_config: TrainConfig,
    context: RunContext,
    *,
    max_length: int,
    seed: int,
    teacher: TokenCache | None = None,
    loss: LossConfig | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """A fresh GPT-2 of `size` trained into output/models/name (model and tokenizer, servable as is), or loaded when
    a resumed run finished it already; with `teacher` (a token cache over `data`) distilled under `loss`."""
    from transformers import GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()  # library code reports through the reporter only

    def train_it() -> tuple[nn.Module, dict[str, Any]]:
        result = train(fresh_gpt2(tokenizer, size, max_length, seed), data, train_config, teacher=teacher,
                       loss=loss or LossConfig(), checkpoint_dir=context.output / "checkpoints" / name,
                       resume=context.resume, reporter=context.reporter, name=name)  # fmt: skip
        return result.model, {"history": result.history, "seconds": result.seconds, "steps": result.steps,
                              "rows": len(data)}  # fmt: skip

    def save(model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)

    model, record = train_or_resume(context.output / "models" / name, resume=context.resume, train=train_it,
                                    save=save, load=GPT2LMHeadModel.from_pretrained,
                                    keys=("history", "seconds", "steps", "rows"))  # fmt: skip
    return model.eval(), record


def sample_traces(
    config: ReasoningConfig,
    teacher_dir: Path,
    questions: Sequence[Problem],
    path: Path,
    max_tokens: int,
    reporter: Reporter,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Serve the teacher, ask it for `config.samples` traces per question into `path` (only the missing ones), and
    return this configuration's trace records (in file order) and what the generation run did."""
    records = [PromptRecord(prompt=p.question, gold=p.answer) for p in questions]
    params = RequestParams(
        temperature=config.temperature,
        top_p=config.top_p,
        max_tokens=max_tokens,
        seed=config.seed,
        top_logprobs=config.token_kd or None,
    )
    with serve_in_thread(teacher_dir, model_name=TEACHER, max_batch_size=config.server_batch) as base_url:
        prices = Prices(config.input_price, config.output_price)
        client = TeacherClient(base_url, TEACHER, concurrency=config.concurrency, timeout=600.0, prices=prices)
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


def _speed(models: dict[str, nn.Module], data: LMDataset, rows: int = 16) -> dict[str, dict[str, float]]:
    """Forward-pass tokens/s at batch `rows` and latency at batch 1, every model timed side by side."""
    index = torch.arange(min(rows, len(data)))
    single, batch = data.batch(index[:1])["inputs"], data.batch(index)["inputs"]
    speed = evaluate.measure_speed(models, single, batch, rounds=5, min_seconds=0.2)
    tokens = int(batch["attention_mask"].sum())
    return {
        name: {"tokens_per_second": s.throughput * tokens / len(index), "latency_ms": s.latency_ms}
        for name, s in speed.items()
    }


def train_students(
    config: ReasoningConfig,
    tokenizer: Any,
    verified: list[dict[str, Any]],
    questions: Sequence[Problem],
    context: RunContext,
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
        students[name] = fit(name, config.student, tokenizer, data, train_config, context, max_length=config.max_length,
                             seed=config.seed + 1)  # fmt: skip
    if config.token_kd:
        cache, coverage = api_cache(tokenizer, context.output, trace_data, config.max_length, context.resume)
        loss = LossConfig(temperature=1.0, alpha=config.token_kd_alpha)
        students[TRACES_KD] = fit(
            TRACES_KD, config.student, tokenizer, trace_data, config.student_train, context,
            max_length=config.max_length, seed=config.seed + 1, teacher=cache, loss=loss,
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
        scores, predictions = solve(model, tokenizer, held_out, prompt_of, max_tokens)
        with (output / "predictions" / f"{name}.jsonl").open("w", encoding="utf-8") as handle:
            handle.writelines(json.dumps(row) + "\n" for row in predictions)
        rows[name] = {
            **scores,
            **speed[name],
            "params": count_parameters(model),
            "size_bytes": weights_bytes(output / "models" / name),
            "train_rows": info["rows"],
            "train_steps": info["steps"],
            "train_seconds": info["seconds"],
            "history": info["history"],
            **({"token_cache": info["token_cache"]} if "token_cache" in info else {}),
        }
    reporter.end()
    return rows


def _room(teacher: nn.Module, tokenizer: Any, problems: list[Problem], wanted: int) -> int:
    """Tokens a solution may take: `wanted`, or less when the longest question leaves less of the context."""
    context = context_length(teacher.config, tokenizer)
    longest = max(len(tokenizer(prompt_of(p), add_special_tokens=False)["input_ids"]) for p in problems)
    room = min(wanted, context - longest)
    if room < 8:
        raise DistillError(
            f"the longest question takes {longest} of the model's {context} positions, leaving no room for a "
            "solution; raise max_length"
        )
    return room


def _traces(
    config: ReasoningConfig, questions: list[Problem], max_tokens: int, context: RunContext
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    """The teacher's traces through its API, split into verified and rejected (written to output/traces/):
    (the verified rows, the split's summary, what the generation did)."""
    path = context.output / "traces.jsonl"
    if not context.resume:
        path.unlink(missing_ok=True)  # a fresh run must not keep traces of an earlier teacher
    teacher_dir = context.output / "models" / TEACHER
    records, generation = sample_traces(config, teacher_dir, questions, path, max_tokens, context.reporter)
    verified, rejected, summary = split_traces(records, "numeric", dedupe=config.dedupe, student_template=PROMPT)
    write_split(verified, rejected, context.output / "traces", summary)
    if not verified:
        raise DistillError(
            f"none of the teacher's {len(records)} traces has the right final answer; train the teacher longer "
            "(teacher_train.epochs) or on more problems"
        )
    return verified, summary, generation


def task_scores(held_out: list[Problem], config: ReasoningConfig, context: RunContext, models: list[str],
                max_tokens: int) -> dict[str, Any]:  # fmt: skip
    """Every model on two local tasks of lm-evaluation-harness over held-out problems (`reasoning_answers`: the final
    answer of a greedy solution, exact match; `reasoning_solutions`: perplexity of the worked solutions), with each
    student's retention against the teacher."""
    folder = context.output / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    chosen = held_out[: config.tasks]
    answers = [{"question": p.question, "answer": p.answer} for p in chosen]
    solutions = [{"text": prompt_of(p) + p.solution} for p in chosen]
    for name, rows in (("answers", answers), ("solutions", solutions)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tasks = [LocalTask("reasoning_answers", "answer", folder / "answers.jsonl", PROMPT, max_tokens),
             LocalTask("reasoning_solutions", "perplexity", folder / "solutions.jsonl")]  # fmt: skip
    include = write_tasks(tasks, folder / "tasks")
    context.reporter.stage("tasks (lm-evaluation-harness)", total=len(models))
    by_model = {}
    for name in models:
        by_model[name] = scores(EvalModel(path=context.output / "models" / name), [t.name for t in tasks], include)
        context.reporter.advance(1)
    context.reporter.end()
    return compare(by_model, TEACHER)


def run(config: ReasoningConfig, context: RunContext) -> dict[str, Any]:
    """Teacher, verified traces through its API, a student on the traces and one on answers only; the metrics.

    With `context.resume`, what a previous run finished is reused: the tokenizer, each trained model, and every
    trace already in traces.jsonl (the teacher is asked only for the missing ones)."""
    with torch_threads(config.threads):
        return _run(config, context)


def _run(config: ReasoningConfig, context: RunContext) -> dict[str, Any]:
    clock, seconds = time.perf_counter(), {}

    def lap(name: str) -> None:
        nonlocal clock
        seconds[name], clock = time.perf_counter() - clock, time.perf_counter()

    context.reporter.stage("data", total=None)
    train_problems, held_out = problem_sets(config)
    questions = train_problems[: config.questions] if config.questions else train_problems
    texts = [prompt_of(p) + p.solution for p in train_problems]
    tokenizer = run_tokenizer(texts, config.vocab_size, context.output / "tokenizer", context.resume, config.tokenizer)
    worked = tokenize_examples(
        tokenizer, [Example(prompt_of(p), p.solution) for p in train_problems], config.max_length
    )
    context.reporter.end()
    teacher = fit(TEACHER, config.teacher, tokenizer, worked, config.teacher_train, context,
                  max_length=config.max_length, seed=config.seed)  # fmt: skip
    lap("teacher")
    max_tokens = _room(teacher[0], tokenizer, questions + held_out, config.max_new_tokens)
    verified, trace_summary, generation = _traces(config, questions, max_tokens, context)
    lap("traces")
    students = train_students(config, tokenizer, verified, questions, context)
    lap("students")
    rows = evaluate_models({TEACHER: teacher, **students}, tokenizer, held_out, context.output,
                           max_length=config.max_length, max_tokens=max_tokens, reporter=context.reporter)  # fmt: skip
    lap("evaluate")
    evaluation = task_scores(held_out, config, context, list(rows), max_tokens) if config.tasks else None
    lap("tasks")
    return {
        "tasks": evaluation,
        "recipe": "reasoning",
        "description": (
            f"{len(train_problems)} generated word problems ({'/'.join(map(str, config.steps))} calculations) train "
            f"the teacher; {len(questions)} of their questions get {config.samples} sampled traces each; "
            f"{len(held_out)} held-out problems; {'BPE with numbers in digits' if config.tokenizer == 'bpe-digits' else 'BPE'} of {len(tokenizer)} tokens; teacher GPT-2 {config.teacher}, "
            f"students GPT-2 {config.student}"
        ),
        "models": rows,
        "traces": trace_summary,
        "generation": generation,
        "baseline": config.baseline,
        "sampling": {"temperature": config.temperature, "top_p": config.top_p, "max_tokens": max_tokens},
        "prices": {"input_per_million": config.input_price, "output_per_million": config.output_price},
        "stage_seconds": seconds,
    }


RECIPE = Recipe(
    name="reasoning",
    summary="chain-of-thought distillation: verified traces sampled from a served teacher teach a smaller student",
    config=ReasoningConfig,
    run=run,
    report=report,
    flags={
        "sample_size": "problems",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
    },
)
