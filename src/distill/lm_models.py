"""Small language models built from scratch on local text: a byte-level BPE tokenizer trained on the texts and a
GPT-2 of a given size over it (the CPU recipes' teachers and students), and what their folders weigh."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.lm_data import LMDataset


def train_tokenizer(texts: list[str], vocab_size: int, directory: Path, digits: bool = False) -> Any:
    """A byte-level BPE tokenizer trained on `texts` (the `tokenizers` library), saved in `directory`; with `digits`,
    numbers are split into single digits before BPE (as Llama-3, Qwen and DeepSeek tokenizers do), so a model learns
    arithmetic digit by digit instead of memorising one token per number."""
    from tokenizers import ByteLevelBPETokenizer, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    if digits:
        bpe._tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
        )
    bpe.train_from_iterator(texts, vocab_size=vocab_size, min_frequency=2, special_tokens=["<|endoftext|>", "<pad>"])
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe._tokenizer,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<pad>",
        unk_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def train_unigram_tokenizer(texts: list[str], vocab_size: int, directory: Path) -> Any:
    """A SentencePiece-style tokenizer trained on `texts`, as Llama-2 and T5 have and GPT-2 does not: a unigram
    model over pieces where "▁" stands for a space (Metaspace, one before every word), and byte fallback (a
    character it has no piece for is spelled as <0xNN> byte tokens, never <unk>); saved in `directory`."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["</s>", "<pad>", "<unk>"]
    unigram = Tokenizer(models.Unigram())
    unigram.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
    trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 256, special_tokens=specials, unk_token="<unk>")
    unigram.train_from_iterator(texts, trainer)
    spec = json.loads(unigram.to_str())
    known = {piece for piece, _ in spec["model"]["vocab"]}
    spec["model"]["vocab"] += [[f"<0x{b:02X}>", -1e3] for b in range(256) if f"<0x{b:02X}>" not in known]
    spec["model"]["byte_fallback"] = True
    backend = Tokenizer.from_str(json.dumps(spec))
    backend.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(), decoders.Strip(" ", 1, 0)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="</s>", bos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tokenizer.save_pretrained(directory)
    return tokenizer


def run_tokenizer(texts: list[str], vocab_size: int, folder: Path, resume: bool, kind: str = "bpe") -> Any:
    """A run's tokenizer in `folder` (`kind` bpe: byte-level BPE; bpe-digits: the same with numbers split into
    digits; unigram: SentencePiece-style): loaded when a resumed run trained it already, else trained on `texts`."""
    if resume and (folder / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast  # the folder holds the tokenizer alone (no model config)

        return PreTrainedTokenizerFast.from_pretrained(folder)
    if kind == "unigram":
        return train_unigram_tokenizer(texts, vocab_size, folder)
    return train_tokenizer(texts, vocab_size, folder, digits=kind == "bpe-digits")


def gpt2(tokenizer: Any, size: dict[str, int], max_length: int, seed: int) -> nn.Module:
    """A fresh GPT-2 of `size` (layers, width, heads) over `tokenizer`'s vocabulary, seeded."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=max_length + 8,
        n_embd=size["width"],
        n_layer=size["layers"],
        n_head=size["heads"],
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config)


def weights_bytes(directory: Path) -> int:
    """The bytes of a model folder's safetensors weights."""
    return sum(p.stat().st_size for p in Path(directory).glob("*.safetensors"))


def speed_inputs(data: LMDataset, rows: int = 16) -> tuple[dict[str, Any], dict[str, Any]]:
    """One example and a batch of `rows` examples of `data`, as model inputs (to time a model on)."""
    index = torch.arange(min(rows, len(data)))
    return data.batch(index[:1])["inputs"], data.batch(index)["inputs"]
