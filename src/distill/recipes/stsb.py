"""Sentence embeddings: all-MiniLM-L6-v2 distilled into students derived from its own layers, scored on STS-B.

Students of 3 and 1 layers (and, for the ablation, other 3-layer choices and a random initialisation) are derived
from the teacher (DistilBERT initialisation: the kept layers' weights), then trained on unlabeled sentences to
reproduce the teacher's sentence embedding (cosine term) and, layer by layer, its hidden states (MSE terms: student
layer i against teacher layer (i + 1) L / n - 1, TinyBERT's uniform mapping). Each model is scored by the Spearman
correlation between the cosine similarity of its embeddings and the gold scores of the STS-B pairs in
`stsb/test.tsv`, and its CPU encoding speed is measured side by side with the teacher's.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill import evaluate as ev
from distill.config import FeatureLoss, LossConfig, StsbRunConfig
from distill.data import TextDataset, read_json, read_lines, read_table, tokenize
from distill.errors import DataError
from distill.features import FeatureDistiller, hook_names
from distill.models import count_parameters
from distill.progress import NULL, Reporter
from distill.students import derive, uniform_layers
from distill.teachers import hf
from distill.teachers.cached import FeatureTable
from distill.teachers.local import LocalTeacher
from distill.text_models import SentenceEncoder
from distill.train import train


def training_sentences(config: StsbRunConfig, data_dir: Path) -> list[str]:
    """Unlabeled sentences: the given file, or the sentences of STS-B train, AG News dev and SST-2 train (never a test
    split), de-duplicated, `sample_size` of them drawn with the run's seed."""
    if config.sentences is not None:
        pool = read_lines(config.sentences)
    else:
        pool = []
        stsb_train = data_dir / "stsb" / "train.tsv"
        if stsb_train.is_file():
            names = [
                "index",
                "genre",
                "filename",
                "year",
                "old_index",
                "source1",
                "source2",
                "sentence1",
                "sentence2",
                "score",
            ]
            table = read_table(stsb_train, ["sentence1", "sentence2"], header=False, names=names)
            pool += table["sentence1"] + table["sentence2"]
        agnews = data_dir / "agnews" / "dev.tsv"
        if agnews.is_file():
            pool += read_table(agnews, ["text"], header=False, names=["text", "label"])["text"]
        sst2 = data_dir / "sst2" / "train.tsv"
        if sst2.is_file():
            pool += [s for s in read_table(sst2, ["sentence"])["sentence"] if len(s.split()) >= 6]
        if not pool:
            raise DataError(f"no sentences found under {data_dir} (stsb/, agnews/, sst2/); pass --set sentences=FILE")
    unique = list(dict.fromkeys(s.strip() for s in pool if s.strip()))
    random.Random(config.seed).shuffle(unique)
    return unique[: config.sample_size] if config.sample_size else unique


def stsb_pairs(data_dir: Path) -> tuple[list[str], list[str], torch.Tensor]:
    table = read_table(data_dir / "stsb" / "test.tsv", ["sentence1", "sentence2", "score"])
    try:
        scores = torch.tensor([float(s) for s in table["score"]])
    except ValueError:
        raise DataError(f"{data_dir / 'stsb' / 'test.tsv'}: the score column must be numbers") from None
    return table["sentence1"], table["sentence2"], scores


@torch.no_grad()
def encode(model: nn.Module, data: TextDataset, batch_size: int = 128) -> torch.Tensor:
    return ev.predict(model, data, batch_size)  # (N, D): a sentence encoder's output are its embeddings


def spearman_on(model: nn.Module, first: TextDataset, second: TextDataset, gold: torch.Tensor) -> float:
    a, b = encode(model, first), encode(model, second)  # (N, D) each
    return ev.spearman(torch.nn.functional.cosine_similarity(a, b, dim=-1), gold)


def feature_pairs(layers: list[int], teacher_layers: int, config: StsbRunConfig) -> list[FeatureLoss]:
    pairs = [FeatureLoss(kind="cosine", student="pool", teacher="pool", weight=config.embedding_weight)]
    if config.hidden_weight > 0:
        n = len(layers)
        for i in range(n):
            target = (i + 1) * teacher_layers // n - 1
            pairs.append(
                FeatureLoss(
                    kind="hidden_mse",
                    student=f"transformer.encoder.layer.{i}",
                    teacher=f"transformer.encoder.layer.{target}",
                    weight=config.hidden_weight,
                )
            )
    return pairs


def student_plan(config: StsbRunConfig, total: int) -> list[dict[str, Any]]:
    """The students to train: the requested layer counts (layers spread from first to last), then the ablation of
    other 3-layer choices and of a random initialisation."""
    plan = [
        {"name": f"{n}-layer", "layers": uniform_layers(total, n), "init": "teacher", "main": True}
        for n in config.students
    ]
    if config.ablation and total >= 6:
        plan += [
            {"name": "3-layer every other", "layers": [0, 2, 4], "init": "teacher", "main": False},
            {"name": "3-layer top", "layers": [total - 3, total - 2, total - 1], "init": "teacher", "main": False},
            {"name": "3-layer bottom", "layers": [0, 1, 2], "init": "teacher", "main": False},
            {"name": "3-layer random init", "layers": uniform_layers(total, 3), "init": "random", "main": False},
        ]
    return plan


def run_stsb(
    config: StsbRunConfig,
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
    tokenizer = hf.load_tokenizer(config.teacher, cache_dir)
    teacher = SentenceEncoder(hf.load_encoder(config.teacher, cache_dir)).eval()
    sentences = training_sentences(config, data_dir)
    first, second, gold = stsb_pairs(data_dir)
    data = TextDataset(tokenize(tokenizer, sentences, config.max_length), pad_id=tokenizer.pad_token_id or 0)
    # Scored without truncation (up to 128 tokens), whatever length the students trained on.
    test_a = TextDataset(tokenize(tokenizer, first, 128), pad_id=tokenizer.pad_token_id or 0)
    test_b = TextDataset(tokenize(tokenizer, second, 128), pad_id=tokenizer.pad_token_id or 0)
    reporter.end()

    reporter.stage("teacher on STS-B", total=None)
    teacher_score = spearman_on(teacher, test_a, test_b, gold)
    reporter.end()
    total_layers = int(teacher.config.num_hidden_layers)
    example = data.batch(torch.arange(min(4, len(data))))["inputs"]
    plan = student_plan(config, total_layers)
    # The teacher runs once over the training sentences; every student reads its features from the table.
    every_pair = [p for entry in plan for p in feature_pairs(entry["layers"], total_layers, config)]
    teacher_hooks = hook_names(teacher, every_pair, "teacher")
    table: FeatureTable | None = None
    results: list[dict[str, Any]] = []
    trained: dict[str, nn.Module] = {}
    for entry in plan:
        directory = output / "students" / entry["name"].replace(" ", "-")
        done = directory / "history.json"
        transformer, derivation = derive(teacher.transformer, layers=entry["layers"], init=entry["init"])
        student = SentenceEncoder(transformer)
        if resume and done.exists():
            student = SentenceEncoder(hf.load_encoder(directory))
            history = read_json(done)
        else:
            pairs = feature_pairs(derivation.layers, total_layers, config)
            features = FeatureDistiller.build(pairs, student, teacher, example)
            if table is None:
                live = LocalTeacher(teacher, 0, capture=teacher_hooks, has_logits=False)
                table = FeatureTable(live, data, batch_size=128, reporter=reporter)
            result = train(
                student,
                data,
                config.train.model_copy(update={"seed": config.seed}),
                teacher=table,
                loss=LossConfig(logits=False, features=pairs),
                features=features,
                checkpoint_dir=output / "checkpoints" / directory.name,
                resume=resume,
                reporter=reporter,
                name=entry["name"],
            )
            history = result.history
            student.save(directory, tokenizer)
            done.write_text(json.dumps(history))
        score = spearman_on(student, test_a, test_b, gold)
        trained[entry["name"]] = student.eval()
        results.append(
            {
                "name": entry["name"],
                "layers": derivation.layers,
                "init": entry["init"],
                "main": entry["main"],
                "spearman": score,
                "retention": score / teacher_score,
                "params": derivation.student_params,
                "compression": derivation.compression,
                "path": str(directory),
                "history": history,
            }
        )

    reporter.stage("speed", total=None)
    batch_rows = test_a.batch(torch.arange(min(128, len(test_a))))["inputs"]
    single = test_a.batch(torch.arange(1))["inputs"]
    speed_models = {"teacher": teacher, **{r["name"]: trained[r["name"]] for r in results if r["main"]}}
    speed = ev.measure_speed(speed_models, single, batch_rows, rounds=5, min_seconds=0.2)
    reporter.end()
    for r in results:
        if r["name"] in speed:
            r["latency_ms"] = speed[r["name"]].latency_ms
            r["throughput"] = speed[r["name"]].throughput
            r["speedup"] = speed[r["name"]].throughput / speed["teacher"].throughput
    metrics = {
        "recipe": "stsb",
        "description": (
            f"STS-B test ({len(gold)} pairs, Spearman of cosine similarity); students trained on "
            f"{len(data)} unlabeled sentences; teacher {config.teacher}"
        ),
        "teacher": {
            "name": config.teacher,
            "spearman": teacher_score,
            "params": count_parameters(teacher),
            "layers": total_layers,
            "latency_ms": speed["teacher"].latency_ms,
            "throughput": speed["teacher"].throughput,
        },
        "students": results,
        "train_sentences": len(data),
        "seconds": time.perf_counter() - started,
    }
    return metrics
