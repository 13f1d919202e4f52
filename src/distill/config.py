"""Configuration: pydantic models for every run kind, loaded from YAML plus `key=value` overrides.

The CLI builds these from its options, `distill train --config FILE.yaml` reads them from a file, and the service
accepts them as job payloads, so a config never names an import path or anything else that would run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from distill.errors import DistillError

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd"]

# ----------------------------------------------------------------------------------------------------------------
# Bounds: what every config accepts, in one place (the CLI, config files and the service's jobs all validate here).
# Generous for real use on a big machine, never absurd. A field that needs a tighter range narrows one of these
# types with `Annotated[Type, Field(...)]` (a bound given in `= Field(default, ...)` would be overridden by the type's).
# ----------------------------------------------------------------------------------------------------------------

MAX_SEED = 2**32 - 1  # what numpy's and torch's seeding accept
MAX_EPOCHS = 100_000
MAX_ROWS = 100_000_000  # rows, examples, sentences, problems of a data set
MAX_BATCH = 1_048_576
MAX_WIDTH = 65_536
MAX_DEPTH = 256
MAX_HEADS = 1_024
MAX_LENGTH = 1_048_576  # tokens
MAX_TOP_K = 65_536
MAX_CLASSES = 100_000
MAX_VOCAB = 1_048_576
MAX_TEMPERATURE = 1_000.0
MAX_STEPS = 1_000_000_000
MAX_WORKERS = 1_024  # threads, requests in flight
MAX_HIDDEN_PARAMETERS = 2**28  # a built-in MLP/CNN's hidden layers (about 1 GiB of float32 weights)
MAX_MODEL_PARAMETERS = 2**30  # a whole built-in MLP/CNN, its input and output layers included (data-dependent)
MAX_GPT2_PARAMETERS = 2**32  # a GPT-2 built by the lm and reasoning recipes

Seed = Annotated[int, Field(ge=0, le=MAX_SEED)]
Epochs = Annotated[int, Field(ge=1, le=MAX_EPOCHS)]
Rows = Annotated[int, Field(ge=0, le=MAX_ROWS)]
BatchSize = Annotated[int, Field(ge=1, le=MAX_BATCH)]
Width = Annotated[int, Field(ge=1, le=MAX_WIDTH)]
Depth = Annotated[int, Field(ge=1, le=MAX_DEPTH)]
LayerIndex = Annotated[int, Field(ge=0, lt=MAX_DEPTH)]
Heads = Annotated[int, Field(ge=1, le=MAX_HEADS)]
Length = Annotated[int, Field(ge=1, le=MAX_LENGTH)]
TopK = Annotated[int, Field(ge=1, le=MAX_TOP_K)]
Classes = Annotated[int, Field(ge=2, le=MAX_CLASSES)]
Vocab = Annotated[int, Field(ge=300, le=MAX_VOCAB)]
Temperature = Annotated[float, Field(gt=0, le=MAX_TEMPERATURE)]
SamplingTemperature = Annotated[float, Field(ge=0, le=2)]  # 0 = greedy
Steps = Annotated[int, Field(ge=0, le=MAX_STEPS)]
Workers = Annotated[int, Field(ge=1, le=MAX_WORKERS)]
Weight = Annotated[float, Field(ge=0)]  # finite: Strict refuses inf and nan everywhere
Share = Annotated[float, Field(ge=0, le=1)]

KERNEL = {"mlp": 1, "cnn1d": 3, "cnn2d": 9}  # weights per (input unit, output unit) pair of a hidden layer


def hidden_parameters(family: str, width: int, depth: int) -> int:
    """About how many weights the hidden layers of a built-in model hold: kernel x width² x depth."""
    return KERNEL[family] * width * width * depth


def check_hidden_size(family: str, width: int, depth: int) -> None:
    """A ValueError (a validation error in a config) when the hidden layers would exceed MAX_HIDDEN_PARAMETERS."""
    estimate = hidden_parameters(family, width, depth)
    if estimate > MAX_HIDDEN_PARAMETERS:
        raise ValueError(
            f"a {family} of width {width:,} and depth {depth} would hold about {estimate:,} parameters in its hidden "
            f"layers (kernel x width² x depth), over the limit of {MAX_HIDDEN_PARAMETERS:,}; choose a smaller width "
            "or depth"
        )


GPT2_KEYS = {"layers": MAX_DEPTH, "width": MAX_WIDTH, "heads": MAX_HEADS}


def _gpt2_size(size: dict[str, int]) -> dict[str, int]:
    """A GPT-2 size (layers, width, heads): each in 1..its bound and the width divisible by the heads."""
    if set(size) != set(GPT2_KEYS):
        raise ValueError(f"a GPT-2 size has exactly the keys layers, width and heads, not {', '.join(sorted(size))}")
    for key, bound in GPT2_KEYS.items():
        if not 1 <= size[key] <= bound:
            raise ValueError(f"{key} must be between 1 and {bound:,}, not {size[key]:,}")
    if size["width"] % size["heads"]:
        raise ValueError(f"width {size['width']} is not divisible by heads {size['heads']}")
    return size


GPT2Size = Annotated[dict[str, int], AfterValidator(_gpt2_size)]


def check_gpt2_parameters(size: dict[str, int], vocab_size: int) -> None:
    """A ValueError when a GPT-2 of `size` over `vocab_size` tokens would exceed MAX_GPT2_PARAMETERS."""
    estimate = 12 * size["layers"] * size["width"] ** 2 + vocab_size * size["width"]
    if estimate > MAX_GPT2_PARAMETERS:
        raise ValueError(
            f"a GPT-2 of {size['layers']} layers, {size['width']:,} wide, over {vocab_size:,} tokens would "
            f"hold about {estimate:,} parameters (12 x layers x width² + vocabulary x width), over the limit of "
            f"{MAX_GPT2_PARAMETERS:,}"
        )


class Strict(BaseModel):
    """Base for every config: unknown keys are errors, so a typo never silently falls back to a default; no float
    takes inf or nan."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)


class FeatureLoss(Strict):
    """One feature-distillation term between a student module and a teacher module (named as in named_modules())."""

    kind: Literal["hidden_mse", "cosine", "attention_kl"]
    student: str = Field(max_length=1_000, description="module in the student, e.g. encoder.layer.1")
    teacher: str = Field(max_length=1_000, description="module in the teacher, e.g. encoder.layer.3")
    weight: Weight = 1.0
    heads: Heads = Field(12, description="relation heads of attention_kl (both widths must divide by it)")


class LossConfig(Strict):
    """Soft-target distillation: alpha * T^2 * D(p_T || q_T) + (1 - alpha) * CE(labels), plus feature terms."""

    divergence: Divergence = "forward_kl"
    temperature: Temperature = Field(2.0, description="softening temperature T for teacher and student")
    alpha: Share = Field(0.9, description="weight of the soft-target term; 1 - alpha on hard labels")
    beta: Share = Field(0.5, description="mixture weight of the generalised JSD (divergence=jsd)")
    features: list[FeatureLoss] = Field(
        default_factory=list, max_length=256, description="hidden-state / attention terms"
    )
    logits: bool = Field(True, description="distill the output distribution; false for encoders (features only)")
    chunk_size: Annotated[Length, Field(ge=0)] = Field(
        1024, description="tokens per chunk of a causal LM's loss; 0 = full logits"
    )
    lmbda: Share = Field(0.0, description="share of on-policy batches sampled from the student (GKD)")
    max_new_tokens: Length = Field(64, description="length of an on-policy sample")
    sample_temperature: Temperature = Field(1.0, description="temperature of on-policy sampling")


class TrainConfig(Strict):
    """The one training loop: AdamW, a learning-rate schedule, checkpoints."""

    epochs: Epochs = 20
    batch_size: BatchSize = 256
    lr: float = Field(3e-3, gt=0)
    weight_decay: Weight = 0.01
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup: Annotated[float, Field(ge=0, lt=1)] = Field(
        0.1, description="fraction of steps spent warming up (cosine, onecycle)"
    )
    grad_clip: float | None = Field(1.0, gt=0)
    seed: Seed = 0
    checkpoint_every: Steps = Field(100, description="steps between checkpoints; 0 = at epoch ends only")
    eval_every: Epochs = Field(1, description="epochs between evaluations")
    device: str = Field("cpu", max_length=64)
    strategy: Literal["ddp", "fsdp"] = Field(
        "ddp", description="with several processes (torchrun): replicate (ddp) or shard (fsdp) the student"
    )


class ModelSpec(Strict):
    """A built-in architecture, named by family (see `distill.models.FAMILIES`); its hidden layers hold at most
    MAX_HIDDEN_PARAMETERS weights (kernel x width² x depth)."""

    family: Literal["mlp", "cnn1d", "cnn2d"] = "mlp"
    width: Width = 256
    depth: Depth = Field(2, description="hidden layers (mlp) or convolution blocks (cnn)")
    dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0
    head: Annotated[Width, Field(ge=0)] = Field(0, description="hidden units of a CNN's fully-connected head; 0 = none")

    @model_validator(mode="after")
    def _bounded_size(self) -> ModelSpec:
        check_hidden_size(self.family, self.width, self.depth)
        return self


class ClassifyRunConfig(Strict):
    """`distill run --recipe mnist1d|digits`: teachers, a student alone, a student distilled, the report."""

    recipe: Literal["mnist1d", "digits"] = "mnist1d"
    teachers: Annotated[int, Field(ge=1, le=32)] = Field(1, description="teachers in the ensemble")
    ensemble: Literal["mean", "geometric"] = "mean"
    teacher: ModelSpec | None = Field(None, description="teacher architecture (recipe default if unset)")
    student: ModelSpec | None = Field(None, description="student architecture (recipe default if unset)")
    student_width: Width | None = Field(None, description="shortcut: the student's width")
    epochs: Epochs | None = Field(None, description="shortcut: epochs of the distilled student")
    teacher_epochs: Epochs | None = Field(None, description="shortcut: epochs of each teacher")
    transfer_size: Rows | None = Field(None, description="freshly generated inputs labeled by the teacher")
    loss: LossConfig = Field(default_factory=LossConfig, description="settings given here replace the recipe's")
    teacher_train: TrainConfig | None = None
    student_train: TrainConfig | None = None
    seed: Seed = 0
    train_size: Annotated[Rows, Field(ge=10)] | None = Field(
        None, description="labeled training examples (recipe default if unset)"
    )

    @field_validator("student_width")
    @classmethod
    def _bounded_width(cls, width: int | None, info: ValidationInfo) -> int | None:
        """The width shortcut with the student's depth (1 at least: the recipe's default depth is checked when the
        recipe applies the shortcut)."""
        spec = info.data.get("student") or ModelSpec(depth=1, width=1)
        if width is not None:
            check_hidden_size(spec.family, width, spec.depth)
        return width


class TextStudentsConfig(Strict):
    """Shared settings of the transformer recipes."""

    teacher: str = Field(
        "minilm-l6", max_length=1_000, description="minilm-l6 (the packaged all-MiniLM-L6-v2), a folder or a hub name"
    )
    data_dir: Path | None = Field(None, description="folder with sst2/, stsb/, agnews/ (default ../shared/data)")
    max_length: Annotated[Length, Field(ge=8, le=512)] = Field(
        64, description="tokens per text (longer texts are truncated)"
    )
    seed: Seed = 0


class StsbRunConfig(TextStudentsConfig):
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


class Sst2RunConfig(TextStudentsConfig):
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


class LMJobConfig(Strict):
    """`distill train-lm --config FILE.yaml`: a causal LM student distilled from a live teacher or a log-prob cache."""

    student: str = Field(
        max_length=1_000, description="the student: a causal LM folder (save_pretrained) or a hub name"
    )
    teacher: str | None = Field(None, max_length=1_000, description="a live teacher (same tokenizer); or give `cache`")
    cache: Path | None = Field(None, description="a teacher log-prob cache built by `distill cache build`")
    data: Path = Field(description="training JSONL: prompt/completion, messages, text or question/answer rows")
    eval_data: Path | None = Field(None, description="held-out JSONL for perplexity, agreement and KL")
    max_length: Annotated[Length, Field(ge=8)] = Field(512, description="tokens per example (longer ones are cut)")
    loss: LossConfig = Field(default_factory=lambda: LossConfig(temperature=1.0, alpha=0.5))
    train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(epochs=1, batch_size=8, lr=5e-5, schedule="cosine", checkpoint_every=200)
    )


class LMRunConfig(Strict):
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


class DataSpec(Strict):
    """A user's arrays: CSV/TSV with a header (features + a label column) or NPZ (features + labels arrays)."""

    train: Path
    test: Path | None = None
    transfer: Path | None = Field(None, description="unlabeled inputs for the teacher to label (label column optional)")
    label_column: str = Field("label", max_length=1_000)
    features_key: str = Field("x", max_length=1_000)
    labels_key: str = Field("y", max_length=1_000)
    num_classes: Classes | None = None
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(
        0.2, description="held out from train when no test file is given"
    )
    input_shape: list[Length] | None = Field(
        None, min_length=1, max_length=4, description="reshape flat features, e.g. [8, 8] for a 2-D CNN"
    )


class TrainJobConfig(Strict):
    """`distill train --config FILE.yaml`: train a built-in student, distilled from a saved teacher if one is given.

    Without `teacher` this trains a plain supervised model (which can then be the teacher of another run).
    """

    data: DataSpec
    student: ModelSpec = ModelSpec()
    teacher: list[Path] = Field(
        default_factory=list, max_length=32, description="saved model directories; several = ensemble"
    )
    ensemble: Literal["mean", "geometric"] = "mean"
    loss: LossConfig = LossConfig()
    train: TrainConfig = TrainConfig()
    compare_alone: bool = Field(True, description="also train the same student without a teacher, for the report")

    @model_validator(mode="before")
    @classmethod
    def _teacher_as_list(cls, values: Any) -> Any:
        if isinstance(values, dict) and "teacher" in values:
            teacher = values["teacher"]
            if teacher is None:
                values = {**values, "teacher": []}
            elif isinstance(teacher, (str, Path)):
                values = {**values, "teacher": [teacher]}
        return values


class CacheBuildOptions(Strict):
    """The settings of `distill cache build`: its CLI options and the service's cache-build jobs validate here."""

    top_k: Annotated[TopK, Field(le=4096)] = Field(64, description="log-probs kept per token")
    temperature: Temperature = Field(1.0, description="temperature of the stored distribution")
    max_length: Annotated[Length, Field(ge=8, le=32_768)] = Field(512, description="tokens per example")
    batch_size: Annotated[BatchSize, Field(le=1024)] = Field(8, description="sequences scored at once")


C = TypeVar("C", bound=BaseModel)


def parse_override(item: str) -> tuple[list[str], Any]:
    """`a.b=value` -> (["a", "b"], value parsed as YAML: numbers, booleans, lists, null)."""
    if "=" not in item:
        raise DistillError(f"override {item!r} is not of the form key=value (for example train.lr=0.001)")
    key, raw = item.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise DistillError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `data` with each `key.sub=value` override set (nested dicts created as needed)."""
    result: dict[str, Any] = yaml.safe_load(yaml.safe_dump(data)) if data else {}
    for item in overrides:
        path, value = parse_override(item)
        node = result
        for part in path[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[path[-1]] = value
    return result


def format_validation_error(error: ValidationError, source: str) -> str:
    """One line naming each bad field, e.g. `train.lr: Input should be greater than 0`."""
    parts = []
    for item in error.errors():
        message = item["msg"].removeprefix("Value error, ")
        where = ".".join(str(p) for p in item["loc"])
        parts.append(f"{where}: {message}" if where else message)
    return f"invalid config in {source}: " + "; ".join(parts)


def build(model: type[C], data: dict[str, Any], source: str = "config") -> C:
    """Validate `data` as `model`, turning pydantic's report into one DistillError line."""
    try:
        return model.model_validate(with_section_defaults(model, data))
    except ValidationError as error:
        raise DistillError(format_validation_error(error, source)) from None


def with_section_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """A section given in part keeps the rest of its default: `--set student_train.epochs=3` changes the epochs of
    the recipe's own student settings, not of a fresh TrainConfig with generic defaults."""
    out = dict(data)
    for name, field in model.model_fields.items():
        given = out.get(name)
        if not isinstance(given, dict):
            continue
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            out[name] = _merge(default.model_dump(), with_section_defaults(type(default), given))
        elif isinstance(default, dict) and default:  # e.g. a model size {"layers": 4, "width": 256, "heads": 4}
            out[name] = _merge(default, given)
    return out


def _merge(base: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in given.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def load_mapping(path: Path) -> dict[str, Any]:
    """A YAML config file as a mapping (or a one-line DistillError)."""
    if not path.is_file():
        raise DistillError(f"config file {path} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise DistillError(f"config file {path} is not valid YAML{where}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise DistillError(f"config file {path} must hold a mapping of keys to values, not {type(loaded).__name__}")
    return loaded


def load(model: type[C], path: Path | None, overrides: list[str] | None = None) -> C:
    """Load a YAML file (or nothing) into `model`, after applying `key=value` overrides."""
    data: dict[str, Any] = {}
    source = "overrides"
    if path is not None:
        source = str(path)
        data = _resolve_paths(model, load_mapping(path), path.parent)
    return build(model, apply_overrides(data, overrides or []), source)


MODEL_NAMES = ("teacher", "student")  # may be a folder or a hub name: made absolute only when the folder exists


def _resolve_paths(model: type[BaseModel], data: dict[str, Any], base: Path) -> dict[str, Any]:
    """Relative paths in a config file are relative to the file, not to the working directory: every field typed
    as a Path (or a list of them, or inside a nested section), and model names that are folders next to the file."""
    out = dict(data)
    for name, field in model.model_fields.items():
        value = out.get(name)
        if value is None:
            continue
        annotation = field.annotation
        nested = [a for a in (annotation, *get_args(annotation)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if nested and isinstance(value, dict):
            out[name] = _resolve_paths(nested[0], value, base)
        elif _mentions_path(annotation):
            out[name] = _relative(value, base)
        elif name in MODEL_NAMES and isinstance(value, str) and (base / value).exists():
            out[name] = str(base / value)
    return out


def _mentions_path(annotation: Any) -> bool:
    return annotation is Path or any(_mentions_path(a) for a in get_args(annotation))


def _relative(value: Any, base: Path) -> Any:
    if isinstance(value, str) and value and not Path(value).is_absolute():
        return str(base / value)
    if isinstance(value, list):
        return [_relative(v, base) for v in value]
    return value


def dump(config: BaseModel) -> str:
    """The resolved config as YAML (paths as strings), for a run's `config.yaml`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)


_TRAIN = {"batch_size": 16, "lr": 3e-3, "schedule": "cosine", "warmup": 0.05, "checkpoint_every": 200}
REASONING_TRAIN: dict[str, dict[str, Any]] = {
    "teacher_train": {"epochs": 4, **_TRAIN},
    "student_train": {"epochs": 10, **_TRAIN},
}
"""The reasoning recipe's training settings (the keys a config gives replace these, the others stay)."""


class ReasoningRunConfig(Strict):
    """`distill run --recipe reasoning`: chain-of-thought distillation on CPU, end to end.

    A teacher GPT-2 learns generated word problems from worked solutions, is served over the OpenAI-compatible API
    and samples `samples` traces per training question; traces whose final answer verifies teach a smaller student,
    compared on held-out problems with the same student trained on final answers only (and, with `token_kd`, with
    the same student also taught the teacher's top log-probs at every trace token).
    """

    recipe: Literal["reasoning"] = "reasoning"
    problems: Annotated[Rows, Field(ge=1)] = Field(
        5000,
        description="training problems: the teacher learns their worked solutions, the students their questions",
    )
    questions: Rows = Field(0, description="training questions the teacher answers with traces (the first); 0 = all")
    held_out: Annotated[Rows, Field(ge=1)] = Field(
        300, description="problems held out for evaluation (no question seen in training)"
    )
    steps: list[Annotated[int, Field(ge=1, le=6)]] = Field(
        default_factory=lambda: [2], min_length=1, max_length=6, description="calculations per problem (1..6)"
    )
    vocab_size: Vocab = Field(1000, description="byte-level BPE vocabulary (every number up to 200 is one token)")
    max_length: Annotated[Length, Field(ge=32, le=1024)] = Field(160, description="tokens of question + solution")
    teacher: GPT2Size = Field(default_factory=lambda: {"layers": 4, "width": 128, "heads": 4})
    student: GPT2Size = Field(default_factory=lambda: {"layers": 2, "width": 64, "heads": 2})
    teacher_train: TrainConfig = Field(default_factory=lambda: TrainConfig(**REASONING_TRAIN["teacher_train"]))
    student_train: TrainConfig = Field(
        default_factory=lambda: TrainConfig(**REASONING_TRAIN["student_train"]),
        description="both students; the answers-only one runs as many epochs as it needs to match the other's steps",
    )
    samples: Annotated[int, Field(ge=1, le=64)] = Field(2, description="traces sampled per question (n)")
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
    seed: Seed = 0

    @model_validator(mode="before")
    @classmethod
    def _partial_train_settings(cls, values: Any) -> Any:
        """A partial teacher_train / student_train (e.g. `--set teacher_train.epochs=6`) changes only the keys it
        names; the others keep this recipe's settings (REASONING_TRAIN), not TrainConfig's generic defaults."""
        if isinstance(values, dict):
            for key, default in REASONING_TRAIN.items():
                if isinstance(values.get(key), dict):
                    values = {**values, key: {**default, **values[key]}}
        return values

    @field_validator("teacher", "student")
    @classmethod
    def _bounded_model(cls, size: dict[str, int], info: ValidationInfo) -> dict[str, int]:
        check_gpt2_parameters(size, info.data.get("vocab_size", 300))
        return size
