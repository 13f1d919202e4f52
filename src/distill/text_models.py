"""Text models around the transformers: a sentence encoder (transformer + mean pooling, as sentence-transformers),
and the small BiLSTM student of Tang et al. 2019 with its word vocabulary; saving and loading both.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from distill.errors import DistillError


class MeanPooling(nn.Module):
    """Mean of the token vectors over real tokens, optionally L2-normalised. (B, T, D), (B, T) -> (B, D)"""

    def __init__(self, normalize: bool = True):
        super().__init__()
        self.normalize = normalize

    def forward(self, hidden: Tensor, mask: Tensor) -> Tensor:
        weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
        pooled = (hidden * weights).sum(1) / weights.sum(1).clamp_min(1e-9)  # (B, D)
        return F.normalize(pooled, dim=-1) if self.normalize else pooled


class SentenceEncoder(nn.Module):
    """A Hugging Face encoder followed by mean pooling: the architecture of all-MiniLM-L6-v2.

    Module names for feature distillation: `transformer.<name in the HF model>` (e.g. transformer.encoder.layer.2)
    and `pool` (the sentence embedding).
    """

    transformer: Any  # a Hugging Face PreTrainedModel

    def __init__(self, transformer: nn.Module, normalize: bool = True):
        super().__init__()
        self.transformer = transformer
        self.pool = MeanPooling(normalize)

    @property
    def config(self) -> Any:
        return self.transformer.config

    def forward(self, input_ids: Tensor, attention_mask: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        hidden = self.transformer(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.pool(hidden, attention_mask)  # (B, D)

    def save(self, directory: Path, tokenizer: Any) -> None:
        """A folder that both transformers (`AutoModel`) and sentence-transformers (`SentenceTransformer`) load."""
        directory = Path(directory)
        self.transformer.save_pretrained(directory)
        tokenizer.save_pretrained(directory)
        width = int(self.config.hidden_size)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.pool.normalize:
            modules.append(
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
            )
            (directory / "2_Normalize").mkdir(exist_ok=True)
        (directory / "modules.json").write_text(json.dumps(modules, indent=2))
        (directory / "1_Pooling").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": width,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": True,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        (directory / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2))
        (directory / "sentence_bert_config.json").write_text(
            json.dumps({"max_seq_length": 256, "do_lower_case": False})
        )
        (directory / "config_sentence_transformers.json").write_text(json.dumps({"similarity_fn_name": "cosine"}))


# ----------------------------------------------------------------------------------------------------------------
# The BiLSTM student and its vocabulary
# ----------------------------------------------------------------------------------------------------------------

WORD = re.compile(r"\[mask\]|[a-z0-9]+(?:'[a-z]+)?|'[a-z]+|[^\sa-z0-9]")
PAD, UNK, MASK = "<pad>", "<unk>", "[mask]"  # [mask] is how augment.MASK_TOKEN reads once lower-cased


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks."""
    return WORD.findall(text.lower())


class WordVocab:
    """A word-level vocabulary: <pad> = 0, <unk> = 1, [mask] = 2, then words by frequency."""

    def __init__(self, tokens: Sequence[str]):
        self.tokens = list(tokens)
        self.index = {token: i for i, token in enumerate(self.tokens)}

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int = 20_000, min_count: int = 1) -> WordVocab:
        counts = Counter(word for text in texts for word in words(text))
        common = [w for w, c in counts.most_common(max_size) if c >= min_count and w not in (PAD, UNK, MASK)]
        return cls([PAD, UNK, MASK, *common])

    def __len__(self) -> int:
        return len(self.tokens)

    def encode(self, texts: Sequence[str], max_length: int = 128) -> list[list[int]]:
        unk = self.index[UNK]
        return [[self.index.get(w, unk) for w in words(text)][:max_length] or [unk] for text in texts]

    def save(self, path: Path) -> None:
        Path(path).write_text("\n".join(self.tokens) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> WordVocab:
        return cls(Path(path).read_text(encoding="utf-8").splitlines())


class BiLSTMClassifier(nn.Module):
    """Tang et al. 2019: word embeddings, one bidirectional LSTM layer, the two final states concatenated, a ReLU
    layer and the classifier. Takes the same keyword inputs as a transformer (`input_ids`, `attention_mask`)."""

    def __init__(
        self,
        vocab_size: int,
        num_classes: int,
        embed: int = 128,
        hidden: int = 150,
        dense: int = 200,
        dropout: float = 0.1,
    ):
        super().__init__()
        self.settings = {
            "vocab_size": vocab_size,
            "num_classes": num_classes,
            "embed": embed,
            "hidden": hidden,
            "dense": dense,
            "dropout": dropout,
        }
        self.embedding = nn.Embedding(vocab_size, embed, padding_idx=0)
        self.lstm = nn.LSTM(embed, hidden, batch_first=True, bidirectional=True)
        self.head = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * hidden, dense),
            nn.ReLU(),
            nn.Dropout(dropout),
            nn.Linear(dense, num_classes),
        )

    def forward(self, input_ids: Tensor, attention_mask: Tensor, **_: Any) -> Tensor:
        lengths = attention_mask.sum(-1).clamp_min(1).cpu()  # (B,)
        packed = nn.utils.rnn.pack_padded_sequence(
            self.embedding(input_ids), lengths, batch_first=True, enforce_sorted=False
        )
        _, (final, _) = self.lstm(packed)  # final: (2, B, H)
        return self.head(torch.cat([final[0], final[1]], dim=-1))  # (B, C)

    def save(self, directory: Path, vocab: WordVocab) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(directory / "model.safetensors"))
        (directory / "bilstm.json").write_text(json.dumps(self.settings, indent=2))
        vocab.save(directory / "vocab.txt")

    @classmethod
    def load(cls, directory: Path) -> tuple[BiLSTMClassifier, WordVocab]:
        directory = Path(directory)
        if not (directory / "bilstm.json").is_file():
            raise DistillError(f"{directory} is not a saved BiLSTM student (no bilstm.json)")
        model = cls(**json.loads((directory / "bilstm.json").read_text()))
        model.load_state_dict(load_file(str(directory / "model.safetensors")))
        return model.eval(), WordVocab.load(directory / "vocab.txt")
