"""The built-in language-model recipe (`distill run --recipe lm`): distillation through a log-prob cache on a CPU.

It trains a byte-level BPE tokenizer and a small GPT-2 teacher on local text, scores the training texts once into a
top-k log-prob cache, then trains a smaller GPT-2 student from the cache (sparse token-level KD plus the hard-label
loss) and, separately, the same student alone on the same texts for as many steps. Everything is scored on held-out
texts: perplexity, KL to the teacher, next-token agreement with the teacher, tokens per second (timed side by side)
and size. Every model folder holds its tokenizer, so each loads (and serves) on its own.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationInfo, field_validator
from torch import nn

from distill import evaluate, hf, plots
from distill.config import (
    GPT2Size,
    Length,
    LossConfig,
    Rows,
    Seed,
    Strict,
    TopK,
    TrainConfig,
    Vocab,
    check_gpt2_parameters,
)
from distill.data import read_lines, read_table
from distill.errors import DataError
from distill.eval_lm import LocalTask, compare, scores, write_tasks
from distill.eval_lm import Model as EvalModel
from distill.eval_lm import summary as eval_summary
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.lm_models import gpt2, run_tokenizer, speed_inputs, weights_bytes
from distill.models import count_parameters
from distill.recipes.recipe import Recipe
from distill.report import Report, Table, count, num, pct, ratio, seconds, size, task_table
from distill.stages import RunContext, train_or_resume
from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits, verify_token_cache
from distill.train import train


class LMConfig(Strict):
    """`distill run --recipe lm`: a small teacher LM trained on local text, cached, taught to a smaller student."""

    recipe: Literal["lm"] = "lm"
    data_dir: Path | None = Field(None, description="folder with sst2/, stsb/, agnews/ (default ../shared/data)")
    corpus: Path | None = Field(None, description="a text file (one text per line) instead of the data sets")
    sample_size: Rows = Field(30_000, description="texts drawn from the corpus; 0 = all")
    vocab_size: Vocab = Field(2048, description="BPE vocabulary trained on the corpus")
    max_length: Annotated[Length, Field(ge=8, le=512)] = 48
    top_k: TopK = Field(64, description="teacher log-probs kept per token in the cache")
    teacher: GPT2Size = Field(default_factory=lambda: {"layers": 4, "width": 256, "heads": 4})
    student: GPT2Size = Field(default_factory=lambda: {"layers": 2, "width": 128, "heads": 2})
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=1.0, alpha=0.5, chunk_size=2048))
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=3, batch_size=32, lr=1e-3, schedule="cosine", warmup=0.05)
    )
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=3, batch_size=32, lr=2e-3, schedule="cosine", warmup=0.05)
    )
    student_tokenizer: Literal["same", "other"] = Field(
        "same",
        description="other: the students get their own tokenizer (a SentencePiece-style unigram of "
        "student_vocab_size) and learn from the teacher through alignment by text (distill.teachers.cross)",
    )
    student_vocab_size: Vocab = Field(1024, description="the students' vocabulary when student_tokenizer is other")
    student_sample_size: Rows = Field(
        0,
        description="(student_tokenizer other) the students learn from the first this many of the teacher's texts, "
        "as a student is distilled on less data than its teacher saw; 0 = all",
    )
    tasks: Rows = Field(
        200,
        description="held-out texts each task of lm-evaluation-harness gets (continuation choice, perplexity); 0 = no tasks",
    )
    seed: Seed = 0

    @field_validator("top_k")
    @classmethod
    def _top_k_within_vocabulary(cls, top_k: int, info: ValidationInfo) -> int:
        vocab_size = info.data.get("vocab_size")
        if vocab_size is not None and top_k > vocab_size:
            raise ValueError(f"top_k {top_k:,} is more than the vocabulary's {vocab_size:,} tokens")
        return top_k

    @field_validator("teacher", "student")
    @classmethod
    def _bounded_model(cls, size: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        check_gpt2_parameters(size, info.data.get("vocab_size", 300))
        return size


def corpus(config: LMConfig, data_dir: Path | None) -> list[str]:
    """Texts: the given file, or the sentences of SST-2 train, AG News dev and STS-B train (never a test split)."""
    if config.corpus is not None:
        texts = read_lines(config.corpus)
    else:
        if data_dir is None:
            raise DataError("the lm recipe needs --data-dir (the reference data sets) or --set corpus=FILE")
        texts = []
        if (data_dir / "sst2" / "train.tsv").is_file():
            texts += [
                s for s in read_table(data_dir / "sst2" / "train.tsv", ["sentence"])["sentence"] if len(s.split()) >= 4
            ]
        if (data_dir / "agnews" / "dev.tsv").is_file():
            texts += read_table(data_dir / "agnews" / "dev.tsv", ["text"], header=False, names=["text", "label"])[
                "text"
            ]
        if not texts:
            raise DataError(f"no texts under {data_dir} (sst2/, agnews/); pass --set corpus=FILE")
    unique = list(dict.fromkeys(t.strip() for t in texts if t.strip()))
    random.Random(config.seed).shuffle(unique)
    return unique[: config.sample_size] if config.sample_size else unique


def _fit(name: str, config: LMConfig, size: dict[str, int], tokenizer: Any, data: LMDataset, context: RunContext,
         *, teacher: Any, train_config: TrainConfig, seed: int,
         loss: LossConfig | None = None) -> tuple[nn.Module, dict[str, Any]]:  # fmt: skip
    """A fresh GPT-2 of `size` trained (or loaded when a resumed run finished it) into output/models/name, with
    the tokenizer beside it; with `loss` (default the config's)."""
    from transformers import GPT2LMHeadModel

    def fit() -> tuple[nn.Module, dict[str, Any]]:
        result = train(gpt2(tokenizer, size, config.max_length, seed), data, train_config, teacher=teacher,
                       loss=loss or config.loss, checkpoint_dir=context.output / "checkpoints" / name,
                       resume=context.resume,
                       reporter=context.reporter, name=name)  # fmt: skip
        return result.model, {"history": result.history, "seconds": result.seconds, "steps": result.steps}

    def save(model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)

    model, record = train_or_resume(context.output / "models" / name, resume=context.resume, train=fit, save=save,
                                    load=GPT2LMHeadModel.from_pretrained, keys=("history", "seconds", "steps"))  # fmt: skip
    return model.eval(), record


def _cache(teacher: nn.Module, data: LMDataset, tokenizer: Any, config: LMConfig, context: RunContext) -> Path:
    """The teacher's top-k log-probs over the training texts, scored once (a killed build resumes)."""
    path = context.output / "cache"
    build_token_cache(
        causal_lm_logits(teacher), [s.numpy() for s in data.sequences], path,
        scored=[data.scored(i).numpy() for i in range(len(data))], top_k=config.top_k,
        temperature=config.loss.temperature, teacher_name="lm-recipe-teacher", teacher_revision="trained-by-recipe",
        tokenizer_hash=hf.tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer), data_id=data.fingerprint(), batch_size=32, reporter=context.reporter,
    )  # fmt: skip
    return path


def _scores(
    trained: dict[str, tuple[nn.Module, dict[str, Any]]], held_out: LMDataset, context: RunContext
) -> dict[str, Any]:
    """Every model on the held-out texts (against the teacher), timed side by side."""
    single, batch = speed_inputs(held_out)
    models = {name: model for name, (model, _) in trained.items()}
    speed = evaluate.measure_speed(models, single, batch, rounds=5, min_seconds=0.2)
    tokens_per_batch = int(batch["attention_mask"].sum())
    teacher = models["teacher"]
    rows: dict[str, Any] = {}
    for name, (model, record) in trained.items():
        rows[name] = {
            **evaluate.lm_scores(model, held_out, None if name == "teacher" else teacher),
            "params": count_parameters(model),
            "size_bytes": weights_bytes(context.output / "models" / name),
            "tokens_per_second": speed[name].throughput * tokens_per_batch / len(batch["input_ids"]),
            "latency_ms": speed[name].latency_ms,
            "history": record["history"],
            "train_seconds": record["seconds"],
        }
    return rows


def continuation_choices(texts: list[str], count: int, seed: int) -> list[dict[str, Any]]:
    """A multiple-choice task from held-out texts: the first half of a text's words, and its true ending among the
    endings of three other texts (HellaSwag's idea, on local data)."""
    long = [t.split() for t in texts if len(t.split()) >= 6][: count + 3]
    rng = random.Random(seed)
    rows = []
    for i, words in enumerate(long[:count]):
        cut = len(words) // 2
        others = rng.sample([j for j in range(len(long)) if j != i], 3)
        endings = [" ".join(words[cut:])] + [" ".join(long[j][len(long[j]) // 2 :]) for j in others]
        order = rng.sample(range(4), 4)
        rows.append({"query": " ".join(words[:cut]), "choices": [endings[k] for k in order], "gold": order.index(0)})
    return rows


def task_scores(texts: list[str], config: LMConfig, context: RunContext, models: list[str]) -> dict[str, Any]:
    """Every model of the run on two local tasks of lm-evaluation-harness over held-out texts (`lm_continuation`,
    multiple choice; `lm_perplexity`), with each student's retention against the teacher."""
    folder = context.output / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    rows = {"continuation": continuation_choices(texts, config.tasks, config.seed),
            "perplexity": [{"text": t} for t in texts[: config.tasks]]}  # fmt: skip
    for name, items in rows.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in items), encoding="utf-8")
    tasks = [LocalTask("lm_continuation", "choice", folder / "continuation.jsonl"),
             LocalTask("lm_perplexity", "perplexity", folder / "perplexity.jsonl")]  # fmt: skip
    include = write_tasks(tasks, folder / "tasks")
    context.reporter.stage("tasks (lm-evaluation-harness)", total=len(models))
    by_model = {}
    for name in models:
        by_model[name] = scores(EvalModel(path=context.output / "models" / name), [t.name for t in tasks], include)
        context.reporter.advance(1)
    context.reporter.end()
    return compare(by_model)


def run(config: LMConfig, context: RunContext) -> dict[str, Any]:
    """Tokenizer, teacher, cache, students, scores; the metrics."""
    context.reporter.stage("data", total=None)
    texts = corpus(config, config.data_dir or context.datasets)
    held_out_count = max(200, len(texts) // 20)
    train_texts, held_out_texts = texts[held_out_count:], texts[:held_out_count]
    if config.student_tokenizer == "other":
        from distill.recipes.lm_cross import run_other_tokenizer

        context.reporter.end()
        return run_other_tokenizer(config, context, train_texts, held_out_texts, fit=_fit, cache=_cache)
    tokenizer = run_tokenizer(train_texts, config.vocab_size, context.output / "tokenizer", context.resume)
    data = tokenize_examples(tokenizer, [Example("", t) for t in train_texts], config.max_length)
    held_out = tokenize_examples(tokenizer, [Example("", t) for t in held_out_texts], config.max_length)
    context.reporter.end()
    trained = {"teacher": _fit("teacher", config, config.teacher, tokenizer, data, context, teacher=None,
                               train_config=config.teacher_train, seed=config.seed)}  # fmt: skip
    cache_path = _cache(trained["teacher"][0], data, tokenizer, config, context)
    for name, source in (("student-distilled", TokenCache(cache_path)), ("student-alone", None)):
        trained[name] = _fit(name, config, config.student, tokenizer, data, context, teacher=source,
                             train_config=config.student_train, seed=config.seed + 1)  # fmt: skip
    context.reporter.stage("evaluate", total=None)
    rows = _scores(trained, held_out, context)
    context.reporter.end()
    shutil.copytree(context.output / "models" / "student-distilled", context.output / "student", dirs_exist_ok=True)
    evaluation = task_scores(held_out_texts, config, context, list(trained)) if config.tasks else None
    return {
        "tasks": evaluation,
        "recipe": "lm",
        "description": (
            f"{len(train_texts)} training texts and {len(held_out_texts)} held-out texts; byte-level BPE "
            f"of {len(tokenizer)} tokens; teacher GPT-2 {config.teacher}, student GPT-2 {config.student}; "
            f"cache top-{config.top_k}"
        ),
        "models": rows,
        "cache": verify_token_cache(cache_path),
        "loss": config.loss.model_dump(),
    }


def report(metrics: dict[str, Any]) -> Report:
    """The LM report: held-out perplexity, KL and agreement of the teacher and the students, speed, the cache."""
    if metrics.get("student_tokenizer") == "other":
        from distill.recipes.lm_cross import report_other_tokenizer

        return report_other_tokenizer(metrics)
    rows_in = metrics["models"]
    header = [
        "model",
        "held-out perplexity",
        "KL to teacher",
        "next-token agreement",
        "parameters",
        "size",
        "tokens/s (batch 16)",
        "train time",
    ]
    rows = []
    for name, m in rows_in.items():
        rows.append(
            [
                name,
                num(m["perplexity"], 2),
                num(m.get("kl_to_teacher"), 3),
                pct(m.get("agreement")),
                count(m["params"]),
                size(m.get("size_bytes")),
                count(round(m["tokens_per_second"])),
                seconds(m.get("train_seconds")),
            ]
        )
    distilled, alone, teacher = rows_in["student-distilled"], rows_in["student-alone"], rows_in["teacher"]
    summary = [
        f"Distilled from the teacher's cached top-{metrics['cache']['top_k']} log-probs, the student reaches "
        f"perplexity **{num(distilled['perplexity'], 2)}** against {num(alone['perplexity'], 2)} trained alone on "
        f"the same texts (teacher {num(teacher['perplexity'], 2)}), and agrees with the teacher's next token "
        f"**{pct(distilled['agreement'])}** of the time against {pct(alone['agreement'])}.",
        f"The student has {ratio(teacher['params'] / distilled['params'])} fewer parameters and processes "
        f"{ratio(distilled['tokens_per_second'] / teacher['tokens_per_second'])} as many tokens per second.",
        f"The cache holds {count(metrics['cache']['positions'])} positions at "
        f"{num(metrics['cache']['bytes_per_position'], 1)} bytes each.",
    ]
    loss = metrics["loss"]
    notes = [
        f"Loss of the distilled student: {loss['alpha']} * T^2 * {loss['divergence']}(teacher || student) on the "
        f"cache's top-k plus a tail bucket + {1 - loss['alpha']:.2f} * CE(next token), T = {loss['temperature']}, "
        f"computed in chunks of {loss['chunk_size']} tokens; the student alone trains on CE for as many steps.",
        "Tokens per second: teacher and students timed side by side on the same held-out batch.",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    histories = {name: m["history"] for name, m in rows_in.items()}
    return Report(
        title="distill report: lm",
        description=metrics["description"],
        summary=summary + (eval_summary(metrics["tasks"]) if metrics.get("tasks") else []),
        tables=[Table("Teacher vs students (held-out texts)", header, rows)]
        + ([task_table(metrics["tasks"])] if metrics.get("tasks") else []),
        notes=notes,
        images={"learning_curves.png": plots.learning_curves(histories, "loss")},
    )


RECIPE = Recipe(
    name="lm",
    summary="a small GPT-2 teacher trained on local text, cached (top-k log-probs), distilled into a smaller GPT-2",
    config=LMConfig,
    run=run,
    report=report,
    flags={
        "sample_size": "sample_size",
        "data_dir": "data_dir",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
        "temperature": "loss.temperature",
        "alpha": "loss.alpha",
        "divergence": "loss.divergence",
        "student_tokenizer": "student_tokenizer",
    },
    needs_datasets=lambda config: config.corpus is None,
)
