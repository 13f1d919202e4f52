"""Sentence embeddings: all-MiniLM-L6-v2 distilled into students derived from its own layers, scored on STS-B.

Students of 3 and 1 layers (and, for the ablation, other 3-layer choices and a random initialisation) are derived
from the teacher (DistilBERT initialisation: the kept layers' weights), then trained on unlabeled sentences to
reproduce the teacher's sentence embedding (cosine term) and, layer by layer, its hidden states (MSE terms: student
layer i against teacher layer (i + 1) L / n - 1, TinyBERT's uniform mapping). Each model is scored by the Spearman
correlation between the cosine similarity of its embeddings and the gold scores of the STS-B pairs in
`stsb/test.tsv`, and its CPU encoding speed is measured side by side with the teacher's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field
from torch import nn

from distill import evaluate, hf, plots
from distill.config import Depth, FeatureLoss, Length, LossConfig, Rows, TextStudentsConfig, TrainConfig, Weight
from distill.data import TextDataset, read_lines, read_table, tokenize
from distill.errors import DataError
from distill.features import FeatureDistiller, hook_names
from distill.models import count_parameters
from distill.recipes.recipe import Recipe
from distill.recipes.sst2 import GLUE_SST2, reference_data
from distill.report import Report, Table, count, learning_curves, num, pct, ratio, seconds
from distill.sources import HubId, hub_columns
from distill.stages import RunContext, train_or_resume
from distill.students import derive, uniform_layers
from distill.teachers.cached import FeatureTable
from distill.teachers.local import LocalTeacher
from distill.text_models import SentenceEncoder
from distill.train import train


class StsbConfig(TextStudentsConfig):
    """`distill run --recipe stsb`: sentence-embedding students derived from the teacher, scored on STS-B."""

    recipe: Literal["stsb"] = "stsb"
    sentences: Path | None = Field(None, description="unlabeled sentences, one per line (default: the data sets')")
    sample_size: Rows = Field(10_000, description="training sentences drawn from them; 0 = all")
    max_length: Annotated[Length, Field(ge=8, le=512)] = Field(
        32, description="training tokens per sentence (scoring uses up to 128)"
    )
    students: list[Depth] = Field(
        default_factory=lambda: [3, 1], max_length=64, description="layer counts of the derived students"
    )
    ablation: bool = Field(True, description="also train other 3-layer choices and a random initialisation")
    embedding_weight: Weight = Field(1.0, description="weight of the sentence-embedding cosine term")
    hidden_weight: Weight = Field(1.0, description="weight of each hidden-state MSE term")
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(
            epochs=1, batch_size=64, lr=5e-4, weight_decay=0.01, schedule="cosine", warmup=0.05
        )
    )


GLUE_STSB = {"train": HubId("nyu-mll/glue", "stsb", "train"), "test": HubId("nyu-mll/glue", "stsb", "validation")}


def training_sentences(config: StsbConfig, data_dir: Path | None) -> list[str]:
    """Unlabeled sentences: the given file, or the sentences of STS-B train, AG News dev and SST-2 train (never a test
    split), de-duplicated, `sample_size` of them drawn with the run's seed. With `data_dir` None, from GLUE on the
    Hugging Face Hub (online only): STS-B's and SST-2's train splits (no AG News)."""
    if config.sentences is not None:
        pool = read_lines(config.sentences)
    elif data_dir is None:
        pairs = hub_columns(GLUE_STSB["train"], ["sentence1", "sentence2"])
        sst2 = hub_columns(GLUE_SST2["train"], ["sentence"])["sentence"]
        pool = [s for s in pairs["sentence1"] + pairs["sentence2"] if isinstance(s, str)]
        pool += [s for s in sst2 if isinstance(s, str) and len(s.split()) >= 6]
    else:
        pool = _folder_sentences(data_dir)
    unique = list(dict.fromkeys(s.strip() for s in pool if s.strip()))
    random.Random(config.seed).shuffle(unique)
    return unique[: config.sample_size] if config.sample_size else unique


def _folder_sentences(data_dir: Path) -> list[str]:
    pool: list[str] = []
    stsb_train = data_dir / "stsb" / "train.tsv"
    if stsb_train.is_file():
        names = ["index", "genre", "filename", "year", "old_index", "source1", "source2", "sentence1", "sentence2",
                 "score"]  # fmt: skip
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
    return pool


def stsb_pairs(data_dir: Path | None) -> tuple[list[str], list[str], torch.Tensor]:
    """The scored pairs: the folder's stsb/test.tsv (GLUE's dev split), or with None that split from the Hub."""
    if data_dir is None:
        table = hub_columns(GLUE_STSB["test"], ["sentence1", "sentence2", "label"])
        texts = table["sentence1"] + table["sentence2"]
        if not all(isinstance(s, str) for s in texts) or not all(isinstance(v, float | int) for v in table["label"]):
            raise DataError(f"{GLUE_STSB['test']}: sentences must be strings and labels numbers")
        return table["sentence1"], table["sentence2"], torch.tensor(table["label"], dtype=torch.float32)
    table = read_table(data_dir / "stsb" / "test.tsv", ["sentence1", "sentence2", "score"])
    try:
        scores = torch.tensor([float(s) for s in table["score"]])
    except ValueError:
        raise DataError(f"{data_dir / 'stsb' / 'test.tsv'}: the score column must be numbers") from None
    return table["sentence1"], table["sentence2"], scores


@torch.no_grad()
def encode(model: nn.Module, data: TextDataset, batch_size: int = 128) -> torch.Tensor:
    return evaluate.predict(model, data, batch_size)  # (N, D): a sentence encoder's output are its embeddings


def spearman_on(model: nn.Module, first: TextDataset, second: TextDataset, gold: torch.Tensor) -> float:
    a, b = encode(model, first), encode(model, second)  # (N, D) each
    return evaluate.spearman(torch.nn.functional.cosine_similarity(a, b, dim=-1), gold)


def feature_pairs(layers: list[int], teacher_layers: int, config: StsbConfig) -> list[FeatureLoss]:
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


def student_plan(config: StsbConfig, total: int) -> list[dict[str, Any]]:
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


@dataclass
class Setting:
    """What every student of a run shares: the teacher, its tokenizer, the training sentences, the teacher's
    features over them (computed once, on first use) and the STS-B test pairs (up to 128 tokens each, whatever
    length the students trained on)."""

    teacher: SentenceEncoder
    tokenizer: Any
    data: TextDataset
    first: TextDataset
    second: TextDataset
    gold: torch.Tensor
    hooks: list[str]
    table: FeatureTable | None = None

    def features(self, context: RunContext) -> FeatureTable:
        if self.table is None:
            live = LocalTeacher(self.teacher, 0, capture=self.hooks, has_logits=False)
            self.table = FeatureTable(live, self.data, batch_size=128, reporter=context.reporter)
        return self.table

    def spearman(self, model: nn.Module) -> float:
        return spearman_on(model, self.first, self.second, self.gold)


def _setting(config: StsbConfig, context: RunContext) -> Setting:
    datasets = reference_data(config, context, "stsb")
    tokenizer = hf.load_tokenizer(config.teacher, context.store)
    teacher = SentenceEncoder(hf.load_encoder(config.teacher, context.store)).eval()
    pad = tokenizer.pad_token_id or 0
    first, second, gold = stsb_pairs(datasets)
    data = TextDataset(tokenize(tokenizer, training_sentences(config, datasets), config.max_length), pad_id=pad)
    total = int(teacher.config.num_hidden_layers)
    every_pair = [p for entry in student_plan(config, total) for p in feature_pairs(entry["layers"], total, config)]
    return Setting(
        teacher, tokenizer, data, TextDataset(tokenize(tokenizer, first, 128), pad_id=pad),
        TextDataset(tokenize(tokenizer, second, 128), pad_id=pad), gold, hook_names(teacher, every_pair, "teacher"),
    )  # fmt: skip


def _student(entry: dict[str, Any], setting: Setting, config: StsbConfig, context: RunContext) -> dict[str, Any]:
    """One derived student trained on the teacher's features (or loaded when a resumed run finished it), scored."""
    directory = context.output / "students" / entry["name"].replace(" ", "-")
    total = int(setting.teacher.config.num_hidden_layers)
    transformer, derivation = derive(setting.teacher.transformer, layers=entry["layers"], init=entry["init"])

    def fit() -> tuple[nn.Module, dict[str, Any]]:
        student = SentenceEncoder(transformer)
        pairs = feature_pairs(derivation.layers, total, config)
        example = setting.data.batch(torch.arange(min(4, len(setting.data))))["inputs"]
        result = train(
            student,
            setting.data,
            config.train.model_copy(update={"seed": config.seed}),
            teacher=setting.features(context),
            loss=LossConfig(logits=False, features=pairs),
            features=FeatureDistiller.build(pairs, student, setting.teacher, example),
            checkpoint_dir=context.output / "checkpoints" / directory.name,
            resume=context.resume,
            reporter=context.reporter,
            name=entry["name"],
        )
        return student, {"history": result.history, "seconds": result.seconds}

    student, record = train_or_resume(
        directory, resume=context.resume, train=fit, save=lambda m, d: m.save(d, setting.tokenizer),  # type: ignore[operator]
        load=lambda d: SentenceEncoder(hf.load_encoder(d)),
    )  # fmt: skip
    score = setting.spearman(student.eval())
    return {
        "name": entry["name"], "layers": derivation.layers, "init": entry["init"], "main": entry["main"],
        "spearman": score, "params": derivation.student_params, "compression": derivation.compression,
        "path": str(directory), "history": record["history"], "model": student,
    }  # fmt: skip


def _timed(setting: Setting, results: list[dict[str, Any]], context: RunContext) -> dict[str, Any]:
    """The teacher and the main students encoding the same sentences, side by side; their speed figures."""
    context.reporter.stage("speed", total=None)
    batch = setting.first.batch(torch.arange(min(128, len(setting.first))))["inputs"]
    single = setting.first.batch(torch.arange(1))["inputs"]
    timed = {"teacher": setting.teacher, **{r["name"]: r["model"] for r in results if r["main"]}}
    speed = evaluate.measure_speed(timed, single, batch, rounds=5, min_seconds=0.2)
    context.reporter.end()
    for r in results:
        if r["name"] in speed:
            r.update(latency_ms=speed[r["name"]].latency_ms, throughput=speed[r["name"]].throughput)
            r["speedup"] = speed[r["name"]].throughput / speed["teacher"].throughput
    return speed


def run(config: StsbConfig, context: RunContext) -> dict[str, Any]:
    """Every student of the plan trained and scored against the teacher; the metrics."""
    context.reporter.stage("data", total=None)
    setting = _setting(config, context)
    context.reporter.end()
    context.reporter.stage("teacher on STS-B", total=None)
    teacher_score = setting.spearman(setting.teacher)
    context.reporter.end()
    total = int(setting.teacher.config.num_hidden_layers)
    results = [_student(entry, setting, config, context) for entry in student_plan(config, total)]
    speed = _timed(setting, results, context)
    for r in results:
        r["retention"] = r["spearman"] / teacher_score
        del r["model"]
    teacher = {"name": config.teacher, "spearman": teacher_score, "params": count_parameters(setting.teacher),
               "layers": total, "latency_ms": speed["teacher"].latency_ms, "throughput": speed["teacher"].throughput}  # fmt: skip
    return {
        "recipe": "stsb",
        "description": (
            f"STS-B test ({len(setting.gold)} pairs, Spearman of cosine similarity); students trained on "
            f"{len(setting.data)} unlabeled sentences; teacher {config.teacher}"
        ),
        "teacher": teacher,
        "students": results,
        "train_sentences": len(setting.data),
        "embedding_weight": config.embedding_weight,
        "hidden_weight": config.hidden_weight,
    }


HEADER = ["model", "teacher layers kept", "init", "STS-B Spearman", "retention", "parameters", "compression",
          "sentences/s (batch 128)", "latency ms (batch 1)"]  # fmt: skip


def _rows(teacher: dict[str, Any], students: list[dict[str, Any]]) -> list[list[str]]:
    rows = [
        [
            "teacher",
            f"all {teacher['layers']}",
            "pretrained",
            num(teacher["spearman"], 4),
            "100.0 %",
            count(teacher["params"]),
            "1.0x",
            count(round(teacher["throughput"])),
            num(teacher["latency_ms"], 1),
        ]
    ]
    for s in students:
        rows.append(
            [
                s["name"],
                ", ".join(map(str, s["layers"])),
                s["init"],
                num(s["spearman"], 4),
                pct(s["retention"]),
                count(s["params"]),
                ratio(s["compression"]),
                count(round(s["throughput"])) if s.get("throughput") else "–",
                num(s.get("latency_ms"), 1) if s.get("latency_ms") else "–",
            ]
        )
    return rows


def _summary(teacher: dict[str, Any], students: list[dict[str, Any]]) -> list[str]:
    main = [s for s in students if s["main"]]
    summary = [
        f"The {s['name']} student keeps **{pct(s['retention'])}** of the teacher's Spearman "
        f"({num(s['spearman'], 4)} vs {num(teacher['spearman'], 4)}) and encodes **{ratio(s.get('speedup'))}** as many "
        "sentences per second on this CPU."
        for s in main
    ]
    three = [s for s in students if len(s["layers"]) == 3 and s["init"] == "teacher"]
    if len(three) > 1:
        best = max(three, key=lambda s: s["spearman"])
        worst = min(three, key=lambda s: s["spearman"])
        summary.append(
            f"Which layers a 3-layer student keeps matters: layers {', '.join(map(str, best['layers']))} reach "
            f"{pct(best['retention'])} retention, layers {', '.join(map(str, worst['layers']))} "
            f"{pct(worst['retention'])}, from the same teacher with the same training."
        )
    for s in students:
        if s["init"] == "random":
            summary.append(
                f"Without the teacher's weights (random initialisation, same training) a {len(s['layers'])}-layer "
                f"student reaches {pct(s['retention'])}: the DistilBERT initialisation does much of the work."
            )
    return summary


def report(metrics: dict[str, Any]) -> Report:
    """The STS-B report: teacher vs students, what the kept layers and the initialisation do, the speed."""
    teacher, students = metrics["teacher"], metrics["students"]
    notes = [
        "Loss per student: cosine distance between student and teacher sentence embeddings (weight "
        f"{metrics.get('embedding_weight', 1.0)}) plus, per student layer i, MSE to teacher layer (i + 1) L / n - 1 "
        f"(weight {metrics.get('hidden_weight', 1.0)}); terms per epoch are in metrics.json.",
        "Speed: teacher and students timed side by side on the same STS-B sentences (interleaved rounds, median).",
        f"Whole run: {seconds(metrics.get('seconds'))}.",
    ]
    return Report(
        title="distill report: stsb",
        description=metrics["description"],
        summary=_summary(teacher, students),
        tables=[Table("Teacher vs students (STS-B test)", HEADER, _rows(teacher, students))],
        notes=notes,
        images={
            **learning_curves({s["name"]: s["history"] for s in students}, "loss"),
            "accuracy_vs_params.png": plots.accuracy_vs_size(
                [{"name": "teacher", "params": teacher["params"], "accuracy": teacher["spearman"]}]
                + [{"name": s["name"], "params": s["params"], "accuracy": s["spearman"]} for s in students],
                ylabel="STS-B Spearman x 100",
            ),
        },
    )


RECIPE = Recipe(
    name="stsb",
    summary="sentence embeddings: all-MiniLM-L6-v2 distilled into students derived from its layers, scored on STS-B",
    config=StsbConfig,
    run=run,
    report=report,
    flags={
        "teacher": "teacher",
        "sample_size": "sample_size",
        "data_dir": "data_dir",
        "epochs": "train.epochs",
        "seed": "seed",
    },  # fmt: skip
    needs_datasets=lambda config: True,
)
