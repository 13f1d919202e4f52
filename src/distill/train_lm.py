"""`distill train-lm`: a user's causal LM student distilled from a live teacher (same tokenizer) or from a cache of
its top-k log-probs, on the user's JSONL data (or fine-tuned alone when neither is given); under `torchrun`, the
same job trains with DDP or FSDP."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from distill import hf
from distill.config import Length, LossConfig, Strict, TrainConfig
from distill.distributed import rank
from distill.errors import DistillError
from distill.evaluate import lm_scores
from distill.lm_data import read_examples, tokenize_examples
from distill.lm_models import weights_bytes
from distill.models import count_parameters
from distill.stages import RunContext
from distill.teachers.local import LocalTeacher
from distill.teachers.token_cache import TokenCache
from distill.train import train


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


def _teacher(config: LMJobConfig, tokenizer: Any, data_id: str, store: Path | None) -> tuple[Any, Any]:
    """(what teaches: a live teacher or the cache, or None; the live teacher's model, for the held-out KL)."""
    if config.teacher is not None and config.cache is not None:
        raise DistillError("give either a live teacher or a cache, not both")
    if config.teacher is not None:
        hf.check_same_vocabulary(hf.load_tokenizer(config.teacher, store), tokenizer)
        model: Any = hf.load_causal_lm(config.teacher, store)
        return LocalTeacher(model, int(model.config.vocab_size)), model
    if config.cache is None:
        return None, None
    cache = TokenCache(config.cache, expect={"tokenizer_hash": hf.tokenizer_fingerprint(tokenizer), "data_id": data_id})
    if not math.isclose(cache.temperature, config.loss.temperature):
        raise DistillError(
            f"the cache was built at temperature {cache.temperature} but loss.temperature is "
            f"{config.loss.temperature}; set them equal (the tail of a top-k cache cannot be re-tempered)"
        )
    return cache, None


def run_train_lm(config: LMJobConfig, context: RunContext) -> dict[str, Any]:
    """Distill a causal LM from a live teacher or a cache (or fine-tune it alone when neither is given) into
    `output/student`; return the metrics (also written to metrics.json by the process of rank 0)."""
    started = time.perf_counter()
    output, store = context.output, context.store
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = hf.load_tokenizer(config.student, store)
    data = tokenize_examples(tokenizer, read_examples(config.data, tokenizer), config.max_length)
    source, teacher_model = _teacher(config, tokenizer, data.fingerprint(), store)
    result = train(hf.load_causal_lm(config.student, store), data, config.train, teacher=source, loss=config.loss,
                   checkpoint_dir=output / "checkpoints", resume=context.resume, reporter=context.reporter,
                   name="student")  # fmt: skip
    if rank() != 0:  # one process writes; under FSDP `state_dict` holds the gathered weights
        return {"recipe": "train-lm", "history": result.history}
    whole: Any = result.model
    if result.state_dict is not None:  # trained sharded (FSDP): the gathered weights into an unsharded copy
        whole = hf.load_causal_lm(config.student, store)
        whole.load_state_dict(result.state_dict)
    directory = output / "student"
    whole.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    metrics: dict[str, Any] = {"recipe": "train-lm", "history": result.history, "student": str(directory),
                               "params": count_parameters(result.model), "size_bytes": weights_bytes(directory)}  # fmt: skip
    if config.eval_data is not None:
        held_out = tokenize_examples(tokenizer, read_examples(config.eval_data, tokenizer), config.max_length)
        metrics["eval"] = lm_scores(hf.load_causal_lm(directory), held_out, teacher_model)  # the exported student
    metrics["seconds"] = time.perf_counter() - started
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics
