"""Is a teacher's top-k cache built through its server the local build's cache, and as fast to build?

A GPT-2 teacher (random init, output layer sharpened; a byte-level BPE vocabulary trained here on generated text;
each of `--teachers` LAYERSxWIDTH, the first the headline) scores a JSONL file of prompt/completion rows twice per
round, side by side and in alternating order:

    local     `hf.build_lm_cache` (`distill cache build --teacher`): the model in this process, one torch thread
    served    `served_cache.build_served_cache` (`distill cache build --base-url`) against `distill serve` of the
              same folder in a child process (one torch thread), the rows' token ids sent as prompts with
              `prompt_logprobs` (teacher-forced), `--concurrency` requests in flight

Reported: KL(local || served) at every cached position (`cache_compare.cache_kl`; target < 1e-4), the bytes per
cached token of each cache (the record, which must match, and every file / positions: the served manifest says a
little more), rows/s and cached tokens/s of each build
(the tokenizer and model or client set-up included, as the CLI does it) and their ratio served / local per round
(target >= 0.8), with the CPU seconds the client and the server process spent per build, which say what limits the
served build. Writes benchmarks/results/served_cache.json.

    python benchmarks/served_cache.py [--rows 400] [--rounds 3] [--top-k 20] [--concurrency 32] [--teachers 4x256 8x512]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from _procstat import process_cpu
from distill.generate.client import TeacherClient
from distill.hf import build_lm_cache, load_tokenizer
from distill.lm_models import train_tokenizer
from distill.teachers.cache_compare import cache_kl
from distill.teachers.served_cache import build_served_cache
from distill.teachers.token_cache import TokenCache, verify_token_cache

RESULTS = Path(__file__).parent / "results"
TARGETS = {"kl_max": 1e-4, "throughput_ratio": 0.8}
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "te", "vi", "do", "pa", "zu", "fe", "gi", "ho", "ja", "qu", "wy", "xo"]


def corpus(words: int, sentences: int, seed: int) -> list[str]:
    """Sentences of pseudo-words drawn with Zipf frequencies (a vocabulary for BPE to learn a few thousand tokens)."""
    rng = random.Random(seed)
    lexicon = sorted({"".join(rng.choices(SYLLABLES, k=rng.randint(1, 4))) for _ in range(words)})
    weights = [1 / (rank + 1) for rank in range(len(lexicon))]
    out = []
    for _ in range(sentences):
        text = " ".join(rng.choices(lexicon, weights, k=rng.randint(4, 30)))
        out.append(text[0].upper() + text[1:] + rng.choice([".", "!", "?", ","]))
    return out


def make_teacher(directory: Path, vocab: int, layers: int, width: int, texts: list[str]) -> int:
    """A random GPT-2 over a BPE vocabulary trained on `texts`, saved in `directory`; returns its vocabulary size."""
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging

    logging.disable_progress_bar()
    tokenizer = train_tokenizer(texts, vocab, directory)
    config = GPT2Config(vocab_size=len(tokenizer), n_positions=512, n_embd=width, n_layer=layers, n_head=4,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        tie_word_embeddings=False)  # fmt: skip
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper than a random init, more like a trained LM's distributions
    model.save_pretrained(directory)
    return len(tokenizer)


def write_rows(path: Path, texts: list[str], rows: int, seed: int) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            prompt, completion = rng.sample(texts, 2)
            handle.write(json.dumps({"prompt": prompt, "completion": completion + " " + rng.choice(texts)}) + "\n")


def start_server(model: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "distill.cli", "serve", "--model", str(model), "--port", str(port),
               "--name", "teacher"]  # fmt: skip
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            pass
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise RuntimeError("distill serve did not start")
        time.sleep(0.2)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def build_local(model: Path, data: Path, out: Path, args: argparse.Namespace) -> dict[str, float]:
    cpu, start = time.process_time(), time.perf_counter()
    build_lm_cache(model, data, out, top_k=args.top_k, max_length=args.max_length, batch_size=args.batch_size)
    return {"seconds": time.perf_counter() - start, "client_cpu": time.process_time() - cpu, "server_cpu": 0.0}


def build_served(
    url: str, server_pid: int, model: Path, data: Path, out: Path, args: argparse.Namespace
) -> dict[str, float]:
    cpu, server_cpu, start = time.process_time(), process_cpu(server_pid) or 0.0, time.perf_counter()
    client = TeacherClient(url, "teacher", concurrency=args.concurrency, max_retries=0)
    summary = build_served_cache(client, data, load_tokenizer(model), out, top_k=args.top_k,
                                 max_length=args.max_length)  # fmt: skip
    seconds = time.perf_counter() - start
    if summary.scoring != "prompt_logprobs" or summary.rows_asked != args.rows:
        raise RuntimeError(f"the served build did not score every row with prompt_logprobs: {summary}")
    return {"seconds": seconds, "client_cpu": time.process_time() - cpu,
            "server_cpu": (process_cpu(server_pid) or 0.0) - server_cpu}  # fmt: skip


def one_round(index: int, work: Path, url: str, pid: int, model: Path, data: Path, args: argparse.Namespace) -> Any:
    """Both builds into fresh folders, in the order this round takes; their timings and folders."""
    order = ["local", "served"] if index % 2 == 0 else ["served", "local"]
    timings, folders = {}, {}
    for name in order:
        folders[name] = work / f"{name}-{index}"
        shutil.rmtree(folders[name], ignore_errors=True)
        if name == "local":
            timings[name] = build_local(model, data, folders[name], args)
        else:
            timings[name] = build_served(url, pid, model, data, folders[name], args)
    return timings, folders


def summarise(rounds: list[dict[str, Any]], folders: dict[str, Path], args: argparse.Namespace) -> dict[str, Any]:
    local, served = TokenCache(folders["local"]), TokenCache(folders["served"])
    kl = cache_kl(local, served)
    positions, sequences = int(local.manifest["positions"]), int(local.manifest["sequences"])
    out: dict[str, Any] = {"positions": positions, "sequences": sequences, "tokens": int(local.manifest["tokens"]),
                           "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
                           "identical_records": float(np.mean(np.concatenate(local.shards)
                                                              == np.concatenate(served.shards)))}  # fmt: skip
    for name, cache in (("local", folders["local"]), ("served", folders["served"])):
        seconds = [r[name]["seconds"] for r in rounds]
        out[name] = {
            "record_bytes": TokenCache(cache).codec.record_bytes,
            "bytes_per_token": verify_token_cache(cache)["bytes_per_position"],
            "top_k": TokenCache(cache).top_k,
            "rows_per_s": statistics.median(sequences / s for s in seconds),
            "tokens_per_s": statistics.median(positions / s for s in seconds),
            "client_cpu_ms_per_row": 1000 * statistics.median(r[name]["client_cpu"] for r in rounds) / sequences,
            "server_cpu_ms_per_row": 1000 * statistics.median(r[name]["server_cpu"] for r in rounds) / sequences,
        }
    ratios = [r["local"]["seconds"] / r["served"]["seconds"] for r in rounds]
    out["ratio"] = {"median": statistics.median(ratios), "min": min(ratios), "max": max(ratios), "rounds": ratios}
    out["passed"] = {"kl": out["kl_max"] < TARGETS["kl_max"],
                     "bytes": out["local"]["record_bytes"] == out["served"]["record_bytes"],
                     "throughput": out["ratio"]["median"] >= TARGETS["throughput_ratio"]}  # fmt: skip
    return out


def show(result: dict[str, Any]) -> None:
    table = Table(title=f"teacher top-{result['config']['top_k']} cache: local build vs through distill serve")
    for column in ("teacher", "build", "k", "record bytes", "bytes/token", "rows/s", "tokens/s", "client CPU ms/row",
                   "server CPU ms/row", "served / local", "KL mean", "KL max"):  # fmt: skip
        table.add_column(column, justify="right")
    for teacher, measured in result["teachers"].items():
        s = measured["summary"]
        for name in ("local", "served"):
            r, ratio = s[name], s["ratio"]
            spread = f"{ratio['median']:.2f} ({ratio['min']:.2f}-{ratio['max']:.2f})" if name == "served" else ""
            kl = (f"{s['kl_mean']:.1e}", f"{s['kl_max']:.1e}") if name == "served" else ("", "")
            table.add_row(teacher if name == "local" else "", name, str(r["top_k"]), str(r["record_bytes"]),
                          f"{r['bytes_per_token']:.2f}", f"{r['rows_per_s']:.1f}", f"{r['tokens_per_s']:,.0f}",
                          f"{r['client_cpu_ms_per_row']:.1f}", f"{r['server_cpu_ms_per_row']:.1f}", spread, *kl)  # fmt: skip
    Console(width=160).print(table)
    headline = result["teachers"][result["headline"]]["summary"]
    print(f"{result['headline']}: targets KL max < {TARGETS['kl_max']:.0e}: {headline['passed']['kl']}, record bytes "
          f"equal: {headline['passed']['bytes']}, served / local >= {TARGETS['throughput_ratio']}: "
          f"{headline['passed']['throughput']}")  # fmt: skip


def measure(teacher: str, work: Path, texts: list[str], args: argparse.Namespace) -> dict[str, Any]:
    """Rounds of both builds with the teacher LAYERSxWIDTH behind one `distill serve`."""
    layers, width = (int(x) for x in teacher.split("x"))
    model = work / f"teacher-{teacher}"
    vocab = make_teacher(model, args.vocab, layers, width, texts)
    port = free_port()
    server = start_server(model, port)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        build_local(model, work / "warm.jsonl", work / f"warm-local-{teacher}", args)
        warm = argparse.Namespace(**{**vars(args), "rows": 16})
        build_served(url, server.pid, model, work / "warm.jsonl", work / f"warm-served-{teacher}", warm)
        rounds, folders = [], {}
        for index in range(args.rounds):
            timings, folders = one_round(index, work, url, server.pid, model, work / "data.jsonl", args)
            rounds.append(timings)
    finally:
        server.kill()
        server.wait()
    return {"layers": layers, "width": width, "vocab_size": vocab, "rounds": rounds,
            "summary": summarise(rounds, folders, args)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8, help="the local build's batch")
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--teachers", nargs="+", default=["4x256", "8x512"], help="LAYERSxWIDTH of each teacher")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="served-cache-"))
    try:
        texts = corpus(3000, 20_000, seed=0)
        write_rows(work / "data.jsonl", texts, args.rows, seed=1)
        write_rows(work / "warm.jsonl", texts, 16, seed=2)
        result = {
            "config": {**vars(args), "torch_threads": 1, "server": "distill serve (child process)"},
            "machine": {
                "platform": platform.platform(),
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "torch": torch.__version__,
            },  # fmt: skip
            "targets": TARGETS,
            "headline": args.teachers[0],
            "teachers": {t: measure(t, work, texts, args) for t in args.teachers},
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "served_cache.json").write_text(json.dumps(result, indent=2))
    show(result)


if __name__ == "__main__":
    main()
