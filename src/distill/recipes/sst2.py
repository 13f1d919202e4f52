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
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import evaluate as ev
from distill.augment import augment
from distill.config import LossConfig, Sst2RunConfig, TrainConfig
from distill.data import IGNORE, TextDataset, concat_text, read_json, read_table, sha256_file, tokenize
from distill.errors import DataError
from distill.models import count_parameters
from distill.progress import NULL, Reporter
from distill.students import derive
from distill.teachers import CachedTeacher, build_cache, hf
from distill.teachers.local import LocalTeacher
from distill.text_models import BiLSTMClassifier, WordVocab
from distill.train import train


def load_sst2(
    data_dir: Path, train_size: int, seed: int, unlabeled_size: int = 0
) -> tuple[list[str], torch.Tensor, list[str], torch.Tensor, list[str]]:
    """Labeled training phrases (`train_size` drawn with `seed`; 0 = all), the 872 test sentences, and up to
    `unlabeled_size` other training phrases whose labels are dropped (the teacher labels them)."""

    def labeled(path: Path) -> tuple[list[str], torch.Tensor]:
        table = read_table(path, ["sentence", "label"])
        try:
            labels = torch.tensor([int(v) for v in table["label"]])
        except ValueError:
            raise DataError(f"{path}: labels must be 0 or 1") from None
        if bool(((labels < 0) | (labels > 1)).any()):
            raise DataError(f"{path}: labels must be 0 or 1")
        return [s.strip() for s in table["sentence"]], labels

    texts, labels = labeled(data_dir / "sst2" / "train.tsv")
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    chosen, rest = (order[:train_size], order[train_size:]) if train_size else (order, [])
    seen = {texts[i] for i in chosen}
    unlabeled = list(dict.fromkeys(texts[i] for i in rest if texts[i] not in seen))[:unlabeled_size]
    test_texts, test_labels = labeled(data_dir / "sst2" / "test.tsv")
    return [texts[i] for i in chosen], labels[chosen], test_texts, test_labels, unlabeled


def freeze_word_embeddings(model: nn.Module) -> nn.Module:
    """Keep a transformer's word embeddings at their pretrained values (the rest trains)."""
    model.get_input_embeddings().weight.requires_grad_(False)  # type: ignore[operator, union-attr]
    return model


def _evaluator(test: TextDataset) -> Any:
    return lambda m: {"test_accuracy": ev.accuracy(ev.predict(m, test, 256), test.labels)}


def fine_tune_teacher(
    config: Sst2RunConfig,
    tokenizer: Any,
    train_set: TextDataset,
    test: TextDataset,
    cache_dir: Path,
    reporter: Reporter,
) -> tuple[nn.Module, Path, dict[str, Any]]:
    """The fine-tuned teacher, trained once per (teacher, data sample, settings) and kept in the cache directory
    with the sha256 of each of its files; a kept teacher whose files fail the check is fine-tuned again (the
    fine-tuning is deterministic: nothing is lost)."""
    key = hashlib.sha256(
        json.dumps(
            [
                config.teacher,
                config.train_size,
                config.seed,
                config.max_length,
                config.teacher_train.model_dump(),
                train_set.fingerprint(),
            ]
        ).encode()
    ).hexdigest()[:16]
    directory = cache_dir / "sst2-teachers" / key
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
    model = hf.load_classifier(config.teacher, 2, cache_dir)
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


def _train_student(
    name: str,
    model: nn.Module,
    data: TextDataset,
    config: TrainConfig,
    output: Path,
    *,
    teacher: CachedTeacher | None,
    loss: LossConfig,
    test: TextDataset,
    resume: bool,
    reporter: Reporter,
    save: Any,
    load: Any,
) -> tuple[nn.Module, list[dict[str, float]], float]:
    directory = output / "students" / name
    done = directory / "history.json"
    if resume and done.is_file():
        saved = read_json(done, ("history", "seconds"))
        return load(directory), saved["history"], saved["seconds"]
    result = train(
        model,
        data,
        config,
        teacher=teacher,
        loss=loss,
        evaluate=_evaluator(test),
        checkpoint_dir=output / "checkpoints" / name,
        resume=resume,
        reporter=reporter,
        name=name,
    )
    save(result.model, directory)
    done.write_text(json.dumps({"history": result.history, "seconds": result.seconds}))
    return result.model, result.history, result.seconds


def _scores(model: nn.Module, test: TextDataset, teacher_logits: torch.Tensor) -> dict[str, float]:
    logits = ev.predict(model, test, 256)
    return {
        "accuracy": ev.accuracy(logits, test.labels),
        "agreement": ev.agreement(logits, teacher_logits),
        "kl_to_teacher": ev.kl_to_teacher(logits, teacher_logits),
        "ece": ev.calibration(logits, test.labels).ece,
    }


def run_sst2(
    config: Sst2RunConfig,
    output: Path,
    *,
    data_dir: Path,
    cache_dir: Path,
    resume: bool = False,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    reporter.stage("data", total=None)
    texts, labels, test_texts, test_labels, unlabeled = load_sst2(
        data_dir, config.train_size, config.seed, config.unlabeled_size
    )
    transfer_texts = augment(texts, config.transfer_size, seed=config.seed) + unlabeled
    tokenizer = hf.load_tokenizer(config.teacher, cache_dir)
    pad = tokenizer.pad_token_id or 0

    def bert_data(rows: list[str], row_labels: torch.Tensor | None) -> TextDataset:
        return TextDataset(tokenize(tokenizer, rows, config.max_length), row_labels, pad_id=pad, token_types=True)

    labeled = bert_data(texts, labels)
    transfer = bert_data(transfer_texts, torch.full((len(transfer_texts),), IGNORE))
    test = bert_data(test_texts, test_labels)
    kd_data = concat_text(labeled, transfer)
    reporter.end()

    teacher, teacher_dir, teacher_info = fine_tune_teacher(config, tokenizer, labeled, test, cache_dir, reporter)
    live = LocalTeacher(teacher, 2)
    cache = build_cache(
        live,
        kd_data,
        output / "cache" / "teacher",
        teacher_id=teacher_dir.name,
        data_id=kd_data.fingerprint(),
        batch_size=128,
        reporter=reporter,
    )
    soft = cache.at_temperature(config.loss.temperature)
    teacher_logits = ev.teacher_logprobs(live, test, 256)
    students: dict[str, dict[str, Any]] = {}
    models: dict[str, nn.Module] = {}

    def transformer_save(model: nn.Module, directory: Path) -> None:
        model.save_pretrained(directory)  # type: ignore[operator]
        tokenizer.save_pretrained(directory)

    def transformer_load(directory: Path) -> nn.Module:
        return hf.load_classifier(directory, 2)

    pretrained = hf.load_classifier(config.teacher, 2, cache_dir)  # the pretrained MiniLM, never the fine-tuned one
    choices = [("transformer", config.student_layers)]
    if config.ablation_layers:
        choices.append(("transformer-ablation", config.ablation_layers))
    for kind, layers in choices:
        num = None if layers else config.student_num_layers
        runs = [("distilled", kd_data, soft)] + ([("alone", labeled, None)] if kind == "transformer" else [])
        for mode, data, source in runs:
            name = f"{kind}-{mode}"
            base, derivation = derive(pretrained, layers=layers, num_layers=num)  # the same weights for both runs
            if config.freeze_embeddings:
                freeze_word_embeddings(base)
            model, history, seconds = _train_student(
                name,
                base,
                data,
                config.student_train.model_copy(update={"seed": config.seed}),
                output,
                teacher=source,
                loss=config.loss,
                test=test,
                resume=resume,
                reporter=reporter,
                save=transformer_save,
                load=transformer_load,
            )
            models[name] = model
            students[name] = {
                "kind": "transformer",
                "layers": derivation.layers,
                "params": derivation.student_params,
                "history": history,
                "train_seconds": seconds,
                **_scores(model, test, teacher_logits),
            }

    if config.bilstm:
        vocab = WordVocab.build(texts + transfer_texts)
        word_kd = TextDataset(vocab.encode(texts + transfer_texts, config.max_length), kd_data.labels)
        word_labeled = TextDataset(vocab.encode(texts, config.max_length), labels)
        word_test = TextDataset(vocab.encode(test_texts, config.max_length), test_labels)
        for mode, data, source in (("distilled", word_kd, soft), ("alone", word_labeled, None)):
            torch.manual_seed(config.seed + 11)
            model = BiLSTMClassifier(len(vocab), 2)
            name = f"bilstm-{mode}"
            model, history, seconds = _train_student(
                name,
                model,
                data,
                config.bilstm_train.model_copy(update={"seed": config.seed}),
                output,
                teacher=source,
                loss=config.loss,
                test=word_test,
                resume=resume,
                reporter=reporter,
                save=lambda m, d: m.save(d, vocab),
                load=lambda d: BiLSTMClassifier.load(d)[0],
            )
            models[name] = model
            students[name] = {
                "kind": "bilstm",
                "params": count_parameters(model),
                "history": history,
                "train_seconds": seconds,
                **_scores(model, word_test, teacher_logits),
            }

    reporter.stage("speed", total=None)
    rows = torch.arange(min(128, len(test)))
    speed_models = {"teacher": teacher, "transformer-distilled": models["transformer-distilled"]}
    other_inputs = {}
    if config.bilstm:
        speed_models["bilstm-distilled"] = models["bilstm-distilled"]
        other_inputs["bilstm-distilled"] = (word_test.batch(rows[:1])["inputs"], word_test.batch(rows)["inputs"])
    speed = ev.measure_speed(
        speed_models,
        test.batch(rows[:1])["inputs"],
        test.batch(rows)["inputs"],
        rounds=5,
        min_seconds=0.2,
        inputs=other_inputs,
    )
    reporter.end()
    teacher_speed = speed.pop("teacher")
    for name, timed in speed.items():
        students[name].update(
            latency_ms=timed.latency_ms,
            throughput=timed.throughput,
            speedup=timed.throughput / teacher_speed.throughput,
            latency_speedup=teacher_speed.latency_ms / timed.latency_ms,
        )
    teacher_accuracy = ev.accuracy(teacher_logits, test_labels)
    for entry in students.values():
        entry["retention"] = entry["accuracy"] / teacher_accuracy
    return {
        "recipe": "sst2",
        "description": (
            f"SST-2: {len(labeled)} labeled training phrases; a transfer set labeled by the teacher of "
            f"{len(transfer) - len(unlabeled)} augmented sentences and {len(unlabeled)} other training phrases "
            f"without their labels; {len(test)} test sentences; teacher {config.teacher} fine-tuned by the recipe"
        ),
        "teacher": {
            "name": config.teacher,
            "accuracy": teacher_accuracy,
            "params": count_parameters(teacher),
            "ece": ev.calibration(teacher_logits, test_labels).ece,
            "latency_ms": teacher_speed.latency_ms,
            "throughput": teacher_speed.throughput,
            "fine_tune_seconds": teacher_info.get("seconds"),
            "history": teacher_info.get("history"),
            "path": str(teacher_dir),
        },
        "students": students,
        "loss": config.loss.model_dump(),
        "seconds": time.perf_counter() - started,
    }
