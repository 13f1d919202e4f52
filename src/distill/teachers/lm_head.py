"""A live causal LM teacher's next-token log-probs formed chunk by chunk from its final hidden states, so that its
(tokens x vocabulary) log-probs never exist in full: for the chunked loss (`TeacherHead`, read by `distill.lm`), for
the top-k a teacher of another tokenizer carries to the student (`chunked_top_k`), and for the top-k records of a
token cache (`top_k_scorer`, `distill cache build`).

This needs the model's output projection: a Hugging Face causal LM whose `get_output_embeddings()` is a linear
layer and whose base model (`base_model_prefix`) returns `last_hidden_state`, with no transform of the logits after
the projection (soft-capping, a logit scale). `head_parts` returns None for any other model; its callers then use
the full log-probs of the model's own forward.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Settings of Hugging Face configs that change the logits after the output projection (Gemma 2's soft-capping,
# Cohere's and Granite's scales): a model with one of them set keeps the full path.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


@dataclass
class TeacherHead:
    """A live LM teacher's final hidden states (B, T, H_t) (after its last norm) and its output projection: weight
    (V_t, H_t) and bias (V_t,) or None. `F.linear(hidden, weight, bias)` are its logits."""

    hidden: Tensor
    weight: Tensor
    bias: Tensor | None


def head_parts(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """The base model and the linear output projection of a Hugging Face causal LM, or None when either cannot be
    reached or the model transforms its logits after the projection (see the module docstring)."""
    get_head = getattr(model, "get_output_embeddings", None)
    prefix = getattr(model, "base_model_prefix", None)
    head = get_head() if callable(get_head) else None
    base = getattr(model, prefix, None) if isinstance(prefix, str) and prefix else None
    if not isinstance(head, nn.Linear) or not isinstance(base, nn.Module):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    return base, head


def final_hidden(model: nn.Module, inputs: dict[str, Tensor]) -> TeacherHead | None:
    """The model's `TeacherHead` for a batch's inputs (run as the caller set it up: no_grad, eval), or None when the
    model has no reachable head (`head_parts`)."""
    parts = head_parts(model)
    if parts is None:
        return None
    base, head = parts
    output = base(**inputs)
    hidden = getattr(output, "last_hidden_state", None)
    if not isinstance(hidden, Tensor):
        return None
    return TeacherHead(hidden, head.weight, head.bias)


def chunked_top_k(
    hidden: Tensor,  # (n, H)
    weight: Tensor,  # (V, H)
    bias: Tensor | None,  # (V,)
    k: int,
    *,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> tuple[Tensor, Tensor, Tensor]:
    """The top-k of log_softmax(logits / T) at n positions, largest first, with their ids and the log of the mass
    outside them, computed `chunk_size` positions at a time (one (chunk, V) tensor or two at once):

        logits = hidden @ weight^T + bias (float32),  values, ids = topk(log_softmax(logits / T), k),
        log_tail = log sum over the other ids of softmax(logits / T)      (-inf when k == V)

    Returns values (n, k) float32, ids (n, k) long and log_tail (n,) float32."""
    n, vocab = hidden.shape[0], weight.shape[0]
    k = min(k, vocab)
    values = torch.empty((n, k), dtype=torch.float32, device=hidden.device)  # (n, k)
    ids = torch.empty((n, k), dtype=torch.long, device=hidden.device)  # (n, k)
    log_tail = torch.empty((n,), dtype=torch.float32, device=hidden.device)  # (n,)
    for start in range(0, n, max(chunk_size, 1)):
        rows = slice(start, min(start + chunk_size, n))
        logits = F.linear(hidden[rows], weight, bias).float()  # (C, V)
        logprobs = F.log_softmax(logits if temperature == 1.0 else logits / temperature, dim=-1)  # (C, V)
        del logits
        top, top_ids = logprobs.topk(k, dim=-1)  # (C, k), (C, k)
        values[rows], ids[rows] = top, top_ids
        log_tail[rows] = logprobs.scatter_(-1, top_ids, float("-inf")).logsumexp(-1)  # (C,)
    return values, ids, log_tail


def top_k_scorer(
    model: nn.Module,
    sequences: Sequence[np.ndarray],
    scored: Sequence[np.ndarray],
    encode: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray],
    *,
    top_k: int,
    temperature: float = 1.0,
    chunk_size: int = 1024,
) -> Callable[[slice], np.ndarray]:
    """`score(rows)` for `distill.teachers.token_cache.build_scored_cache`: the records (`encode(top, ids, tail)`,
    a `Codec.encode`) of the positions `scored` marks in sequences rows.start .. rows.stop - 1, in order, from the
    model's final hidden states at those positions and its head applied `chunk_size` positions at a time. The
    records equal those of `build_token_cache` with the model's full logits, to the rounding of the products. The
    model must have a reachable head (`head_parts`): ValueError otherwise."""
    if head_parts(model) is None:
        raise ValueError(f"{type(model).__name__} has no reachable output projection; score it with its full logits")
    model.eval()
    device = next(model.parameters()).device

    def score(rows: slice) -> np.ndarray:
        input_ids, attention, mask = _padded(sequences[rows], scored[rows])  # (B, T) each
        with torch.inference_mode():
            found = final_hidden(model, {"input_ids": input_ids.to(device), "attention_mask": attention.to(device)})
            assert found is not None
            hidden = found.hidden[mask.to(device)]  # (n, H)
            top, ids, tail = chunked_top_k(hidden, found.weight, found.bias, top_k, temperature=temperature,
                                           chunk_size=chunk_size)  # fmt: skip
        return encode(top.cpu().numpy(), ids.cpu().numpy(), tail.cpu().numpy())

    return score


def _padded(sequences: Sequence[np.ndarray], scored: Sequence[np.ndarray]) -> tuple[Tensor, Tensor, Tensor]:
    """Token ids right-padded with 0, the attention mask and the scored mask, each (B, T)."""
    width = max(len(a) for a in sequences)
    shape: Any = (len(sequences), width)
    input_ids = torch.zeros(shape, dtype=torch.long)  # (B, T)
    attention = torch.zeros(shape, dtype=torch.long)  # (B, T)
    mask = torch.zeros(shape, dtype=torch.bool)  # (B, T)
    for row, (array, chosen) in enumerate(zip(sequences, scored)):
        input_ids[row, : len(array)] = torch.from_numpy(np.asarray(array, dtype=np.int64))
        attention[row, : len(array)] = 1
        mask[row, : len(array)] = torch.from_numpy(np.asarray(chosen, dtype=bool))
    return input_ids, attention, mask
