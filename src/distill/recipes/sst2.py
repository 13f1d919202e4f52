"""SST-2 sentiment: a MiniLM teacher fine-tuned by the recipe, distilled into a 2-layer transformer derived from the
*pretrained* MiniLM (the DistilBERT protocol: the student never sees the fine-tuned weights) and into the BiLSTM of
Tang et al. 2019, with their augmented transfer set labeled by the teacher.

Each student is also trained alone on the same labeled phrases from the same initialisation; everything is scored
on `sst2/test.tsv` (the 872 sentences of the official dev split) and timed side by side on the CPU. A second choice
of kept layers is distilled the same way (the ablation): which layers a student keeps matters.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from distill import evaluate, hf, plots
from distill.augment import augment
from distill.config import MAX_DEPTH, Depth, LayerIndex, LossConfig, Rows, TextStudentsConfig, TrainConfig
from distill.data import IGNORE, TextDataset, concat_text, read_json, read_table, sha256_file, tokenize
from distill.errors import DataError
from distill.models import count_parameters
from distill.progress import Reporter
from distill.recipes.recipe import Recipe, datasets_folder
from distill.report import Report, Table, count, learning_curves, num, pct, ratio, seconds
from distill.sources import HubId, hub_columns, online
from distill.stages import RunContext, train_or_resume
from distill.students import derive
from distill.teachers import CachedTeacher, build_cache
from distill.teachers.local import LocalTeacher
from distill.text_models import BiLSTMClassifier, WordVocab
from distill.train import train


class Sst2Config(TextStudentsConfig):
    """`distill run --recipe sst2`: a fine-tuned teacher, a derived 2-layer transformer and a BiLSTM student."""

    recipe: Literal["sst2"] = "sst2"
    train_size: Rows = Field(6_000, description="labeled SST-2 training phrases used; 0 = all 60,614")
    transfer_size: Rows = Field(15_000, description="augmented sentences (masking, n-grams) labeled by the teacher")
    unlabeled_size: Rows = Field(
        30_000, description="more SST-2 training phrases, outside the labeled sample, labeled by the teacher"
    )
    student_layers: list[LayerIndex] | None = Field(
        None, max_length=MAX_DEPTH, description="teacher layers the transformer student keeps"
    )
    student_num_layers: Depth = Field(2, description="layers of the transformer student when not listed")
    ablation_layers: list[LayerIndex] | None = Field(
        default_factory=lambda: [4, 5],
        max_length=MAX_DEPTH,
        description="another choice of layers, distilled the same way; null = none",
    )
    bilstm: bool = Field(True, description="also distill into the BiLSTM student of Tang et al. 2019")
    freeze_embeddings: bool = Field(
        True,
        description="keep the pretrained word embeddings fixed (teacher and transformer students): half the CPU time",
    )
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=2.0, alpha=0.5))
    teacher_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=5e-5, schedule="cosine", warmup=0.1)
    )
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=2, batch_size=32, lr=1e-4, schedule="cosine", warmup=0.1)
    )
    bilstm_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=6, batch_size=64, lr=2e-3, schedule="cosine", warmup=0.05)
    )


GLUE_SST2 = {"train": HubId("nyu-mll/glue", "sst2", "train"), "test": HubId("nyu-mll/glue", "sst2", "validation")}


def load_sst2(
    data_dir: Path | None, train_size: int, seed: int, unlabeled_size: int = 0
) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Labeled training phrases (`train_size` drawn with `seed`; 0 = all), the 872 test sentences, and up to
    `unlabeled_size` other training phrases whose labels are dropped (the teacher labels them). From the folder
    `data_dir` (sst2/train.tsv, sst2/test.tsv), or with None from GLUE's SST-2 on the Hugging Face Hub (online
    only): its train split (67,349 phrases: the 60,614 of train.tsv and the 6,735 of the folder's dev.tsv) and its
    validation split (the same 872 sentences as test.tsv)."""
    if data_dir is None:
        texts, labels = _glue_sst2(GLUE_SST2["train"])
        test_texts, test_labels = _glue_sst2(GLUE_SST2["test"])
    else:
        texts, labels = _sst2_table(data_dir / "sst2" / "train.tsv")
        test_texts, test_labels = _sst2_table(data_dir / "sst2" / "test.tsv")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen, rest = (order[:train_size], order[train_size:]) if train_size else (order, [])
    seen = {texts[i] for i in chosen}
    unlabeled = list(dict.fromkeys(texts[i] for i in rest if texts[i] not in seen))[:unlabeled_size]
    return [texts[i] for i in chosen], labels[chosen], test_texts, test_labels, unlabeled


def _sst2_table(path: Path) -> tuple[list[str], torch.Tensor]:
    table = read_table(path, ["sentence", "label"])
    try:
        labels = torch.tensor([int(v) for v in table["label"]])
    except ValueError:
        raise DataError(f"{path}: labels must be 0 or 1") from None
    return [s.strip() for s in table["sentence"]], _binary(labels, str(path))


def _glue_sst2(hub: HubId) -> tuple[list[str], torch.Tensor]:
    table = hub_columns(hub, ["sentence", "label"])
    if not all(isinstance(s, str) for s in table["sentence"]) or not all(isinstance(v, int) for v in table["label"]):
        raise DataError(f"{hub}: sentences must be strings and labels 0 or 1")
    return [s.strip() for s in table["sentence"]], _binary(torch.tensor(table["label"], dtype=torch.long), str(hub))


def _binary(labels: torch.Tensor, source: str) -> torch.Tensor:
    if bool(((labels < 0) | (labels > 1)).any()):
        raise DataError(f"{source}: labels must be 0 or 1")
    return labels


def reference_data(config: TextStudentsConfig, context: RunContext, recipe: str) -> Path | None:
    """The folder of the reference data sets, or None (GLUE from the Hugging Face Hub) when no folder is given or
    found and the machine is online; offline, `datasets_folder`'s error (it needs --data-dir)."""
    if config.data_dir is None and (context.datasets is None or not context.datasets.is_dir()) and online():
        return None
    return datasets_folder(config, context, recipe)


def freeze_word_embeddings(model: nn.Module) -> nn.Module:
    """Keep a transformer's word embeddings at their pretrained values (the rest trains)."""
    model.get_input_embeddings().weight.requires_grad_(False)  # type: ignore[operator, union-attr]
    return model


def _evaluator(test: TextDataset) -> Any:
    return lambda m: {"test_accuracy": evaluate.accuracy(evaluate.predict(m, test, 256), test.labels)}


def fine_tune_teacher(
    config: Sst2Config,
    tokenizer: Any,
    train_set: TextDataset,
    test: TextDataset,
    store: Path,
    reporter: Reporter,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The fine-tuned teacher, trained once per (teacher, data sample, settings) and kept in the store
    with the sha256 of each of its files; a kept teacher whose files fail the check is fine-tuned again (the
    fine-tuning is deterministic: nothing is lost)."""
    key = hashlib.sha256(
        json.dumps(
            [
                config.teacher,
                config.train_size,
                config.seed,
                config.max_length,
                config.teacher_train.arithmetic(),
                train_set.fingerprint(),
            ]
        ).encode()
    ).hexdigest()[:16]
    directory = store / "sst2-teachers" / key
    done = directory / "fine_tune.json"
    if done.is_file():
        try:
            kept = read_json(done, ("history", "seconds", "files"))
        except DataError:
            kept = None  # a record cut short or from an older version: fine-tuned again below
        if kept is not None and kept["files"] == _checksums(directory):
            return hf.load_classifier(directory, 2), directory, kept
        shutil.rmtree(directory)
    torch.manual_seed(config.seed)  # the new classification head: the same teacher for the same key, every time
    model = hf.load_classifier(config.teacher, 2, store)
    result = train(
        model,
        train_set,
        config.teacher_train.model_copy(update={"seed": config.seed}),
        evaluate=_evaluator(test),
        checkpoint_dir=directory / "checkpoints",
        resume=True,
        reporter=reporter,
        name="teacher fine-tune",
    )
    model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)
    info = {"history": result.history, "seconds": result.seconds, "files": _checksums(directory)}
    tmp = done.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(done)
    return result.model, directory, info


def _checksums(directory: Path) -> dict[str, str]:
    """sha256 of every file directly in `directory` but the record that lists them (and its temporary copy)."""
    skip = ("fine_tune.json", "fine_tune.tmp")
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir()) if p.is_file() and p.name not in skip}


@dataclass
class Sst2Data:
    """The run's texts, and their tokens for the teacher and the transformer students."""

    texts: list[str]  # labeled training phrases
    labels: torch.Tensor
    transfer_texts: list[str]  # augmented sentences, then other training phrases without their labels
    unlabeled: int  # how many of the transfer texts are training phrases (the rest are augmented)
    test_texts: list[str]
    test_labels: torch.Tensor
    labeled: TextDataset
    test: TextDataset
    kd_data: TextDataset  # labeled + transfer


def _data(config: Sst2Config, tokenizer: Any, datasets: Path | None) -> Sst2Data:
    texts, labels, test_texts, test_labels, unlabeled = load_sst2(
        datasets, config.train_size, config.seed, config.unlabeled_size
    )
    transfer_texts = augment(texts, config.transfer_size, seed=config.seed) + unlabeled
    pad = tokenizer.pad_token_id or 0

    def tokens(rows: list[str], row_labels: torch.Tensor | None) -> TextDataset:
        return TextDataset(tokenize(tokenizer, rows, config.max_length), row_labels, pad_id=pad, token_types=True)

    labeled = tokens(texts, labels)
    transfer = tokens(transfer_texts, torch.full((len(transfer_texts),), IGNORE))
    return Sst2Data(texts, labels, transfer_texts, len(unlabeled), test_texts, test_labels, labeled,
                    tokens(test_texts, test_labels), concat_text(labeled, transfer))  # fmt: skip


def _student(
    name: str,
    model: nn.Module,
    data: TextDataset,
    config: TrainConfig,
    context: RunContext,
    *,
    teacher: CachedTeacher | None,
    loss: LossConfig,
    test: TextDataset,
    save: Callable[[nn.Module, Path], None],
    load: Callable[[Path], nn.Module],
) -> tuple[nn.Module, dict[str, Any]]:
    """One student trained (alone, or on the teacher's soft targets), or loaded when a resumed run finished it."""

    def fit() -> tuple[nn.Module, dict[str, Any]]:
        result = train(model, data, config, teacher=teacher, loss=loss, evaluate=_evaluator(test),
                       checkpoint_dir=context.output / "checkpoints" / name, resume=context.resume,
                       reporter=context.reporter, name=name)  # fmt: skip
        return result.model, {"history": result.history, "seconds": result.seconds}

    return train_or_resume(context.output / "students" / name, resume=context.resume, train=fit, save=save, load=load)


def _scores(model: nn.Module, test: TextDataset, teacher_logits: torch.Tensor) -> dict[str, float]:
    logits = evaluate.predict(model, test, 256)
    return {
        "accuracy": evaluate.accuracy(logits, test.labels),
        "agreement": evaluate.agreement(logits, teacher_logits),
        "kl_to_teacher": evaluate.kl_to_teacher(logits, teacher_logits),
        "ece": evaluate.calibration(logits, test.labels).ece,
    }


@dataclass
class Teaching:
    """The fine-tuned teacher's soft targets over the transfer set, and its outputs on the test sentences."""

    soft: CachedTeacher
    teacher_logits: torch.Tensor


def _transformers(
    config: Sst2Config, data: Sst2Data, teaching: Teaching, tokenizer: Any, context: RunContext
) -> dict[str, tuple[nn.Module, dict[str, Any]]]:
    """The transformer students derived from the *pretrained* teacher (never the fine-tuned one): distilled and
    alone, and the ablation's other choice of layers distilled."""

    def save(model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)

    pretrained = hf.load_classifier(config.teacher, 2, context.store)
    choices = [("transformer", config.student_layers)]
    if config.ablation_layers:
        choices.append(("transformer-ablation", config.ablation_layers))
    students = {}
    for kind, layers in choices:
        runs = [("distilled", data.kd_data, teaching.soft)] + (
            [("alone", data.labeled, None)] if kind == "transformer" else []
        )
        for mode, rows, source in runs:
            base, derivation = derive(
                pretrained, layers=layers, num_layers=None if layers else config.student_num_layers
            )
            if config.freeze_embeddings:
                freeze_word_embeddings(base)
            train_config = config.student_train.model_copy(update={"seed": config.seed})
            model, record = _student(f"{kind}-{mode}", base, rows, train_config, context, teacher=source, loss=config.loss,
                                     test=data.test, save=save, load=lambda d: hf.load_classifier(d, 2))  # fmt: skip
            entry = {"kind": "transformer", "layers": derivation.layers, "params": derivation.student_params}
            students[f"{kind}-{mode}"] = (
                model,
                entry | _entry(record, _scores(model, data.test, teaching.teacher_logits)),
            )
    return students


def _entry(record: dict[str, Any], scores: dict[str, float]) -> dict[str, Any]:
    return {"history": record["history"], "train_seconds": record["seconds"], **scores}


def _bilstms(
    config: Sst2Config, data: Sst2Data, teaching: Teaching, context: RunContext
) -> tuple[dict[str, tuple[nn.Module, dict[str, Any]]], TextDataset]:
    """The BiLSTM of Tang et al. 2019 over words, distilled and alone; and its tokens of the test sentences."""
    vocab = WordVocab.build(data.texts + data.transfer_texts)
    word_kd = TextDataset(vocab.encode(data.texts + data.transfer_texts, config.max_length), data.kd_data.labels)
    word_labeled = TextDataset(vocab.encode(data.texts, config.max_length), data.labels)
    word_test = TextDataset(vocab.encode(data.test_texts, config.max_length), data.test_labels)
    students = {}
    for mode, rows, source in (("distilled", word_kd, teaching.soft), ("alone", word_labeled, None)):
        torch.manual_seed(config.seed + 11)
        train_config = config.bilstm_train.model_copy(update={"seed": config.seed})
        model, record = _student(f"bilstm-{mode}", BiLSTMClassifier(len(vocab), 2), rows, train_config, context,
                                 teacher=source, loss=config.loss, test=word_test,
                                 save=lambda m, d: m.save(d, vocab),  # type: ignore[operator]
                                 load=lambda d: BiLSTMClassifier.load(d)[0])  # fmt: skip
        scores = _scores(model, word_test, teaching.teacher_logits)
        students[f"bilstm-{mode}"] = (
            model,
            {"kind": "bilstm", "params": count_parameters(model)} | _entry(record, scores),
        )
    return students, word_test


def _speed(
    teacher: nn.Module, students: dict[str, Any], test: TextDataset, word_test: TextDataset | None
) -> dict[str, Any]:
    """The teacher and the distilled students timed side by side on the same test sentences (each on its own
    tokens); each student's figures get its speed-ups over the teacher."""
    rows = torch.arange(min(128, len(test)))
    timed = {"teacher": teacher, "transformer-distilled": students["transformer-distilled"][0]}
    other = {}
    if word_test is not None:
        timed["bilstm-distilled"] = students["bilstm-distilled"][0]
        other["bilstm-distilled"] = (word_test.batch(rows[:1])["inputs"], word_test.batch(rows)["inputs"])
    speed = evaluate.measure_speed(timed, test.batch(rows[:1])["inputs"], test.batch(rows)["inputs"], rounds=5,
                                   min_seconds=0.2, inputs=other)  # fmt: skip
    teacher_speed = speed.pop("teacher")
    for name, measured in speed.items():
        students[name][1].update(
            latency_ms=measured.latency_ms, throughput=measured.throughput,
            speedup=measured.throughput / teacher_speed.throughput,
            latency_speedup=teacher_speed.latency_ms / measured.latency_ms,
        )  # fmt: skip
    return {"latency_ms": teacher_speed.latency_ms, "throughput": teacher_speed.throughput}


def _teaching(
    config: Sst2Config, data: Sst2Data, tokenizer: Any, context: RunContext
) -> tuple[nn.Module, Path, dict[str, Any], Teaching]:
    """The fine-tuned teacher (from the store, or fine-tuned now), its soft targets cached over labeled + transfer
    data, and its outputs on the test sentences."""
    store = context.store if context.store is not None else context.output / "store"
    teacher, folder, info = fine_tune_teacher(config, tokenizer, data.labeled, data.test, store, context.reporter)
    live = LocalTeacher(teacher, 2)
    cache = build_cache(live, data.kd_data, context.output / "cache" / "teacher", teacher_id=folder.name,
                        data_id=data.kd_data.fingerprint(), batch_size=128, reporter=context.reporter)  # fmt: skip
    logits = evaluate.teacher_logprobs(live, data.test, 256)
    return teacher, folder, info, Teaching(cache.at_temperature(config.loss.temperature), logits)


def run(config: Sst2Config, context: RunContext) -> dict[str, Any]:
    """The teacher fine-tuned, every student trained and scored, everything timed; the metrics."""
    context.reporter.stage("data", total=None)
    tokenizer = hf.load_tokenizer(config.teacher, context.store)
    data = _data(config, tokenizer, reference_data(config, context, "sst2"))
    context.reporter.end()
    teacher, folder, info, teaching = _teaching(config, data, tokenizer, context)
    students = _transformers(config, data, teaching, tokenizer, context)
    word_test = None
    if config.bilstm:
        bilstms, word_test = _bilstms(config, data, teaching, context)
        students |= bilstms
    context.reporter.stage("speed", total=None)
    teacher_speed = _speed(teacher, students, data.test, word_test)
    context.reporter.end()
    accuracy = evaluate.accuracy(teaching.teacher_logits, data.test_labels)
    for _, entry in students.values():
        entry["retention"] = entry["accuracy"] / accuracy
    return {
        "recipe": "sst2",
        "description": (
            f"SST-2: {len(data.labeled)} labeled training phrases; a transfer set labeled by the teacher of "
            f"{len(data.transfer_texts) - data.unlabeled} augmented sentences and {data.unlabeled} other training "
            f"phrases without their labels; {len(data.test)} test sentences; teacher {config.teacher} fine-tuned by "
            "the recipe"
        ),
        "teacher": {
            "name": config.teacher,
            "accuracy": accuracy,
            "params": count_parameters(teacher),
            "ece": evaluate.calibration(teaching.teacher_logits, data.test_labels).ece,
            **teacher_speed,
            "fine_tune_seconds": info.get("seconds"),
            "history": info.get("history"),
            "path": str(folder),
        },  # fmt: skip
        "students": {name: entry for name, (_, entry) in students.items()},
        "loss": config.loss.model_dump(),
    }


HEADER = ["model", "teacher layers kept", "test accuracy", "retention", "agreement", "parameters", "compression",
          "latency ms (batch 1)", "sentences/s (batch 128)", "ECE"]  # fmt: skip


def _rows(teacher: dict[str, Any], students: dict[str, Any]) -> list[list[str]]:
    rows = [
        [
            "teacher (fine-tuned)",
            "all",
            pct(teacher["accuracy"]),
            "100.0 %",
            "–",
            count(teacher["params"]),
            "1.0x",
            num(teacher["latency_ms"], 1),
            count(round(teacher["throughput"])),
            pct(teacher["ece"]),
        ]
    ]
    for name, s in students.items():
        rows.append(
            [
                name,
                ", ".join(map(str, s.get("layers", []))) or "–",
                pct(s["accuracy"]),
                pct(s["retention"]),
                pct(s["agreement"]),
                count(s["params"]),
                ratio(teacher["params"] / s["params"]),
                num(s.get("latency_ms"), 1) if s.get("latency_ms") else "–",
                count(round(s["throughput"])) if s.get("throughput") else "–",
                pct(s["ece"]),
            ]
        )
    return rows


def _summary(students: dict[str, Any]) -> list[str]:
    summary = []
    for kind in ("transformer", "bilstm"):
        distilled, alone = students.get(f"{kind}-distilled"), students.get(f"{kind}-alone")
        if distilled and alone:
            diff = distilled["accuracy"] - alone["accuracy"]
            summary.append(
                f"{kind}: distilled **{pct(distilled['accuracy'])}** ({pct(distilled['retention'])} of the teacher) "
                f"against {pct(alone['accuracy'])} trained alone ({'+' if diff >= 0 else ''}{100 * diff:.1f} points), "
                f"{ratio(distilled.get('latency_speedup'))} lower latency, {ratio(distilled.get('speedup'))} throughput."
            )
    ablation = students.get("transformer-ablation-distilled")
    if ablation and "transformer-distilled" in students:
        main = students["transformer-distilled"]
        summary.append(
            f"Kept layers matter: layers {', '.join(map(str, main['layers']))} give {pct(main['accuracy'])}, layers "
            f"{', '.join(map(str, ablation['layers']))} {pct(ablation['accuracy'])} (same data, same training)."
        )
    return summary


def report(metrics: dict[str, Any]) -> Report:
    """The SST-2 report: teacher vs students, distilled vs alone, kept layers, speed."""
    teacher, students, loss = metrics["teacher"], metrics["students"], metrics["loss"]
    notes = [
        f"Loss of the distilled students: {loss['alpha']} * T^2 * {loss['divergence']}(teacher_T || student_T) + "
        f"{1 - loss['alpha']:.2f} * CE(labels) on labeled rows, T = {loss['temperature']}; the transfer set has no labels.",
        "The transformer students start from the pretrained teacher's layers (never the fine-tuned ones); the "
        "distilled and alone runs of a student start from the same weights.",
        "Speed: teacher and students timed side by side on the same test sentences (interleaved rounds, median).",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    histories = {"teacher": teacher.get("history") or [], **{n: s["history"] for n, s in students.items()}}
    return Report(
        title="distill report: sst2",
        description=metrics["description"],
        summary=_summary(students),
        tables=[Table("Teacher vs students (SST-2, 872 test sentences)", HEADER, _rows(teacher, students))],
        notes=notes,
        images={
            **learning_curves(histories, "test_accuracy"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": "teacher", "params": teacher["params"], "accuracy": teacher["accuracy"]}]
                + [{"name": n, "params": s["params"], "accuracy": s["accuracy"]} for n, s in students.items()]
            ),
        },
    )


RECIPE = Recipe(
    name="sst2",
    summary="SST-2 sentiment: a fine-tuned MiniLM teacher distilled into a 2-layer transformer and a BiLSTM",
    config=Sst2Config,
    run=run,
    report=report,
    flags={
        "teacher": "teacher",
        "sample_size": "train_size",
        "transfer_size": "transfer_size",
        "data_dir": "data_dir",
        "epochs": "student_train.epochs",
        "teacher_epochs": "teacher_train.epochs",
        "seed": "seed",
        "temperature": "loss.temperature",
        "alpha": "loss.alpha",
        "divergence": "loss.divergence",
    },
    needs_datasets=lambda config: True,
)
