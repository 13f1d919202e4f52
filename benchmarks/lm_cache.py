"""How small and how exact is the teacher LM top-k cache, and how fast does it decode?

Reference: DistillKit stores about 300 bytes per token at k = 128. Measured here, on real LM distributions:

    bytes per stored position    every file of the cache (manifest, index, shards) / scored positions   k=128: <= 200
                                 with the part each section of the shards takes (`token_shards`: depth-coded values,
                                 offsets, code tables, entropy-coded ids) and what the version-1 format (ids as
                                 uint16) would take
    KL(exact || cached)          over the K + 1 buckets the sparse loss sees (top-K and tail), per position  < 1e-4
    decode time                  TokenCache.batch for 8 random sequences x 512 positions, k = 128, median over
                                 rounds, and side by side the same read from uncompressed float32/int32 arrays

Where the distributions come from: a byte-level BPE tokenizer (Hugging Face `tokenizers`, trained here on the
sentences of SST-2 train.tsv) and a small GPT-2 (transformers, random init) trained for --train-seconds on the same
sentences, on CPU. The caches score the 872 held-out sentences of SST-2 test.tsv, every position but the last, at
temperature 1 and 0.5 (the same logits sharpened, nearer a large LM's confidence); the KL compares each cached
position with the live model's float64 log-probs of the same ids and the exact mass of all others. The decode
timing scores held-out dev + test text packed into 512-token sequences (decode work does not depend on the values).
Also a distillation step of a student reading the cache against a plain fine-tuning step of the same student
(target: at most 1.05x), measured side by side.
Writes benchmarks/results/lm_cache.json.

    python benchmarks/lm_cache.py [--data ../shared/data/sst2] [--train-seconds 150] [--top-k 64 128]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from distill.teachers.token_cache import TokenCache, build_token_cache, causal_lm_logits, verify_token_cache
from distill.teachers.token_shards import layout

RESULTS = Path(__file__).parent / "results"
ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"bytes_per_position_k128": 200.0, "kl_mean": 1e-4, "training_step": 1.05}


def sentences(path: Path) -> list[str]:
    with path.open(newline="") as handle:
        return [row["sentence"].strip() for row in csv.DictReader(handle, delimiter="\t") if row["sentence"].strip()]


def train_tokenizer(texts: list[str], vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<eos>"], show_progress=False)
    tokenizer.train_from_iterator(texts, trainer)
    return tokenizer


def train_lm(stream: np.ndarray, vocab: int, context: int, seconds: float, seed: int):
    """A small GPT-2 trained on random windows of the token stream for `seconds` (the teacher whose outputs we store)."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.GPT2Config(
        vocab_size=vocab, n_positions=512, n_embd=128, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0
    )
    model = transformers.GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    generator = np.random.default_rng(seed)
    tokens = torch.from_numpy(stream)
    start, steps, losses = time.perf_counter(), 0, []
    while time.perf_counter() - start < seconds:
        offsets = generator.integers(0, len(stream) - context - 1, 16)
        batch = torch.stack([tokens[o : o + context + 1] for o in offsets])  # (16, context + 1)
        logits = model(input_ids=batch[:, :-1]).logits  # (16, context, V)
        loss = F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        steps += 1
        losses.append(loss.item())
    return model.eval(), {
        "steps": steps,
        "seconds": time.perf_counter() - start,
        "final_loss": statistics.mean(losses[-50:]),
    }


def breakdown(cache: TokenCache, summary: dict[str, Any]) -> dict[str, Any]:
    """Bytes per position of each section of the shards (`token_shards.layout`), of the other files, and of the same
    cache in the version-1 format (fixed records with uint16/uint32 ids)."""
    positions = max(summary["positions"], 1)
    parts = {"values": 0, "offsets": 0, "code": 0, "stream": 0}
    for entry in cache.manifest["shards"]:
        sections = layout(cache.codec, int(entry["rows"]), int(entry["id_bits"]))
        for name in parts:
            parts[name] += sections[name][1]
    shard_bytes = sum((cache.directory / entry["file"]).stat().st_size for entry in cache.manifest["shards"])
    other = summary["bytes"] - shard_bytes  # manifest, index, .npy headers and section padding
    other += shard_bytes - sum(parts.values())
    return {
        "bytes_per_position_parts": {
            "log-probs (tail, step, depths)": parts["values"] / positions,
            "ids (Huffman stream)": parts["stream"] / positions,
            "offsets": parts["offsets"] / positions,
            "code tables": parts["code"] / positions,
            "manifest, index, headers": other / positions,
        },
        "bytes_per_position_format_v1": cache.codec.record_bytes + (summary["bytes"] - shard_bytes) / positions,
    }


@torch.no_grad()
def exactness(logits: list[torch.Tensor], cache: TokenCache, k: int, temperature: float) -> dict[str, float]:
    """KL(exact || cached) per scored position over K + 1 buckets and over the renormalised top-K; teacher stats.

    `logits` holds the live model's (T-1, V) logits of each sequence, scored alone. "Exact" is its log-probs (float64)
    at the ids the cache holds, and the exact mass of all other ids; the ids themselves are the live top-K up to
    float32 near-ties at rank K (counted in `id_set_differs`)."""
    full, renormalised, top1, entropy, mass, differs = [], [], [], [], [], 0
    for i, sequence_logits in enumerate(logits):
        logprobs = F.log_softmax(sequence_logits.double() / temperature, -1)  # (T-1, V)
        cached = cache.batch([i], len(sequence_logits) + 1)
        ids = cached.token_ids[0, :-1]  # (T-1, K)
        differs += int((ids.sort(-1).values != logprobs.topk(k).indices.sort(-1).values).any(-1).sum())
        top = logprobs.gather(-1, ids)  # (T-1, K)
        log_tail = logprobs.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)  # (T-1, 1)
        cached_top = cached.logprobs[0, :-1].double()  # (T-1, K)
        cached_tail = torch.log1p(-cached_top.exp().sum(-1, keepdim=True).clamp_max(1.0))  # (T-1, 1)
        p, q = torch.cat([top, log_tail], -1), torch.cat([cached_top, cached_tail], -1)  # (T-1, K+1)
        full.append((p.exp() * (p - q).nan_to_num(posinf=0.0)).sum(-1))
        p_hat, q_hat = top.log_softmax(-1), cached_top.log_softmax(-1)  # (T-1, K)
        renormalised.append((p_hat.exp() * (p_hat - q_hat)).sum(-1))
        top1.append(top[:, 0].exp())
        entropy.append(-(logprobs.exp() * logprobs).sum(-1))
        mass.append(top.exp().sum(-1))
    kl, kl_hat = torch.cat(full), torch.cat(renormalised)
    return {
        "positions": kl.numel(),
        "kl_mean": kl.mean().item(),
        "kl_p50": kl.quantile(0.5).item(),
        "kl_p99": kl.quantile(0.99).item(),
        "kl_max": kl.max().item(),
        "kl_renormalised_top_k_mean": kl_hat.mean().item(),
        "kl_renormalised_top_k_max": kl_hat.max().item(),
        "teacher_top1_prob_mean": torch.cat(top1).mean().item(),
        "teacher_entropy_nats_mean": torch.cat(entropy).mean().item(),
        "teacher_top_k_mass_mean": torch.cat(mass).mean().item(),
        "id_set_differs": differs,
    }


def decode_timing(cache: TokenCache, directory: Path, rounds: int, batch: int, seed: int) -> dict[str, float]:
    """TokenCache.batch against reading the same positions from uncompressed arrays (float32 log-probs, int32 ids,
    memory-mapped), timed alternately round after round; every sequence is `length` long, all but its last scored."""
    length = int(cache.lengths.max())
    rows = cache.records(np.arange(int(cache.row_start[-1])))  # (n,) every record, to write uncompressed arrays
    np.save(directory / "logprobs.npy", cache.codec.decode(rows))
    np.save(directory / "ids.npy", rows["ids"].astype(np.int32))
    plain_logprobs = np.load(directory / "logprobs.npy", mmap_mode="r")  # (n, K)
    plain_ids = np.load(directory / "ids.npy", mmap_mode="r")  # (n, K)

    def uncompressed(seq: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        index = (cache.row_start[seq][:, None] + np.arange(length - 1)).ravel()  # (B * (T-1),)
        logprobs = np.zeros((len(seq), length, cache.top_k), np.float32)  # (B, T, K)
        ids = np.zeros((len(seq), length, cache.top_k), np.int64)  # (B, T, K)
        logprobs[:, :-1] = plain_logprobs[index].reshape(len(seq), length - 1, -1)
        ids[:, :-1] = plain_ids[index].reshape(len(seq), length - 1, -1)
        return torch.from_numpy(logprobs), torch.from_numpy(ids)

    generator = np.random.default_rng(seed)
    times: dict[str, list[float]] = {"cache": [], "uncompressed": []}
    cpu_times: dict[str, list[float]] = {"cache": [], "uncompressed": []}
    for r in range(rounds + 1):
        chosen = generator.choice(len(cache), batch, replace=False)
        for name in ("cache", "uncompressed") if r % 2 else ("uncompressed", "cache"):
            start, cpu = time.perf_counter(), time.process_time()
            out = cache.batch(chosen, length) if name == "cache" else uncompressed(chosen)
            if r:  # round 0 warms up
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu)
        del out
    ratios = [c / u for c, u in zip(times["cache"], times["uncompressed"])]
    return {
        "batch": batch,
        "length": length,
        "top_k": cache.top_k,
        "rounds": rounds,
        "ms_median": 1e3 * statistics.median(times["cache"]),
        "ms_p90": 1e3 * float(np.quantile(times["cache"], 0.9)),
        "cpu_ms_median": 1e3 * statistics.median(cpu_times["cache"]),
        "uncompressed_cpu_ms_median": 1e3 * statistics.median(cpu_times["uncompressed"]),
        "uncompressed_ms_median": 1e3 * statistics.median(times["uncompressed"]),
        "over_uncompressed_median": statistics.median(ratios),
        "uncompressed_bytes_per_position": cache.top_k * 8,
    }


def step_timing(cache: TokenCache, packed: list[np.ndarray], vocab: int, rounds: int, seed: int) -> dict[str, Any]:
    """A distillation step of a student from the cache (sparse top-k KD + CE, chunked, through `distill.lm.lm_terms`,
    cache decode included), the same step with the teacher's outputs already in memory, and a plain fine-tuning step
    of the same student (full logits, cross-entropy), on the same batch of 8 x 512 tokens, timed side by side: each
    round times all three, each first in turn, in wall-clock and in CPU time (one thread: the process's CPU time is
    the step's work; on a shared machine the wall clock also holds the time other processes held the core, and the
    target is checked on the CPU time). Also the CPU time of the cache's decode alone (`TokenCache.batch` of the same
    8 sequences) over the plain step's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from distill.config import LossConfig
    from distill.lm import lm_terms
    from distill.lm_data import LMDataset

    data = LMDataset([p.tolist() for p in packed[:8]], [0] * min(8, len(packed)), pad_id=0)
    batch = data.batch(torch.arange(len(data)))
    config = GPT2Config(vocab_size=vocab, n_positions=512, n_embd=256, n_layer=4, n_head=4)
    torch.manual_seed(seed)
    student = GPT2LMHeadModel(config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-4, foreach=True)
    loss = LossConfig(temperature=cache.temperature, alpha=0.5, chunk_size=1024)

    def plain() -> None:
        logits = student(**batch["inputs"]).logits  # (B, T, V)
        value = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()

    decoded = cache.batch(np.arange(len(data)), int(batch["inputs"]["input_ids"].shape[1]))

    def distill(teacher: Any = cache) -> None:
        terms, weights = lm_terms(student, batch, teacher, loss, fused=True)  # as `train` without accumulation
        value = sum(weights[k] * terms[k] for k in terms)
        optimizer.zero_grad(set_to_none=True)
        value.backward()  # type: ignore[union-attr]
        optimizer.step()

    def in_memory() -> None:  # the same step, its teacher's outputs decoded beforehand: the loss without the cache
        distill(lambda _: decoded)

    student.train()
    plain(), distill(), in_memory()  # warm-up
    times: dict[str, list[float]] = {"plain": [], "distill": [], "in_memory": []}
    cpu_times: dict[str, list[float]] = {"plain": [], "distill": [], "in_memory": [], "decode": []}
    steps = [("plain", plain), ("distill", distill), ("in_memory", in_memory)]
    for r in range(rounds):
        for name, fn in steps[r % 3 :] + steps[: r % 3]:  # each step first in turn
            start, cpu = time.perf_counter(), time.process_time()
            fn()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu)
        cpu = time.process_time()
        cache.batch(np.arange(len(data)), int(batch["inputs"]["input_ids"].shape[1]))
        cpu_times["decode"].append(time.process_time() - cpu)
    ratios = [d / p for d, p in zip(times["distill"], times["plain"])]
    cpu_ratios = [d / p for d, p in zip(cpu_times["distill"], cpu_times["plain"])]
    decode_share = [d / p for d, p in zip(cpu_times["decode"], cpu_times["plain"])]
    memory_ratios = [d / p for d, p in zip(cpu_times["in_memory"], cpu_times["plain"])]
    return {
        "student": f"GPT-2, 4 layers, 256 wide, {sum(p.numel() for p in student.parameters()) / 1e6:.2f} M parameters",
        "batch": "8 x 512 tokens",
        "top_k": cache.top_k,
        "plain_seconds": times["plain"],
        "distill_seconds": times["distill"],
        "ratio_median": statistics.median(ratios),
        "ratios": ratios,
        "plain_cpu_seconds": cpu_times["plain"],
        "distill_cpu_seconds": cpu_times["distill"],
        "decode_cpu_seconds": cpu_times["decode"],
        "cpu_ratio_median": statistics.median(cpu_ratios),
        "cpu_ratios": cpu_ratios,
        "decode_over_plain_cpu_median": statistics.median(decode_share),
        "in_memory_cpu_seconds": cpu_times["in_memory"],
        "in_memory_cpu_ratio_median": statistics.median(memory_ratios),
        "target": TARGETS["training_step"],
        "met": statistics.median(cpu_ratios) <= TARGETS["training_step"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "sst2", help="SST-2 folder")
    parser.add_argument("--train-seconds", type=float, default=150.0, help="how long the teacher LM trains (CPU)")
    parser.add_argument("--vocab", type=int, default=2048, help="BPE vocabulary size (<= 65,536: uint16 ids)")
    parser.add_argument("--context", type=int, default=64, help="training window of the teacher LM, tokens")
    parser.add_argument("--top-k", type=int, nargs="+", default=[64, 128])
    parser.add_argument(
        "--temperatures", type=float, nargs="+", default=[1.0, 0.5], help="cache temperatures (0.5: sharper outputs)"
    )
    parser.add_argument("--rounds", type=int, default=50, help="decode timing rounds")
    parser.add_argument("--step-rounds", type=int, default=16, help="training-step timing rounds")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (the machine is shared)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not (args.data / "train.tsv").exists():
        parser.error(f"no SST-2 train.tsv under {args.data}; point --data at the folder that holds it")

    train_text = sentences(args.data / "train.tsv")
    held_out = sentences(args.data / "test.tsv")
    tokenizer = train_tokenizer(train_text, args.vocab)
    eos = tokenizer.token_to_id("<eos>")
    vocab = tokenizer.get_vocab_size()

    def encode(texts: list[str]) -> list[np.ndarray]:
        return [np.array([eos, *e.ids, eos], np.int64) for e in tokenizer.encode_batch(texts)]

    stream = np.concatenate(encode(train_text))
    model, training = train_lm(stream, vocab, args.context, args.train_seconds, args.seed)
    teacher = causal_lm_logits(model)
    evaluation = encode(held_out)  # every position but the last is scored: the next token is known
    packed_text = np.concatenate(encode(sentences(args.data / "dev.tsv") + held_out))
    packed = [packed_text[i : i + 512] for i in range(0, len(packed_text) - 511, 512)]

    workdir = Path(tempfile.mkdtemp(prefix="lm_cache_"))
    identity = {"teacher_name": "sst2-gpt2-tiny", "teacher_revision": str(args.seed), "vocab_size": vocab}
    identity["tokenizer_hash"] = hashlib.sha256(tokenizer.to_str().encode()).hexdigest()
    with torch.no_grad():
        logits = [model(input_ids=torch.from_numpy(seq)[None]).logits[0, :-1] for seq in evaluation]  # (T-1, V) each
    rows = {}
    for temperature in args.temperatures:
        for k in args.top_k:
            directory = workdir / f"k{k}-t{temperature}"
            start = time.perf_counter()
            build_token_cache(
                teacher, evaluation, directory, top_k=k, temperature=temperature, data_id="sst2-test", **identity
            )
            seconds = time.perf_counter() - start
            summary = verify_token_cache(directory)
            measured = exactness(logits, TokenCache(directory), k, temperature)
            parts = breakdown(TokenCache(directory), summary)
            rows[f"k{k}_t{temperature}"] = {
                **summary,
                "temperature": temperature,
                "build_seconds": seconds,
                **parts,
                **measured,
            }
    decode_k = max(args.top_k)
    build_token_cache(teacher, packed, workdir / "packed", top_k=decode_k, data_id="sst2-dev-test-512", **identity)
    decode = decode_timing(TokenCache(workdir / "packed"), workdir, args.rounds, 8, args.seed)

    training_step = step_timing(TokenCache(workdir / "packed"), packed, vocab, args.step_rounds, args.seed)

    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    distributions = (
        f"GPT-2 (2 layers, 128 wide, {parameters:.2f} M parameters) trained from scratch for {training['seconds']:.0f} s "
        f"({training['steps']} steps, final training loss {training['final_loss']:.2f}) on the SST-2 train.tsv "
        f"sentences, with a byte-level BPE tokenizer ({vocab} tokens) trained on the same text; the caches score the "
        f"{len(evaluation)} held-out SST-2 test.tsv sentences, all positions but the last, at each temperature "
        "(0.5 sharpens the same logits, closer to a large LM's confidence); KL against the live model's float64 "
        "log-probs of the same positions"
    )
    print(f"distributions: {distributions}\n")
    columns = ["k", "T", "positions", "top-1 p", "entropy", "top-k mass", "bytes/pos", "KL mean", "KL p99", "KL max"]
    print("".join(f"{c:>11}" for c in columns) + f"{'bound':>11}")
    for row in rows.values():
        print(
            f"{row['top_k']:>11}{row['temperature']:>11}{row['positions']:>11}{row['teacher_top1_prob_mean']:>11.3f}"
            f"{row['teacher_entropy_nats_mean']:>11.2f}{row['teacher_top_k_mass_mean']:>11.4f}"
            f"{row['bytes_per_position']:>11.1f}{row['kl_mean']:>11.2e}{row['kl_p99']:>11.2e}{row['kl_max']:>11.2e}"
            f"{row['kl_bound']:>11.2e}"
        )
    for name, row in rows.items():
        parts = ", ".join(f"{part} {size:.1f}" for part, size in row["bytes_per_position_parts"].items())
        print(f"  {name} bytes/position: {parts}; the version-1 format: {row['bytes_per_position_format_v1']:.1f}")
    print(
        f"\ndecode of 8 sequences x 512 positions at k = {decode_k} (TokenCache.batch, {args.threads} thread(s)): "
        f"median {decode['ms_median']:.2f} ms (CPU time {decode['cpu_ms_median']:.2f} ms), p90 "
        f"{decode['ms_p90']:.2f} ms over {args.rounds} rounds; "
        f"reading the same positions uncompressed (float32 + int32, {decode['uncompressed_bytes_per_position']} "
        f"bytes/position): {decode['uncompressed_ms_median']:.2f} ms; cache / uncompressed, median of per-round "
        f"ratios: {decode['over_uncompressed_median']:.2f}"
    )
    print(
        f"training step, {training_step['student']}, {training_step['batch']}: distillation from the cache / plain "
        f"fine-tuning, median of per-round ratios: CPU time {training_step['cpu_ratio_median']:.3f} (target <= "
        f"{TARGETS['training_step']}), wall clock {training_step['ratio_median']:.3f}; the cache's decode alone: "
        f"{training_step['decode_over_plain_cpu_median']:.4f} of a plain step's CPU time; the same distillation step "
        f"with the teacher's outputs already in memory (no cache read): CPU time "
        f"{training_step['in_memory_cpu_ratio_median']:.3f} of a plain step's"
    )
    at_128 = [row["bytes_per_position"] for row in rows.values() if row["top_k"] == 128]
    met = {
        "bytes_per_position_k128": max(at_128) <= TARGETS["bytes_per_position_k128"] if at_128 else None,
        "kl_mean": all(row["kl_mean"] < TARGETS["kl_mean"] for row in rows.values()),
        "training_step": training_step["met"],
    }
    print(
        f"targets: bytes/position at k=128 <= {TARGETS['bytes_per_position_k128']:.0f}: "
        f"{met['bytes_per_position_k128']}; KL mean < {TARGETS['kl_mean']:.0e}: {met['kl_mean']}; training step "
        f"<= {TARGETS['training_step']}: {met['training_step']}"
    )

    RESULTS.mkdir(exist_ok=True)
    result = {
        "benchmark": "lm_cache",
        "command": "python benchmarks/lm_cache.py " + " ".join(sys.argv[1:]),
        "distributions": distributions,
        "settings": {**vars(args), "data": str(args.data), "vocab_size": vocab},
        "teacher_training": training,
        "measurements": rows,
        "decode": decode,
        "training_step": training_step,
        "targets": TARGETS,
        "met": met,
        "machine": {
            "cpu_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
        },
    }
    (RESULTS / "lm_cache.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'lm_cache.json'}")
    shutil.rmtree(workdir)


if __name__ == "__main__":
    main()
