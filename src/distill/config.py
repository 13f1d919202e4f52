"""Configuration: the bounds every config accepts, the pieces configs share (loss, training, model specs), and
`resolve`, the one function that turns a partial config into a full one.

Each recipe and job keeps its own config model beside its code (`distill/recipes/<name>.py`, `train_arrays.py`,
`train_lm.py`); the CLI builds them from its options and files, the service from job payloads, the dashboard from
its form, all through `resolve`, so a config never names an import path or anything else that would run code.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)

from distill.errors import DistillError
from distill.sources import hub_id

Divergence = Literal["forward_kl", "reverse_kl", "jsd", "tvd", "uld"]
Precision = Literal["fp32", "bf16", "fp16"]
Tracker = Literal["tensorboard", "mlflow", "wandb"]

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
LearningRate = Annotated[float, Field(gt=0)]
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
    takes inf or nan; a section given in part keeps the rest of its default (`student_train: {epochs: 3}` changes
    the epochs of the model's own student settings, whoever validates it: the CLI, a config file, the service);
    `SHORTCUTS` name keys that stand for a nested key (`epochs` for `student_train.epochs`)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=(), allow_inf_nan=False)
    SHORTCUTS: ClassVar[dict[str, str]] = {}

    @model_validator(mode="before")
    @classmethod
    def _complete_sections(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        return with_section_defaults(cls, expand_shortcuts(data, cls.SHORTCUTS))


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
    lr: LearningRate = 3e-3
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
    precision: Precision = Field(
        "fp32",
        description="the student's compute: fp32, bf16 (autocast; also on CPUs) or fp16 (autocast and a "
        "gradient scaler); weights and optimizer stay float32, losses are computed in float32",
    )
    teacher_precision: Precision | None = Field(
        None, description="a live teacher's precision (its weights cast); null: the student's"
    )
    grad_accum_steps: Annotated[int, Field(ge=1, le=4096)] = Field(
        1,
        description="batches whose gradients add up before one optimizer step (the effective batch is this x "
        "batch_size); under DDP the inner ones do not synchronise",
    )
    activation_checkpointing: bool = Field(
        False, description="recompute the student's activations in the backward pass (less memory, more time)"
    )
    report_to: list[Tracker] = Field(
        default_factory=list, max_length=3, description="trackers fed the per-step history: tensorboard, mlflow, wandb"
    )

    def arithmetic(self) -> dict[str, Any]:
        """The settings that change what training computes, for reusing a checkpoint or a kept model only when
        they match: precision and accumulation do; where it runs and logs, how often it checkpoints or evaluates, and
        activation checkpointing (which recomputes the same values) do not."""
        return self.model_dump(exclude=NOT_ARITHMETIC)


NOT_ARITHMETIC = {"checkpoint_every", "eval_every", "device", "report_to", "activation_checkpointing"}


class LoraSpec(Strict):
    """A LoRA adapter (Hu et al. 2021) trained instead of the whole student (`peft`): W + (alpha / r) B A."""

    r: Annotated[int, Field(ge=1, le=4096)] = Field(16, description="the rank of each adapter")
    alpha: Annotated[float, Field(gt=0, le=1e6)] = Field(32.0, description="the scale numerator: updates x alpha / r")
    dropout: Share = Field(0.05, description="dropout on the adapters' input")
    target_modules: list[Annotated[str, Field(min_length=1, max_length=200)]] | Literal["all-linear"] = Field(
        "all-linear", max_length=256, description="the modules adapted, by name (peft's), or all-linear"
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


class CacheBuildOptions(Strict):
    """The settings of `distill cache build`: its CLI options and the service's cache-build jobs validate here."""

    top_k: Annotated[TopK, Field(le=4096)] = Field(64, description="log-probs kept per token")
    temperature: Temperature = Field(1.0, description="temperature of the stored distribution")
    max_length: Annotated[Length, Field(ge=8, le=32_768)] = Field(512, description="tokens per example")
    batch_size: Annotated[BatchSize, Field(le=1024)] = Field(8, description="sequences scored at once")
    device: str = Field("cpu", max_length=64, description="where the teacher runs: cpu, cuda, cuda:1, mps")
    precision: Precision = Field(
        "fp32", description="the teacher's weights: fp32, bf16 or fp16 (half the memory; log-probs still in float32)"
    )


class ServedCacheOptions(Strict):
    """The settings of `distill cache build --base-url` (the teacher behind an OpenAI-compatible server scores the
    data): its CLI options and the service's cache-build jobs with `api` validate here. The server's log-probs are
    the teacher's at temperature 1, so the cache's temperature is 1."""

    top_k: Annotated[TopK, Field(le=4096)] = Field(
        20, description="log-probs asked for per token (the cache keeps min(k, what the server returns))"
    )
    max_length: Annotated[Length, Field(ge=8, le=32_768)] = Field(512, description="tokens per example")
    concurrency: Workers = Field(16, description="requests in flight at most")
    timeout: Annotated[float, Field(gt=0, le=3600)] = Field(
        120.0, description="seconds a response may take before it is retried"
    )
    max_retries: Annotated[int, Field(ge=0, le=20)] = Field(6, description="retries per request (429, 5xx, timeouts)")
    price_input: Annotated[float, Field(ge=0, le=1e6)] = Field(
        0.0, description="price per million prompt tokens, for the cost figure"
    )
    price_output: Annotated[float, Field(ge=0, le=1e6)] = Field(
        0.0, description="price per million completion tokens, for the cost figure"
    )


class GenerateOptions(Strict):
    """The settings of `distill generate` (a teacher's answers through its API): its CLI options and the service's
    generate jobs validate here, with these defaults."""

    n: Annotated[int, Field(ge=1, le=128)] = Field(1, description="samples per prompt")
    temperature: SamplingTemperature = Field(1.0, description="sampling temperature (0 = greedy)")
    top_p: Annotated[float, Field(gt=0, le=1)] = Field(1.0, description="nucleus sampling mass")
    max_tokens: Length | None = Field(None, description="tokens per answer at most")
    stop: list[Annotated[str, Field(min_length=1, max_length=1_000)]] = Field(
        default_factory=list, max_length=4, description="stop strings (up to 4)"
    )
    seed: Seed | None = Field(None, description="seed sent to the server (sample i uses seed + i)")
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = Field(
        None, description="keep the sampled tokens' log-probs (0) and the top K alternatives (K > 0), when served"
    )
    cot: bool = Field(False, description="ask for step-by-step reasoning ending in '#### <answer>'")
    template: str | None = Field(None, max_length=10_000, description="a prompt template with {question}")
    endpoint: Literal["chat", "completions"] = Field("chat", description="chat (messages) or completions (raw prompt)")
    concurrency: Workers = Field(16, description="requests in flight at most")
    timeout: Annotated[float, Field(gt=0, le=3600)] = Field(
        120.0, description="seconds a response may take before it is retried"
    )
    max_retries: Annotated[int, Field(ge=0, le=20)] = Field(
        6, description="retries per request (429, 5xx, timeouts, malformed answers)"
    )
    price_input: Annotated[float, Field(ge=0, le=1e6)] = Field(
        0.0, description="price per million prompt tokens, for the cost figure"
    )
    price_output: Annotated[float, Field(ge=0, le=1e6)] = Field(
        0.0, description="price per million completion tokens, for the cost figure"
    )
    limit: Annotated[Rows, Field(ge=1)] | None = Field(None, description="only the first N prompts")
    max_cost: Annotated[float, Field(ge=0, le=1e9, allow_inf_nan=False)] | None = Field(
        None,
        description="stop before the output file's cost (all runs) would pass this amount; needs the prices "
        "(a rerun with a larger amount continues)",
    )

    @model_validator(mode="after")
    def _a_budget_needs_prices(self) -> GenerateOptions:
        if self.max_cost is not None and self.price_input == 0 and self.price_output == 0:
            raise ValueError("max_cost needs the teacher's prices (price_input / price_output): both are 0")
        return self


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


def problems_of(error: ValidationError, given_as: dict[str, str] | None = None) -> list[tuple[str, str]]:
    """Each problem as (field, message): `train.lr`, `Input should be greater than 0`. A field the config gave
    through a shortcut is named by the shortcut (`given_as` maps the nested field to it: a `student_width` that
    makes the student too large is reported as `student_width`)."""
    problems = []
    for item in error.errors():
        where = ".".join(str(p) for p in item["loc"])
        for full, short in (given_as or {}).items():
            if where == full or (full.startswith(where + ".") and item["type"] == "value_error"):
                where = short
        problems.append((where, item["msg"].removeprefix("Value error, ")))
    return problems


class ConfigError(DistillError):
    """A config that does not validate: one line for people (`str`), and each problem as (field, message)."""

    def __init__(self, problems: list[tuple[str, str]], source: str) -> None:
        lines = "; ".join(f"{where}: {message}" if where else message for where, message in problems)
        super().__init__(f"invalid config in {source}: {lines}")
        self.problems = problems


def resolve(
    model: type[C], data: dict[str, Any] | None = None, overrides: Sequence[str] = (), source: str = "config"
) -> C:
    """THE way a partial config becomes a full one, for the CLI, the service and the dashboard alike: the model's
    defaults (its recipe's), then `data` (a file's or a job's), then `key.sub=value` overrides; sections given in
    part keep the rest of their defaults. A ConfigError naming every bad field otherwise."""
    merged = apply_overrides(data or {}, list(overrides))
    try:
        return model.model_validate(merged)
    except ValidationError as error:
        shortcuts = getattr(model, "SHORTCUTS", {})
        given_as = {full: short for short, full in shortcuts.items() if short in merged}
        raise ConfigError(problems_of(error, given_as), source) from None


def build(model: type[C], data: dict[str, Any], source: str = "config") -> C:
    """`resolve` without overrides."""
    return resolve(model, data, (), source)


def expand_shortcuts(data: dict[str, Any], shortcuts: dict[str, str]) -> dict[str, Any]:
    """Each shortcut key moved to the nested key it stands for (`{"epochs": 3}` -> `{"student_train": {"epochs":
    3}}`); the nested key, when also given, wins."""
    out = dict(data)
    for short, full in shortcuts.items():
        if short not in out:
            continue
        value = out.pop(short)
        *parents, last = full.split(".")
        node = out
        for part in parents:
            child = node.get(part)
            child = child.model_dump() if isinstance(child, BaseModel) else child
            node[part] = dict(child) if isinstance(child, dict) else {}
            node = node[part]
        node.setdefault(last, value)
    return out


def with_section_defaults(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Every section of `data` given in part (a dict) merged into the field's default (a config model or a dict)."""
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


def load(model: type[C], path: Path | None, overrides: Sequence[str] = ()) -> C:
    """`resolve` of a YAML file (or nothing) and `key=value` overrides; the file's relative paths are relative to it."""
    if path is None:
        return resolve(model, {}, overrides, "overrides")
    return resolve(model, _resolve_paths(model, load_mapping(path), path.parent), overrides, str(path))


MODEL_NAMES = ("teacher", "student")  # may be a folder or a hub name: made absolute only when the folder exists
DATA_SOURCES = ("data", "eval_data")  # may be a file, a folder or a Hub data set id (org/name[:split])


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
            inner = value.get("model")  # a model given with its settings: {model: FOLDER, lora: ...}
            if name in MODEL_NAMES and isinstance(inner, str) and (base / inner).exists():
                out[name]["model"] = str(base / inner)
        elif _mentions_path(annotation):
            out[name] = _relative(value, base, hub=name in DATA_SOURCES)
        elif name in MODEL_NAMES and isinstance(value, str) and (base / value).exists():
            out[name] = str(base / value)
    return out


def _mentions_path(annotation: Any) -> bool:
    return annotation is Path or any(_mentions_path(a) for a in get_args(annotation))


def _relative(value: Any, base: Path, hub: bool = False) -> Any:
    """A relative path made relative to `base`; with `hub`, a data set's Hub id (`org/name[:split]`, not a file or
    folder next to the config file) kept as it is."""
    if isinstance(value, str) and value and not Path(value).is_absolute():
        if hub and hub_id(value) is not None and not (base / value).exists():
            return value
        return str(base / value)
    if isinstance(value, list):
        return [_relative(v, base, hub) for v in value]
    return value


def dump(config: BaseModel) -> str:
    """The resolved config as YAML (paths as strings), for a run's `config.yaml`."""
    return yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False)
