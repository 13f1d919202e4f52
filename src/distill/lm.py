"""The language-model branch of the training loop: token-level terms computed in chunks, and on-policy batches.

Token-level distillation of a causal LM student (a Hugging Face model with an output embedding): the student's final
hidden states at the scored positions (the batch's `kd_mask`) go through `distill.chunked.chunked_kd_and_ce` with
its own output projection, so its (tokens x vocabulary) logits never exist in full; a live causal LM teacher's
distribution at those positions is formed the same way, chunk by chunk, from its final hidden states and head
(`distill.teachers.lm_head`), and other teachers give it dense or sparse (top-k, a log-prob cache).

On-policy distillation (GKD, Agarwal et al. 2024): for a fraction `lmbda` of the batches the completions are
sampled from the student itself, given the batch's prompts, and scored by the (live) teacher; the loss is then the
divergence on the sampled tokens only (no hard labels: the sample has none).
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import Tensor, nn

from distill.chunked import chunked_kd_and_ce
from distill.config import LossConfig
from distill.data import IGNORE
from distill.distributed import is_fsdp, unwrap
from distill.errors import DistillError, ShapeMismatchError
from distill.losses import hinton_weights, soft_target_term
from distill.teachers import Teacher, TeacherOutput
from distill.teachers.lm_head import TeacherHead


def is_causal_lm(model: nn.Module) -> bool:
    inner = unwrap(model)
    head = getattr(inner, "get_output_embeddings", None)
    return callable(head) and head() is not None and getattr(inner, "base_model_prefix", None) is not None


def hidden_states(model: nn.Module, inputs: dict[str, Tensor]) -> tuple[Tensor, nn.Module]:
    """The final hidden states (B, T, H) of a causal LM (after its last norm) and its output projection.

    The base model is called through the wrapper's own forward when wrapped (DDP needs its forward to run), so the
    call goes to `model(..., output_hidden_states=True)` only when the base cannot be reached directly."""
    inner: Any = unwrap(model)
    head = inner.get_output_embeddings()
    if inner is model and not is_fsdp(model):  # FSDP gathers the parameters in its root forward only
        base = getattr(inner, str(inner.base_model_prefix))
        return base(**inputs).last_hidden_state, head
    output = model(**inputs, output_hidden_states=True)
    return output.hidden_states[-1], head


def lm_terms(
    model: nn.Module,
    batch: dict[str, Any],
    teacher: Teacher | None,
    loss: LossConfig,
    on_policy: bool = False,
    fused: bool = False,
) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Hinton's `kd` and `ce` over the scored tokens (`distill.losses.hinton_weights`), from one chunked pass.

    Without a teacher only `ce`; on an on-policy batch only `kd` (the divergence on the student's own samples); only
    `kd` too when `ce` weighs 0 (alpha 1), whose log-softmax, gradients and head products took a fifth of a step at
    vocabulary 32,000. `fused`: the caller minimises exactly sum_k weights[k] * terms[k] with the weights returned,
    so both terms' gradients go through one pair of head products (`chunked_kd_and_ce`'s `ce_per_kd`)."""
    mask = batch["kd_mask"].reshape(-1)  # (B*T,)
    # The teacher runs first: its forward's activations are freed before the student's (kept for backward) exist.
    given = None if teacher is None else _teacher_side(teacher, batch, mask, batch["inputs"]["input_ids"].device)
    hidden, head = hidden_states(model, batch["inputs"])  # (B, T, H)
    scored = hidden.reshape(-1, hidden.shape[-1])[mask]  # (N, H)
    labels = batch["labels"].reshape(-1)[mask]  # (N,)
    weight: Tensor = head.weight  # type: ignore[assignment]
    found = getattr(head, "bias", None)
    bias: Tensor | None = found if isinstance(found, Tensor) else None
    if given is None:
        # The cross-entropy as a divergence from a one-hot teacher: forward KL(onehot(y) || q) = -log q(y).
        one_hot = torch.zeros(len(labels), 1, device=scored.device)  # log-prob 0 at the label: probability 1
        ce, _ = chunked_kd_and_ce(scored, weight, student_bias=bias, teacher_logprobs=one_hot,
                                  token_ids=labels[:, None], chunk_size=loss.chunk_size)  # fmt: skip
        return {"ce": ce}, {"ce": 1.0}
    _check_vocab(_teacher_vocab(given), weight.shape[0], loss.divergence)
    mix = hinton_weights(loss.alpha, ["kd", "ce"])
    hard = not on_policy and mix["ce"] > 0  # the hard-label term is computed
    kd_weight = mix["kd"] * loss.temperature**2  # the divergence's weight in the total: alpha T^2 (soft_target_term)
    ce_per_kd = mix["ce"] / kd_weight if fused and hard and kd_weight > 0 else None
    kd, ce = chunked_kd_and_ce(
        scored, weight, student_bias=bias, divergence=loss.divergence, temperature=loss.temperature, beta=loss.beta,
        chunk_size=loss.chunk_size, labels=labels if hard else None, ce_per_kd=ce_per_kd, **given,
    )  # fmt: skip
    terms = {"kd": soft_target_term(kd, loss.temperature)}
    if on_policy:
        return terms, {"kd": 1.0}  # the divergence on the student's own samples, alone
    if hard:
        terms["ce"] = ce
    return terms, hinton_weights(loss.alpha, terms)


def _teacher_side(teacher: Teacher, batch: dict[str, Any], mask: Tensor, device: torch.device) -> dict[str, Any]:
    """The teacher's arguments of `chunked_kd_and_ce` at the batch's scored positions `mask` (B*T,).

    A live causal LM teacher (`LocalTeacher.final_hidden`) gives its final hidden states (N, H_t) and output
    projection, so its log-probs are formed chunk by chunk inside the loss and never exist in full; any other
    teacher (a cache, a teacher of another tokenizer, a model without a reachable head) gives its log-probs, dense
    (N, V) or top-k (N, K) with their ids, and the positions it covers (a partial cache weighs the others 0 in the
    divergence; `ce` keeps them)."""
    get_head = getattr(teacher, "final_hidden", None)
    head: TeacherHead | None = get_head(batch) if callable(get_head) else None
    if head is not None:
        hidden = head.hidden.reshape(-1, head.hidden.shape[-1])[mask.to(head.hidden.device)]  # (N, H_t)
        bias = None if head.bias is None else head.bias.to(device)
        return {"teacher_hidden": hidden.to(device), "teacher_head": head.weight.to(device), "teacher_bias": bias}
    output: TeacherOutput = teacher(batch)
    if output.logprobs is None:
        raise DistillError("the teacher gives no log-probs for token-level distillation")
    width = output.logprobs.shape[-1]
    teacher_logprobs = output.logprobs.reshape(-1, width)[mask.to(output.logprobs.device)].to(device)  # (N, V|K)
    ids = output.token_ids
    token_ids = None if ids is None else ids.reshape(-1, width)[mask.to(ids.device)].to(device)  # (N, K)
    covered = None if output.mask is None else output.mask.reshape(-1)[mask.to(output.mask.device)].to(device)
    return {"teacher_logprobs": teacher_logprobs, "token_ids": token_ids,
            "weights": None if covered is None else covered.float(), "teacher_temperature": output.temperature}  # fmt: skip


def _teacher_vocab(given: dict[str, Any]) -> int | None:
    """The vocabulary a dense teacher predicts over (None for a sparse top-k one, whose ids are checked later)."""
    if "teacher_head" in given:
        return int(given["teacher_head"].shape[0])
    return None if given["token_ids"] is not None else int(given["teacher_logprobs"].shape[-1])


def _check_vocab(teacher_vocab: int | None, vocab: int, divergence: str) -> None:
    """A dense teacher must predict the student's vocabulary (but for ULD, which compares sorted distributions)."""
    if teacher_vocab is not None and teacher_vocab != vocab and divergence != "uld":
        raise ShapeMismatchError(
            f"the teacher's vocabulary has {teacher_vocab} tokens but the student's {vocab}; logits cannot be "
            "compared token by token: distill through generated text instead (distill generate)"
        )


def on_policy_step(seed: int, step: int, lmbda: float) -> bool:
    """Whether batch `step` is sampled from the student: a coin fixed by (seed, step), so a resumed run agrees."""
    return lmbda > 0 and random.Random(seed * 1_000_003 + step).random() < lmbda


@torch.no_grad()
def student_samples(
    model: nn.Module,
    batch: dict[str, Any],
    *,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    pad_id: int,
    eos_id: int | None,
) -> dict[str, Any]:
    """The batch's prompts completed by the student (sampling at `temperature`), as a training batch whose scored
    positions are the sampled tokens. The global random state is restored afterwards."""
    inner = unwrap(model)
    ids, lengths = batch["inputs"]["input_ids"], batch["prompt_lengths"]  # (B, T), (B,)
    prompts, attention = _left_padded_prompts(ids, lengths, pad_id)  # (B, P), (B, P)
    state = torch.get_rng_state()
    torch.manual_seed(seed)
    was_training = inner.training
    inner.eval()
    try:
        generated = inner.generate(
            input_ids=prompts,
            attention_mask=attention,
            do_sample=True,
            temperature=temperature,
            top_k=0,
            max_new_tokens=max_new_tokens,
            pad_token_id=pad_id,
            eos_token_id=eos_id,
        )[:, prompts.shape[1] :]  # (B, M)
    finally:
        inner.train(was_training)
        torch.set_rng_state(state)
    sequences, prompt_lengths = [], []
    for b in range(ids.shape[0]):
        new = generated[b].tolist()
        if eos_id is not None and eos_id in new:
            new = new[: new.index(eos_id) + 1]
        new = [t for t in new if t != pad_id or t == eos_id] or [eos_id if eos_id is not None else pad_id]
        n = int(lengths[b])
        sequences.append(ids[b, :n].tolist() + new)
        prompt_lengths.append(n)
    return _sampled_batch(sequences, prompt_lengths, pad_id, ids.device) | {"index": batch["index"], "sampled": True}


def _left_padded_prompts(ids: Tensor, lengths: Tensor, pad_id: int) -> tuple[Tensor, Tensor]:
    """The prompts (the first `lengths[b]` tokens of each row of `ids` (B, T)) left-padded for generation: token ids
    (B, P) and attention mask (B, P)."""
    rows, width = ids.shape[0], int(lengths.max())
    prompts = torch.full((rows, width), pad_id, dtype=torch.long, device=ids.device)  # (B, P)
    attention = torch.zeros_like(prompts)  # (B, P)
    for b in range(rows):
        n = int(lengths[b])
        prompts[b, width - n :] = ids[b, :n]
        attention[b, width - n :] = 1
    return prompts, attention


def _sampled_batch(
    sequences: list[list[int]], prompt_lengths: list[int], pad_id: int, device: torch.device
) -> dict[str, Any]:
    """Prompt + sampled completion sequences as a right-padded training batch scored on the completions."""
    rows, total = len(sequences), max(len(s) for s in sequences)
    out_ids = torch.full((rows, total), pad_id, dtype=torch.long)  # (B, T)
    out_attention = torch.zeros((rows, total), dtype=torch.long)  # (B, T)
    labels = torch.full((rows, total), IGNORE, dtype=torch.long)  # (B, T)
    for b, sequence in enumerate(sequences):
        out_ids[b, : len(sequence)] = torch.tensor(sequence)
        out_attention[b, : len(sequence)] = 1
        p = max(prompt_lengths[b], 1)  # a row without a prompt token: its first token has nothing to follow
        labels[b, p - 1 : len(sequence) - 1] = torch.tensor(sequence[p:])
    return {
        "inputs": {"input_ids": out_ids.to(device), "attention_mask": out_attention.to(device)},
        "labels": labels.to(device),
        "kd_mask": (labels != IGNORE).to(device),
        "prompt_lengths": torch.tensor(prompt_lengths, device=device),
    }
