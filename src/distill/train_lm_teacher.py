"""What teaches a `distill train-lm` student: a live teacher or a token cache, made to speak in the student's
vocabulary when theirs differ (`distill.teachers.cross`): padded embedding tables of one tokenizer are cut to the
student's; another tokenizer is aligned by text. A cache records its teacher's tokenizer (`tokenizer/` beside the
manifest), so a cache built by one family serves a student of another."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distill import hf
from distill.errors import DistillError
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.teachers.cross import CrossTokenizerTeacher, PaddedVocabTeacher
from distill.teachers.local import LocalTeacher
from distill.teachers.token_cache import TokenCache

CACHE_TOKENIZER = "tokenizer"  # the teacher's tokenizer, saved in a cache's folder by `cache build`


@dataclass
class Taught:
    """The teacher as the training loop calls it (None: the student trains alone), the live teacher's model (for
    the held-out comparison), its tokenizer, and the training data in its tokens when they are not the student's."""

    source: Any = None
    model: Any = None
    tokenizer: Any = None
    teacher_data: LMDataset | None = None

    def metrics(self) -> dict[str, Any]:
        """What the report says of the pairing: the alignment's coverage, or the mass of dropped padding rows."""
        if isinstance(self.source, CrossTokenizerTeacher):
            pairing = "the j-th completion token of both (ULD)" if self.source.uld else "aligned by bytes"
            pairing += ", prefix map" if self.source.vocabulary == "prefix" and not self.source.uld else ""
            mapped = self.source.map.mapped / max(self.source.map.teacher_size, 1)
            tokenizers = {"teacher_tokenizer": hf.tokenizer_fingerprint(self.source.teacher_tokenizer),
                          "student_tokenizer": hf.tokenizer_fingerprint(self.source.student_tokenizer)}  # fmt: skip
            return {"alignment": {"coverage": self.source.coverage, "pairing": pairing, "vocab_mapped": mapped,
                                  "top_k": self.source.top_k, **tokenizers}}  # fmt: skip
        if isinstance(self.source, PaddedVocabTeacher):
            return {"dropped_mass": self.source.dropped_mass}
        return {}


def lm_teacher(config: Any, tokenizer: Any, examples: Sequence[Example], data: LMDataset, student_vocab: int,
               store: Path | None) -> Taught:  # fmt: skip
    """The teacher of an `LMJobConfig` for a student with `tokenizer` and `student_vocab` output rows, trained on
    `examples` (tokenized by the student as `data`)."""
    if config.teacher is not None and config.cache is not None:
        raise DistillError("give either a live teacher or a cache, not both")
    if config.teacher is not None:
        teacher_tokenizer = hf.load_tokenizer(config.teacher, store)
        precision = config.train.teacher_precision or config.train.precision  # loaded in it: never whole in fp32
        model: Any = hf.load_causal_lm(config.teacher, store, None if precision == "fp32" else precision)
        inner = LocalTeacher(model, int(model.config.vocab_size))
        same = hf.tokenizer_fingerprint(teacher_tokenizer) == hf.tokenizer_fingerprint(tokenizer)
        teacher_data = data if same else tokenize_examples(teacher_tokenizer, examples, config.max_length)
        return _for_student(config, inner, teacher_tokenizer, tokenizer, teacher_data, student_vocab, model, same)
    if config.cache is None:
        return Taught()
    teacher_tokenizer = cache_tokenizer(config.cache, tokenizer, store)
    teacher_hash = hf.tokenizer_fingerprint(teacher_tokenizer)
    same = teacher_hash == hf.tokenizer_fingerprint(tokenizer)
    teacher_data = data if same else tokenize_examples(teacher_tokenizer, examples, config.max_length)
    cache = TokenCache(config.cache, expect={"tokenizer_hash": teacher_hash, "data_id": teacher_data.fingerprint()})
    if not math.isclose(cache.temperature, config.loss.temperature):
        raise DistillError(
            f"the cache was built at temperature {cache.temperature} but loss.temperature is "
            f"{config.loss.temperature}; set them equal (the tail of a top-k cache cannot be re-tempered)"
        )
    return _for_student(config, cache, teacher_tokenizer, tokenizer, teacher_data, student_vocab, None, same)


def _for_student(config: Any, inner: Any, teacher_tokenizer: Any, tokenizer: Any, teacher_data: LMDataset,
                 student_vocab: int, model: Any, same: bool) -> Taught:  # fmt: skip
    """`inner` as is (one vocabulary), cut to the student's rows (`same` tokenizer, padded tables), or aligned
    (`teacher_data`: the training data in the teacher's tokens)."""
    if same:
        if inner.num_classes == student_vocab:
            return Taught(inner, model, teacher_tokenizer)
        return Taught(PaddedVocabTeacher(inner, student_vocab), model, teacher_tokenizer)
    try:
        cross = CrossTokenizerTeacher(inner, teacher_tokenizer, tokenizer, teacher_data=teacher_data,
                                      max_length=config.max_length, top_k=config.teacher_top_k,
                                      uld=config.loss.divergence == "uld", vocabulary=config.teacher_map)  # fmt: skip
    except DistillError as error:
        raise DistillError(
            f"teacher and student tokenizers differ and cannot be aligned by text ({error}); give the student the "
            "teacher's tokenizer, or distill through generated text (distill generate)"
        ) from None
    return Taught(cross, model, teacher_tokenizer, teacher_data)


def cache_tokenizer(directory: Path, student_tokenizer: Any, store: Path | None) -> Any:
    """The tokenizer a cache was built with: the student's when their fingerprints agree, else the copy saved in
    the cache (or, for a cache without one, its teacher's by name)."""
    manifest = TokenCache(directory).manifest
    if manifest.get("tokenizer_hash") == hf.tokenizer_fingerprint(student_tokenizer):
        return student_tokenizer
    saved = Path(directory) / CACHE_TOKENIZER
    try:
        if saved.is_dir():
            from transformers import AutoTokenizer  # the folder holds the tokenizer alone (no model config)

            found = AutoTokenizer.from_pretrained(saved)
        else:
            found = hf.load_tokenizer(str(manifest["teacher_name"]), store)
    except (OSError, ValueError, DistillError):
        found = None
    if found is None or hf.tokenizer_fingerprint(found) != manifest.get("tokenizer_hash"):
        raise DistillError(
            f"the cache {directory} was built with another tokenizer than the student's and holds no copy of it "
            f"(and its teacher {manifest.get('teacher_name')!r} gives another); rebuild it with `distill cache build`"
        )
    return found
