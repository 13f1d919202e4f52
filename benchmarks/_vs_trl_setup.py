"""The shared material of benchmarks/vs_trl.py, built once per vocabulary by the parent process: a word-level
tokenizer of exactly V tokens, a GPT-2 teacher (4 layers, 256 wide) and student (2 layers, 128 wide) built from
their configs with random weights (dropout off, as TRL's GKD trainer sets it), both saved with the tokenizer, the
training rows (JSONL prompt/completion of random tokens, `prompt` + `completion` tokens each) and the order of the
batches (distill's first epoch: the TRL side reads its rows in that order, so both first steps see one batch)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

EOS, UNK = "<eos>", "<unk>"  # ids 0 and 1; the rows use ids 2 .. V - 1
TEACHER = (4, 256, 4)  # layers, width, heads
STUDENT = (2, 128, 2)


def tokenizer(vocab: int) -> Any:
    """A whitespace word-level tokenizer whose V tokens are <eos>, <unk>, t2 .. t{V-1}."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {EOS: 0, UNK: 1} | {f"t{i}": i for i in range(2, vocab)}
    inner = Tokenizer(models.WordLevel(words, unk_token=UNK))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=inner, eos_token=EOS, pad_token=EOS, unk_token=UNK)


def gpt2(vocab: int, positions: int, shape: tuple[int, int, int], seed: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    layers, width, heads = shape
    config = GPT2Config(vocab_size=vocab, n_positions=positions, n_layer=layers, n_embd=width, n_head=heads,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                        pad_token_id=0)  # fmt: skip
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def rows(count: int, prompt: int, completion: int, vocab: int, seed: int) -> list[dict[str, str]]:
    """`count` prompt/completion rows of uniformly random tokens t2 .. t{V-1}."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (count, prompt + completion), generator=g).tolist()
    return [{"prompt": " ".join(f"t{i}" for i in r[:prompt]), "completion": " ".join(f"t{i}" for i in r[prompt:])}
            for r in ids]  # fmt: skip


def paths(folder: Path) -> dict[str, Path]:
    """Where `build` writes (and `distill cache build` its cache)."""
    names = {"teacher": "teacher", "student": "student", "data": "train.jsonl", "order": "order.json",
             "shape": "shape.json", "cache": "cache"}  # fmt: skip
    return {key: folder / name for key, name in names.items()}


def build(folder: Path, vocab: int, count: int, prompt: int, completion: int, batch: int) -> dict[str, Path]:
    """Tokenizer, teacher, student, `count` rows and their batch order for one vocabulary under `folder`."""
    from distill.data import epoch_order
    from distill.lm_data import read_examples, tokenize_examples

    folder.mkdir(parents=True, exist_ok=True)
    words, found = tokenizer(vocab), paths(folder)
    length = prompt + completion
    parameters = {}
    for name, shape, seed in (("teacher", TEACHER, 2), ("student", STUDENT, 1)):
        model = gpt2(vocab, 2 * length, shape, seed)
        parameters[name] = sum(p.numel() for p in model.parameters())
        model.save_pretrained(found[name])
        words.save_pretrained(found[name])
    found["data"].write_text("".join(json.dumps(r) + "\n" for r in rows(count, prompt, completion, vocab, seed=3)))
    data = tokenize_examples(words, read_examples(found["data"], words), max_length=length)
    if int(data.lengths.min()) != length or int(data.lengths.max()) != length:
        raise RuntimeError(f"the rows did not tokenize to {length} tokens each")
    order = epoch_order(len(data), batch, seed=0, epoch=0, lengths=data.lengths)  # distill's first epoch
    found["order"].write_text(json.dumps(torch.cat(order).tolist()))
    sizes = {"vocab": vocab, "prompt": prompt, "length": length, "rows": count, "parameters": parameters}
    found["shape"].write_text(json.dumps(sizes))
    return found
