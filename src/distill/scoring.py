"""Prompt scoring: the log-probability a causal LM gives each token of a prompt, from one forward pass.

The model's body runs once over a left-padded batch (`Engine.generate` does it in the pass that also starts the
generation); `score_prompts` takes its final hidden states, keeps the positions that predict a real next token, and
turns them into logits through the model's output head a chunk of positions at a time, so the full (B, T, V)
logits never exist at once. Each position gives the log-softmax (temperature 1, clamped at `MIN_LOGPROB` like the
engine's log-probs) of the token that follows, its rank as vLLM counts it (how many tokens of the vocabulary are
at least as likely: 1 for the most likely) and the k most likely tokens. The first token of a prompt follows
nothing and has no score.

This holds only for a model whose logits are its output head applied to its body's last hidden states;
`head_problem` says when that is not so (a logit scale or soft-cap after the head), and then nothing is scored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

MIN_LOGPROB = -9999.0
CHUNK_ELEMENTS = 1 << 24  # logits computed at once while scoring (64 MiB in float32)
SCALED_LOGITS = {  # config fields of models that rescale the head's output, and their values that leave it alone
    "final_logit_softcapping": (None,),  # Gemma 2 and 3
    "logit_scale": (None, 1),  # Cohere
    "logits_scaling": (None, 1),  # Granite
    "output_multiplier_scale": (None, 1),
}


@dataclass
class PromptScores:
    """A prompt's tokens scored: entry t - 1 is about token t given the tokens before it (the first has none)."""

    logprobs: list[float]  # (T - 1,) log p(token t | tokens < t)
    ranks: list[int] | None  # (T - 1,) tokens at least as likely as token t, itself included (when asked)
    top_ids: list[list[int]]  # (T - 1, K) the K most likely tokens at each position, most likely first
    top_logprobs: list[list[float]]  # (T - 1, K)


def score_positions(
    hidden: Tensor, targets: Tensor, head: Any, top: int, ranked: bool, chunk_elements: int = CHUNK_ELEMENTS
) -> tuple[Tensor, Tensor | None, Tensor, Tensor]:
    """Score `targets` (N,) after the final hidden states `hidden` (N, H): their log-probs (N,), their ranks (N,)
    when `ranked` (a pass over the vocabulary that costs about half the head's product on a CPU), and the `top` most
    likely tokens' log-probs and ids (N, K), through `head` a chunk of positions at a time."""
    vocabulary = int(head.weight.shape[0])
    k = min(top, vocabulary)
    if hidden.shape[0] == 0:
        nothing = torch.zeros((0, k), device=hidden.device)  # (0, K)
        return nothing[:, 0], nothing[:, 0].long() if ranked else None, nothing, nothing.long()
    logprobs, ranks, top_values, top_ids = [], [], [], []
    step = max(1, chunk_elements // vocabulary)
    for start in range(0, hidden.shape[0], step):
        logits = head(hidden[start : start + step]).float()  # (C, V)
        total = torch.logsumexp(logits, dim=-1, keepdim=True)  # (C, 1): log-softmax is logits - total
        chosen = logits.gather(-1, targets[start : start + step, None])  # (C, 1)
        logprobs.append((chosen - total)[:, 0].clamp(min=MIN_LOGPROB))
        if ranked:
            ranks.append(torch.sum(logits >= chosen, dim=-1, dtype=torch.int32))  # (C,): logits order as log-probs
        best = logits.topk(k, dim=-1)  # (C, K)
        top_values.append((best.values - total).clamp(min=MIN_LOGPROB))
        top_ids.append(best.indices)
    return torch.cat(logprobs), torch.cat(ranks) if ranked else None, torch.cat(top_values), torch.cat(top_ids)


def score_prompts(
    hidden: Tensor, ids: Tensor, mask: Tensor, head: Any, tops: list[int], ranked: bool,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> list[PromptScores]:  # fmt: skip
    """The scores of each left-padded row of `ids` (B, T) (`mask` (B, T) marks the real tokens) from the body's final
    hidden states `hidden` (B, T, H); row b keeps its `tops[b]` most likely tokens per position, and the ranks of
    its tokens when `ranked`."""
    predicting = (mask[:, :-1] * mask[:, 1:]).bool()  # (B, T - 1): a real token that a real token follows
    states = hidden[:, :-1][predicting]  # (N, H), row after row
    targets = ids[:, 1:][predicting]  # (N,)
    found = score_positions(states, targets, head, max(tops, default=0), ranked, chunk_elements)
    logprobs, top_values, top_ids = found[0].tolist(), found[2].tolist(), found[3].tolist()
    ranks = None if found[1] is None else found[1].tolist()
    scores, start = [], 0
    for count, k in zip(predicting.sum(dim=-1).tolist(), tops):
        end = start + count
        top = [row[:k] for row in top_ids[start:end]], [row[:k] for row in top_values[start:end]]
        scores.append(PromptScores(logprobs[start:end], None if ranks is None else ranks[start:end], *top))
        start = end
    return scores


def head_problem(model: Any, probe: list[int], device: torch.device) -> str | None:
    """None when `model`'s logits are its output head applied to its body's last hidden states (checked on the
    token ids `probe`), else why its prompts cannot be scored that way."""
    head, body = model.get_output_embeddings(), getattr(model, "base_model", model)
    if head is None or body is model or not hasattr(head, "weight"):
        return "it has no output head separate from its body"
    scaled = [name for name, neutral in SCALED_LOGITS.items() if getattr(model.config, name, None) not in neutral]
    if scaled:
        return f"its logits are rescaled after the output head ({', '.join(scaled)})"
    ids = torch.tensor([probe], device=device)  # (1, T)
    try:
        with torch.inference_mode():
            hidden = getattr(body(input_ids=ids), "last_hidden_state", None)
            if hidden is None:
                return "its body does not return its last hidden states"
            logits = model(input_ids=ids).logits[:, -1].float()  # (1, V)
            mine = head(hidden[:, -1]).float()  # (1, V)
    except (RuntimeError, ValueError, TypeError, AttributeError) as error:  # an unusual model: it still generates
        return f"its body and head cannot be run apart ({type(error).__name__}: {str(error)[:200]})"
    tolerance = 16 * torch.finfo(hidden.dtype).eps * max(1.0, float(logits.abs().max()))
    if mine.shape != logits.shape or float((mine - logits).abs().max()) > tolerance:
        return "its logits are not its output head applied to its last hidden states"
    return None
