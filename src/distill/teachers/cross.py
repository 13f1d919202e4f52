"""Teachers whose vocabulary is not the student's, made to speak in the student's positions and vocabulary.

* `PaddedVocabTeacher`: the same tokenizer, embedding tables padded to other sizes (Qwen2.5-Coder 7B has 152,064
  rows, 0.5B 151,936). The teacher's rows beyond the student's are dropped and the probability mass they held is
  measured: it must be negligible (the rows are padding, never trained to be predicted), else a DistillError.
* `CrossTokenizerTeacher`: another tokenizer (a Llama teacher, a Qwen student). Both tokenize the same text; each
  row's completion tokens are aligned by byte offsets (`distill.token_align.align`), and at a student position
  whose next token starts where a teacher token starts (both models have read exactly the same bytes) the teacher's
  top-k next tokens are carried to the student's vocabulary through the exact map of equal byte strings; teacher
  tokens without a student counterpart fall into the tail bucket of the sparse losses (ids -1), or, with
  `vocabulary="prefix"`, go to the student token of their longest byte prefix (`token_align.prefix_map`: the mass
  of a word the student spells in pieces goes to the piece it starts with). The other positions
  weigh 0 in the divergence (the hard-label loss keeps them); the share aligned is counted (`coverage`).
  For the Universal Logit Distillation loss (`loss.divergence: uld`, Boizard et al. 2024) the pairing is the
  paper's instead: the j-th completion token of both, the teacher's top-k probabilities sorted.

The teacher inside is a live model (`LocalTeacher`) or a token cache built with the teacher's tokenizer: it sees the
batch in its own tokenization, the rows of `teacher_data` (the same examples tokenized by the teacher) or, for a
batch the student sampled (on-policy), the student's text re-tokenized. A live causal LM gives its top-k at the
paired positions only, formed chunk by chunk from its final hidden states (`LocalTeacher.top_k_at`), so its
(tokens x vocabulary) log-probs never exist; a model without a reachable head gives its full log-probs. A padded
table (`PaddedVocabTeacher`) keeps the full log-probs: the mass of the dropped rows is measured on them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.lm_data import Example, LMDataset, tokenize_examples
from distill.losses import LOG_FLOOR
from distill.teachers.protocol import Teacher, TeacherOutput
from distill.token_align import align, carry_top_k, decode_pieces, prefix_map, token_bytes, vocab_map

PADDING_MASS = 1e-3  # the most probability a teacher may put on embedding rows the student does not have


class PaddedVocabTeacher:
    """`inner`'s distributions cut (or padded) to the student's `vocab_size` rows; `dropped_mass` is the most
    probability seen on the dropped rows at a scored position."""

    def __init__(self, inner: Teacher, vocab_size: int, tolerance: float = PADDING_MASS):
        self.inner, self.num_classes, self.tolerance = inner, vocab_size, tolerance
        self.dropped_mass = 0.0

    @property
    def model(self) -> Any:
        """The live teacher's model (AttributeError for a cache, which cannot score the student's samples)."""
        return self.inner.model  # type: ignore[attr-defined]

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        output = self.inner(batch)
        if output.logprobs is None:
            return output
        scored = batch["kd_mask"].to(output.logprobs.device)  # (B, T)
        if output.token_ids is None:
            logprobs, dropped = self._dense(output.logprobs)  # (B, T, V_s), (B, T)
            token_ids = None
        else:
            logprobs, token_ids, dropped = self._sparse(output.logprobs, output.token_ids)  # (B, T, K) x2, (B, T)
        worst = float(dropped[scored].max()) if bool(scored.any()) else 0.0
        self.dropped_mass = max(self.dropped_mass, worst)
        if worst > self.tolerance:
            raise DistillError(
                f"the teacher puts {worst:.2%} of its probability on its {self.inner.num_classes - self.num_classes:,} "
                f"embedding rows beyond the student's {self.num_classes:,}: they are real tokens, not padding; give "
                "the student the teacher's vocabulary"
            )
        return TeacherOutput(logprobs, token_ids, output.hidden_states, output.temperature, output.mask)

    def _dense(self, logprobs: Tensor) -> tuple[Tensor, Tensor]:
        """(B, T, V_t) -> (B, T, V_s) renormalised, and the dropped mass (B, T)."""
        width = logprobs.shape[-1]
        if width <= self.num_classes:  # a smaller teacher table: the student's extra rows get no probability
            pad = logprobs.new_full((*logprobs.shape[:-1], self.num_classes - width), LOG_FLOOR)
            return torch.cat([logprobs, pad], dim=-1), logprobs.new_zeros(logprobs.shape[:-1])
        dropped = torch.logsumexp(logprobs[..., self.num_classes :], dim=-1)  # (B, T)
        kept = logprobs[..., : self.num_classes]  # (B, T, V_s)
        return kept - torch.logsumexp(kept, dim=-1, keepdim=True), dropped.exp()

    def _sparse(self, logprobs: Tensor, token_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Top-k entries on rows the student lacks become empty buckets (id -1); their mass is returned (B, T)."""
        beyond = token_ids >= self.num_classes  # (B, T, K)
        dropped = logprobs.float().exp().masked_fill(~beyond, 0.0).sum(dim=-1)  # (B, T)
        return logprobs.masked_fill(beyond, LOG_FLOOR), token_ids.masked_fill(beyond, -1), dropped


class CrossTokenizerTeacher:
    """`inner`, a teacher with `teacher_tokenizer`, speaking to a student with `student_tokenizer` (see the module
    docstring). `teacher_data` is the training data tokenized by the teacher, row for row with the student's."""

    def __init__(self, inner: Teacher, teacher_tokenizer: Any, student_tokenizer: Any, *, teacher_data: LMDataset,
                 max_length: int, top_k: int, uld: bool = False, vocabulary: str = "exact"):  # fmt: skip
        self.inner, self.teacher_data = inner, teacher_data
        self.teacher_tokenizer, self.student_tokenizer = teacher_tokenizer, student_tokenizer
        self.max_length, self.top_k, self.uld, self.vocabulary = max_length, top_k, uld, vocabulary
        self.map = (prefix_map if vocabulary == "prefix" else vocab_map)(teacher_tokenizer, student_tokenizer)
        self.num_classes = self.map.student_size
        self.teacher_pieces, self.student_pieces = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
        self.aligned, self.positions = 0, 0

    @property
    def model(self) -> Any:
        """The live teacher's model (AttributeError for a cache, which cannot score the student's samples)."""
        return self.inner.model  # type: ignore[attr-defined]

    @property
    def coverage(self) -> float:
        """The share of scored student positions that had a teacher distribution so far."""
        return self.aligned / self.positions if self.positions else 0.0

    def data_coverage(self, data: LMDataset, batch_size: int = 256) -> float:
        """The share of `data`'s scored positions (the student's tokenization of `teacher_data`'s rows) that get a
        teacher distribution, without running the teacher."""
        paired, scored = 0, 0
        for index in torch.arange(len(data)).split(batch_size):
            batch = data.batch(index)
            paired += len(self._pairs(batch, self._teacher_batch(batch)))
            scored += int(batch["kd_mask"].sum())
        return paired / scored if scored else 0.0

    def __call__(self, batch: dict[str, Any]) -> TeacherOutput:
        teacher_batch = self._teacher_batch(batch)
        pairs = self._pairs(batch, teacher_batch)  # (P, 4): student row, student position, teacher row, position
        rows, temperature = self._live_rows(teacher_batch, pairs), 1.0  # a live LM teacher: chunk by chunk
        if rows is None:  # a cache, or a model without a reachable head: its full log-probs, then the pairs
            output = self.inner(teacher_batch)
            if output.logprobs is None:
                raise DistillError("the teacher gives no log-probs for token-level distillation")
            if output.mask is not None and len(pairs):
                pairs = pairs[output.mask.cpu()[pairs[:, 2], pairs[:, 3]]]  # a partial cache lacks some positions
            rows, temperature = self._rows(output, pairs), output.temperature
        covered = batch["kd_mask"].new_zeros(batch["kd_mask"].shape)  # (B, T_s)
        shape = (*covered.shape, rows[0].shape[-1])  # (B, T_s, K)
        logprobs = torch.full(shape, LOG_FLOOR, device=rows[0].device)
        logprobs[pairs[:, 0], pairs[:, 1]] = rows[0]
        token_ids = None
        if rows[1] is not None:
            token_ids = torch.full(shape, -1, dtype=torch.long, device=rows[1].device)
            token_ids[pairs[:, 0], pairs[:, 1]] = rows[1]
        covered[pairs[:, 0].to(covered.device), pairs[:, 1].to(covered.device)] = True
        self.aligned += len(pairs)
        self.positions += int(batch["kd_mask"].sum())
        return TeacherOutput(logprobs, token_ids, temperature=temperature, mask=covered)

    def _live_rows(self, teacher_batch: dict[str, Any], pairs: Tensor) -> tuple[Tensor, Tensor | None] | None:
        """For a live LM teacher (`LocalTeacher.top_k_at`), its top-k at the paired teacher positions formed chunk by
        chunk from its final hidden states, carried as `_rows` carries them; None for any other teacher."""
        top_k_at = getattr(self.inner, "top_k_at", None)
        found = top_k_at(teacher_batch, pairs[:, 2:], self.top_k) if callable(top_k_at) else None
        return None if found is None else self._carried(*found)

    def _teacher_batch(self, batch: dict[str, Any]) -> dict[str, Any]:
        """The batch in the teacher's tokenization: its rows of `teacher_data`, or a sampled batch's text re-read."""
        if not batch.get("sampled", False):
            return self.teacher_data.batch(batch["index"].cpu())
        if not hasattr(self.inner, "model"):
            raise DistillError("a cache cannot score the student's own samples: on-policy needs a live teacher")
        ids, lengths = batch["inputs"]["input_ids"].cpu(), batch["inputs"]["attention_mask"].sum(-1).cpu()
        examples = []
        for row, n, p in zip(ids.tolist(), lengths.tolist(), batch["prompt_lengths"].tolist()):
            pieces = [self.student_pieces[t] if t < len(self.student_pieces) else None for t in row[:n]]  # padding rows
            prompt, completion = pieces[:p], pieces[p:]
            examples.append(Example(decode_pieces(prompt), decode_pieces(completion)))
        return tokenize_examples(self.teacher_tokenizer, examples, self.max_length).batch(torch.arange(len(examples)))

    def _pairs(self, batch: dict[str, Any], teacher_batch: dict[str, Any]) -> Tensor:
        """(P, 4) long: for each student position given a teacher distribution, (row, position, teacher row,
        teacher position); a position predicts the next token, so completion token j is predicted at p - 1 + j."""
        pairs = []
        scored = batch["kd_mask"].cpu()
        for b, (student, teacher) in enumerate(zip(_completions(batch), _completions(teacher_batch))):
            (s_ids, s_start), (t_ids, t_start) = student, teacher
            if self.uld:  # the paper's pairing: the j-th completion token of both
                matched = list(range(min(len(s_ids), len(t_ids))))
            else:
                matched = align([self.teacher_pieces[t] for t in t_ids], [self.student_pieces[s] for s in s_ids])
            for j, i in enumerate(matched):
                s, t = s_start - 1 + j, t_start - 1 + i
                if i >= 0 and s >= 0 and t >= 0 and bool(scored[b, s]):
                    pairs.append((b, s, b, t))
        return torch.tensor(pairs, dtype=torch.long).reshape(-1, 4)

    def _rows(self, output: TeacherOutput, pairs: Tensor) -> tuple[Tensor, Tensor | None]:
        """The teacher's top-k at the paired positions: carried to student ids (P, K) x2, or for ULD its sorted
        log-probs (P, K) and no ids."""
        assert output.logprobs is not None
        found = output.logprobs[pairs[:, 2], pairs[:, 3]].float()  # (P, V_t) or (P, K_c)
        if output.token_ids is None:
            best = found.topk(min(self.top_k, found.shape[-1]), dim=-1)  # (P, K), sorted
            values, ids = best.values, best.indices
        else:
            values, order = found.sort(dim=-1, descending=True)  # (P, K_c)
            ids = output.token_ids[pairs[:, 2], pairs[:, 3]].gather(-1, order)  # (P, K_c)
        return self._carried(values, ids)

    def _carried(self, values: Tensor, ids: Tensor) -> tuple[Tensor, Tensor | None]:
        """The teacher's top-k (P, K) log-probs sorted, with their teacher ids, in the student's terms: carried to
        student ids (`carry_top_k`), or for ULD the values alone."""
        if self.uld:
            return values, None
        return carry_top_k(values, ids, self.map.student_ids.to(ids.device))


def _completions(batch: dict[str, Any]) -> Sequence[tuple[list[int], int]]:
    """Each row's completion token ids and where they start (the prompt's length)."""
    ids, lengths = batch["inputs"]["input_ids"].cpu(), batch["inputs"]["attention_mask"].sum(-1).cpu()
    starts = batch["prompt_lengths"].cpu().tolist()
    return [(row[p:n], p) for row, n, p in zip(ids.tolist(), lengths.tolist(), starts)]
