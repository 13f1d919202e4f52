"""Language-model distillation: a user's job (`distill train-lm`) and the built-in CPU recipe (`distill run --recipe lm`).

The recipe trains a byte-level BPE tokenizer and a small GPT-2 teacher on local text, scores the training texts once
into a top-k log-prob cache, then trains a smaller GPT-2 student from the cache (sparse token-level KD plus the
hard-label loss) and, separately, the same student alone on the same texts for as many steps. Everything is scored
on held-out texts: perplexity, KL to the teacher, next-token agreement with the teacher, tokens per second (timed
side by side) and size.
"""

from __future__ import annotations

import json
import math
import random
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from distill import evaluate as ev
from distill.config import LMJobConfig, LMRunConfig
from distill.data import read_json, read_lines, read_table
from distill.errors import DataError, DistillError
from distill.lm_data import Example, LMDataset, read_examples, tokenize_examples
from distill.models import count_parameters
from distill.progress import NULL, Reporter
from distill.teachers import hf
from distill.teachers.local import LocalTeacher
from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits, verify_token_cache
from distill.train import train


@torch.no_grad()
def lm_scores(
    model: nn.Module, data: LMDataset, teacher: nn.Module | None = None, batch_size: int = 32
) -> dict[str, float]:
    """Over the scored tokens of `data`: perplexity = exp(mean CE); with a teacher, the mean KL(teacher || model)
    and the share of tokens where both rank the same token first."""
    model.eval()
    totals = {"ce": 0.0, "kl": 0.0, "agree": 0.0, "tokens": 0.0}
    for index in torch.arange(len(data)).split(batch_size):
        batch = data.batch(index)
        mask = batch["kd_mask"]  # (B, T)
        logits = model(**batch["inputs"]).logits.float()[mask]  # (N, V)
        labels = batch["labels"][mask]  # (N,)
        totals["ce"] += float(F.cross_entropy(logits, labels, reduction="sum"))
        totals["tokens"] += float(mask.sum())
        if teacher is not None:
            teacher.eval()
            teacher_logits = teacher(**batch["inputs"]).logits.float()[mask]  # (N, V)
            log_p, log_q = F.log_softmax(teacher_logits, -1), F.log_softmax(logits, -1)
            totals["kl"] += float((log_p.exp() * (log_p - log_q)).sum())
            totals["agree"] += float((teacher_logits.argmax(-1) == logits.argmax(-1)).sum())
    n = max(totals["tokens"], 1.0)
    scores = {"perplexity": math.exp(totals["ce"] / n), "tokens": int(totals["tokens"])}
    if teacher is not None:
        scores.update(kl_to_teacher=totals["kl"] / n, agreement=totals["agree"] / n)
    return scores


def _speed_inputs(data: LMDataset, rows: int = 16) -> tuple[dict[str, Any], dict[str, Any]]:
    index = torch.arange(min(rows, len(data)))
    return data.batch(index[:1])["inputs"], data.batch(index)["inputs"]


def weights_size(directory: Path) -> int:
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


# ----------------------------------------------------------------------------------------------------------------
# A user's job
# ----------------------------------------------------------------------------------------------------------------


def run_lm_job(
    config: LMJobConfig, output: Path, *, cache_dir: Path, resume: bool = False, reporter: Reporter = NULL
) -> dict[str, Any]:
    """Distill a causal LM from a live teacher or a cache (or fine-tune it alone when neither is given)."""
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    tokenizer = hf.load_tokenizer(config.student, cache_dir)
    student = hf.load_causal_lm(config.student, cache_dir)
    data = tokenize_examples(tokenizer, read_examples(config.data, tokenizer), config.max_length)
    teacher_model: Any = None
    source: Any = None
    if config.teacher is not None and config.cache is not None:
        raise DistillError("give either a live teacher or a cache, not both")
    if config.teacher is not None:
        hf.check_same_vocabulary(hf.load_tokenizer(config.teacher, cache_dir), tokenizer)
        teacher_model = hf.load_causal_lm(config.teacher, cache_dir)
        source = LocalTeacher(teacher_model, int(teacher_model.config.vocab_size))
    elif config.cache is not None:
        source = TokenCache(
            config.cache, expect={"tokenizer_hash": hf.tokenizer_fingerprint(tokenizer), "data_id": data.fingerprint()}
        )
        if not math.isclose(source.temperature, config.loss.temperature):
            raise DistillError(
                f"the cache was built at temperature {source.temperature} but loss.temperature is "
                f"{config.loss.temperature}; set them equal (the tail of a top-k cache cannot be re-tempered)"
            )
    result = train(
        student,
        data,
        config.train,
        teacher=source,
        loss=config.loss,
        checkpoint_dir=output / "checkpoints",
        resume=resume,
        reporter=reporter,
        name="student",
    )
    directory = output / "student"
    if _rank() != 0:  # one process writes; under FSDP `state_dict` holds the gathered weights
        return {"recipe": "train-lm", "history": result.history}
    whole: Any = result.model
    if result.state_dict is not None:  # trained sharded (FSDP): the gathered weights into an unsharded copy
        whole = hf.load_causal_lm(config.student, cache_dir)
        whole.load_state_dict(result.state_dict)
    whole.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    metrics: dict[str, Any] = {
        "recipe": "train-lm",
        "history": result.history,
        "student": str(directory),
        "params": count_parameters(result.model),
        "size_bytes": weights_size(directory),
    }
    if config.eval_data is not None:
        held_out = tokenize_examples(tokenizer, read_examples(config.eval_data, tokenizer), config.max_length)
        saved = hf.load_causal_lm(directory)  # the exported student, whole even when training sharded it
        metrics["eval"] = lm_scores(saved, held_out, teacher_model)
    metrics["seconds"] = time.perf_counter() - started
    (output / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return metrics


def _rank() -> int:
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    return torch.distributed.get_rank() if distributed else 0


# ----------------------------------------------------------------------------------------------------------------
# The built-in recipe
# ----------------------------------------------------------------------------------------------------------------


def corpus(config: LMRunConfig, data_dir: Path | None) -> list[str]:
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


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (the `tokenizers` library), saved in `directory`."""
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def gpt2(tokenizer: Any, size: dict[str, int], max_length: int, seed: int) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length + 8,
        n_embd=size["width"],
        n_layer=size["layers"],
        n_head=size["heads"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def _fit(
    name: str,
    config: LMRunConfig,
    size: dict[str, int],
    tokenizer: Any,
    data: LMDataset,
    output: Path,
    *,
    teacher: Any,
    train_config: Any,
    seed: int,
    resume: bool,
    reporter: Reporter,
) -> tuple[nn.Module, dict[str, Any]]:
    """Train a fresh GPT-2 of `size` (or load it when a resumed run saved it already) into output/models/name."""
    from transformers import GPT2LMHeadModel

    directory = output / "models" / name
    done = directory / "history.json"
    if resume and done.is_file():
        return GPT2LMHeadModel.from_pretrained(directory).eval(), read_json(done, ("history", "seconds", "steps"))
    result = train(
        gpt2(tokenizer, size, config.max_length, seed),
        data,
        train_config,
        teacher=teacher,
        loss=config.loss,
        checkpoint_dir=output / "checkpoints" / name,
        resume=resume,
        reporter=reporter,
        name=name,
    )
    result.model.save_pretrained(directory)  # type: ignore[operator]
    tokenizer.save_pretrained(directory)  # each model folder loads (and serves) on its own
    info = {"history": result.history, "seconds": result.seconds, "steps": result.steps}
    done.write_text(json.dumps(info))
    return result.model.eval(), info


def run_lm(
    config: LMRunConfig,
    output: Path,
    *,
    data_dir: Path | None,
    cache_dir: Path,
    resume: bool = False,
    reporter: Reporter = NULL,
) -> dict[str, Any]:
    started = time.perf_counter()
    output.mkdir(parents=True, exist_ok=True)
    reporter.stage("data", total=None)
    texts = corpus(config, data_dir)
    held_out_count = max(200, len(texts) // 20)
    train_texts, held_out_texts = texts[held_out_count:], texts[:held_out_count]
    tokenizer_dir = output / "tokenizer"
    if resume and (tokenizer_dir / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast  # the folder holds the tokenizer alone (no model config)

        tokenizer = PreTrainedTokenizerFast.from_pretrained(tokenizer_dir)
    else:
        tokenizer = train_tokenizer(train_texts, config.vocab_size, tokenizer_dir)
    data = tokenize_examples(tokenizer, [Example("", t) for t in train_texts], config.max_length)
    held_out = tokenize_examples(tokenizer, [Example("", t) for t in held_out_texts], config.max_length)
    reporter.end()

    common: dict[str, Any] = {"resume": resume, "reporter": reporter}
    teacher, teacher_info = _fit(
        "teacher",
        config,
        config.teacher,
        tokenizer,
        data,
        output,
        teacher=None,
        train_config=config.teacher_train,
        seed=config.seed,
        **common,
    )
    cache_path = output / "cache"
    build_token_cache(
        causal_lm_logits(teacher), [s.numpy() for s in data.sequences], cache_path,
        scored=[data.scored(i).numpy() for i in range(len(data))], top_k=config.top_k,
        temperature=config.loss.temperature, teacher_name="lm-recipe-teacher", teacher_revision="trained-by-recipe",
        tokenizer_hash=hf.tokenizer_fingerprint(tokenizer),
        vocab_size=len(tokenizer), data_id=data.fingerprint(), batch_size=32, reporter=reporter,
    )  # fmt: skip
    cache = TokenCache(cache_path)
    students = {}
    for name, source in (("student-distilled", cache), ("student-alone", None)):
        students[name] = _fit(
            name,
            config,
            config.student,
            tokenizer,
            data,
            output,
            teacher=source,
            train_config=config.student_train,
            seed=config.seed + 1,
            **common,
        )

    reporter.stage("evaluate", total=None)
    single, batch = _speed_inputs(held_out)
    speed = ev.measure_speed(
        {"teacher": teacher, **{n: m for n, (m, _) in students.items()}}, single, batch, rounds=5, min_seconds=0.2
    )
    tokens_per_batch = int(batch["attention_mask"].sum())
    rows: dict[str, Any] = {}
    for name, model in [("teacher", teacher)] + [(n, m) for n, (m, _) in students.items()]:
        scores = lm_scores(model, held_out, None if name == "teacher" else teacher)
        info = teacher_info if name == "teacher" else students[name][1]
        rows[name] = {
            **scores,
            "params": count_parameters(model),
            "size_bytes": weights_size(output / "models" / name),
            "tokens_per_second": speed[name].throughput * tokens_per_batch / len(batch["input_ids"]),
            "latency_ms": speed[name].latency_ms,
            "history": info["history"],
            "train_seconds": info["seconds"],
        }
    reporter.end()
    return {
        "recipe": "lm",
        "description": (
            f"{len(train_texts)} training texts and {len(held_out_texts)} held-out texts; byte-level BPE "
            f"of {len(tokenizer)} tokens; teacher GPT-2 {config.teacher}, student GPT-2 {config.student}; "
            f"cache top-{config.top_k}"
        ),
        "models": rows,
        "cache": verify_token_cache(cache_path),
        "loss": config.loss.model_dump(),
        "seconds": time.perf_counter() - started,
    }
