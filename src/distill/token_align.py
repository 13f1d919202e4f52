"""Cross-tokenizer alignment for token-level distillation when teacher and student have different tokenizers.

Both tokenizers cut the *same text* into tokens, so the two token sequences are compared in the only coordinate they
share: byte offsets into that text (its UTF-8). Every token stands for an exact byte string (`token_bytes`), a
token's offset is the total length of the tokens before it, and a student token is aligned (`align`) with the
teacher token that starts at the same offset. At such a position both models have seen exactly the same bytes, so
the teacher's next-token distribution there is a valid target for the student's.

That distribution lives on the teacher's vocabulary. It is carried to the student's (`vocab_map`, `carry_top_k`)
where a teacher token and a student token are the same byte string; the teacher mass on tokens with no student
counterpart goes to id -1 ("no token"), which the sparse loss counts in its tail bucket.

Supported tokenizers (Hugging Face fast tokenizers):

* byte-level BPE (GPT-2, Llama-3, Qwen): every character of a token string is one byte through GPT-2's
  `bytes_to_unicode` table;
* SentencePiece style (Llama-2, Mistral, T5-like unigram, `Metaspace`): "▁" stands for a space, a byte-fallback
  token `<0xNN>` for the single byte NN, any other character for its UTF-8.

Special and control tokens (BOS, EOS, PAD, ...) stand for no bytes (None). SentencePiece tokenizers add a space in
front of the text that byte-level ones do not; `align` drops that one extra leading space before comparing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor

from distill.errors import DistillError
from distill.losses import LOG_FLOOR

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerFast

SPECIAL_ROLES = ("eos", "bos", "pad", "unk")  # special tokens mapped teacher -> student by role, in this order
_METASPACE = "▁"  # U+2581, SentencePiece's stand-in for a space
_NOT_A_BYTE = "\uffff"  # stands in for a character that is no entry of the byte-level table
_COMPARE_CHUNK = 4096  # bytes compared at once when looking for the first difference of two texts


# ----------------------------------------------------------------------------------------------------------------
# Token -> bytes
# ----------------------------------------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible table from each byte 0..255 to a printable character (byte-level BPE token strings)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


def _dicts(section: Any) -> Iterator[dict[str, Any]]:
    """Every dict inside one section of a tokenizer's JSON, including those nested in `Sequence`s."""
    if isinstance(section, dict):
        yield section
        for value in section.values():
            yield from _dicts(value)
    elif isinstance(section, list):
        for value in section:
            yield from _dicts(value)


def _byte_level_piece() -> Callable[[str], bytes | None]:
    """Token string -> bytes for byte-level BPE; a character outside the table means a token no text produces."""
    table = {ord(char): chr(b) for b, char in _bytes_to_unicode().items()}  # char -> the latin-1 char of its byte
    table.update({c: _NOT_A_BYTE for c in range(256) if c not in table})

    def piece(token: str) -> bytes | None:
        try:
            return token.translate(table).encode("latin-1")
        except UnicodeEncodeError:
            return None

    return piece


def _sentencepiece_piece(replacement: str) -> Callable[[str], bytes | None]:
    """Token string -> bytes for SentencePiece style: `replacement` is a space, `<0xNN>` is the byte NN."""

    def piece(token: str) -> bytes | None:
        if len(token) == 6 and token.startswith("<0x") and token.endswith(">"):
            try:
                return bytes([int(token[3:5], 16)])
            except ValueError:
                pass
        return token.replace(replacement, " ").encode("utf-8")

    return piece


def _pipeline(backend: Any) -> dict[str, Any]:
    """The model type and the normalizer, pre-tokenizer and decoder sections of a tokenizer's JSON.

    Read part by part: the full JSON (`to_str()`) would also serialize and parse the vocabulary and merges.
    """
    spec: dict[str, Any] = {"model": {"type": type(backend.model).__name__}}
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        part = getattr(backend, key)
        spec[key] = None if part is None else json.loads(part.__getstate__())
    return spec


def _piece_decoder(spec: dict[str, Any]) -> Callable[[str], bytes | None]:
    """Pick the token-string decoder from a tokenizer's JSON (as `_pipeline` gives it), or say why there is none."""
    parts = [d for key in ("normalizer", "pre_tokenizer", "decoder") for d in _dicts(spec.get(key))]
    types = {d.get("type") for d in parts}
    model_type = (spec.get("model") or {}).get("type")
    if model_type in ("BPE", "Unigram") and "ByteLevel" in types:
        return _byte_level_piece()
    metaspace = [d for d in parts if d.get("type") == "Metaspace"]
    replaces = any(d.get("type") == "Replace" and _METASPACE in json.dumps(d, ensure_ascii=False) for d in parts)
    if model_type in ("BPE", "Unigram") and (metaspace or replaces or "ByteFallback" in types):
        return _sentencepiece_piece(metaspace[0].get("replacement", _METASPACE) if metaspace else _METASPACE)
    pre = sorted(str(t) for t in types if t)
    raise DistillError(
        f"tokenizer with model {model_type} and pre-tokenizer/decoder {pre or 'none'} is not supported: "
        "cross-tokenizer alignment supports byte-level BPE and SentencePiece-style tokenizers"
    )


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> list[bytes | None]:
    """For each id in range(len(tokenizer)), the exact bytes the token stands for in text; None for special tokens.

    Non-special added tokens stand for their content's UTF-8. Raises DistillError for WordPiece or unknown schemes.
    """
    backend = tokenizer.backend_tokenizer
    piece = _piece_decoder(_pipeline(backend))
    tokens = map(backend.id_to_token, range(len(tokenizer)))
    pieces = [None if token is None else piece(token) for token in tokens]
    for i, token in backend.get_added_tokens_decoder().items():
        if i < len(pieces):
            pieces[i] = None if token.special else token.content.encode("utf-8")
    for i in tokenizer.all_special_ids:
        pieces[i] = None
    return pieces


def text_bytes(pieces: Sequence[bytes | None]) -> bytes:
    """The text a token sequence stands for, as bytes (special tokens stand for nothing)."""
    return b"".join(piece for piece in pieces if piece is not None)


def decode_pieces(pieces: Sequence[bytes | None]) -> str:
    """The text a token sequence stands for; invalid UTF-8 (a token sequence cut mid-character) becomes U+FFFD."""
    return text_bytes(pieces).decode("utf-8", errors="replace")


# ----------------------------------------------------------------------------------------------------------------
# Teacher vocabulary -> student vocabulary
# ----------------------------------------------------------------------------------------------------------------


def _preferred_ids(tokenizer: PreTrainedTokenizerFast, pieces: list[bytes | None]) -> dict[bytes, int]:
    """Bytes -> the one id that stands for them: the lowest, except that a byte-fallback token `<0xNN>` gives way
    to a regular token for the same byte (a SentencePiece tokenizer emits `<0xNN>` only where none covers it)."""
    backend = tokenizer.backend_tokenizer
    fallback: list[tuple[int, bytes]] = []  # (id, its one byte) of each byte-fallback token, lowest id first
    for b in range(256):
        j = backend.token_to_id(f"<0x{b:02X}>")
        piece = pieces[j] if j is not None and j < len(pieces) else None
        if j is not None and piece is not None and len(piece) == 1:
            fallback.append((j, piece))
    regular = list(pieces)
    for j, _ in fallback:
        regular[j] = None
    preferred = dict(zip(reversed(regular), range(len(regular) - 1, -1, -1)))  # the lowest id is written last
    preferred.pop(None, None)
    for j, piece in sorted(fallback):
        preferred.setdefault(piece, j)
    return cast("dict[bytes, int]", preferred)


@dataclass(frozen=True)
class VocabMap:
    """Teacher id -> student id of the token with exactly the same bytes (special tokens by role), else -1."""

    student_ids: Tensor  # (V_t,) long
    mapped: int  # how many teacher ids have a student counterpart
    teacher_size: int
    student_size: int


def vocab_map(teacher_tokenizer: PreTrainedTokenizerFast, student_tokenizer: PreTrainedTokenizerFast) -> VocabMap:
    """The exact, injective map between tokens with equal bytes, plus the eos, bos, pad and unk tokens by role.

    Where several ids on one side have equal bytes the lowest id is kept, except that a byte-fallback token
    `<0xNN>` gives way to a regular token for the same byte. Other special tokens stay unmapped.
    """
    teacher_pieces, student_pieces = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    student_of = _preferred_ids(student_tokenizer, student_pieces)
    out = [-1] * len(teacher_pieces)
    for piece, i in _preferred_ids(teacher_tokenizer, teacher_pieces).items():
        out[i] = student_of.get(piece, -1)
    used = {j for j in out if j >= 0}
    for role in SPECIAL_ROLES:
        i, j = getattr(teacher_tokenizer, f"{role}_token_id"), getattr(student_tokenizer, f"{role}_token_id")
        if i is not None and j is not None and i < len(out) and out[i] < 0 and j not in used:
            out[i] = j
            used.add(j)
    return VocabMap(
        student_ids=torch.tensor(out, dtype=torch.long),  # (V_t,)
        mapped=len(used),
        teacher_size=len(teacher_pieces),
        student_size=len(student_pieces),
    )


def carry_top_k(teacher_logprobs: Tensor, teacher_ids: Tensor, student_ids: Tensor) -> tuple[Tensor, Tensor]:
    """Carry a teacher's top-K to the student vocabulary through `VocabMap.student_ids`.

    teacher_logprobs, teacher_ids: (N, K); student_ids: (V_t,). Returns log-probs and student ids, both (N, K).
    An entry whose teacher id has no student counterpart (or is padding -1, or lies outside the map, e.g. a padded
    logit row past the tokenizer) becomes id -1 with log-prob LOG_FLOOR; mapped entries keep their log-prob.
    """
    if teacher_logprobs.shape != teacher_ids.shape or teacher_ids.dim() != 2 or student_ids.dim() != 1:
        raise ValueError(
            f"expected (N, K) log-probs and ids and a (V_t,) map, got {tuple(teacher_logprobs.shape)}, "
            f"{tuple(teacher_ids.shape)} and {tuple(student_ids.shape)}"
        )
    table = student_ids.to(device=teacher_ids.device, dtype=torch.long)  # (V_t,)
    inside = (teacher_ids >= 0) & (teacher_ids < table.numel())  # (N, K)
    carried = table[teacher_ids.clamp(0, max(table.numel() - 1, 0))]  # (N, K)
    carried = torch.where(inside, carried, torch.full_like(carried, -1))  # (N, K)
    logprobs = torch.where(carried >= 0, teacher_logprobs, torch.full_like(teacher_logprobs, LOG_FLOOR))  # (N, K)
    return _merge_duplicates(logprobs, carried)


def _merge_duplicates(logprobs: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Entries of a row (N, K) carried to the same student id (a many-to-one map) summed into the first of them,
    the others emptied (id -1, LOG_FLOOR); rows without duplicates come back unchanged."""
    rows, k = ids.shape
    width = (int(ids.max()) if ids.numel() else 0) + 2  # keys: row * width + id + 1, distinct per (row, id)
    keys = torch.arange(rows, device=ids.device)[:, None] * width + ids + 1  # (N, K)
    unique, inverse = torch.unique(keys.flatten(), return_inverse=True)  # (U,), (N*K,)
    if len(unique) == keys.numel():
        return logprobs, ids
    order = torch.arange(keys.numel(), device=ids.device)  # (N*K,)
    first = torch.full((len(unique),), keys.numel(), device=ids.device).scatter_reduce_(0, inverse, order, "amin")
    total = torch.zeros(len(unique), device=ids.device).scatter_add_(0, inverse, logprobs.flatten().float().exp())
    keep = (first[inverse] == order) & (ids.flatten() >= 0)  # (N*K,)
    merged = torch.where(keep, total[inverse].clamp_min(1e-45).log(), torch.full_like(total[inverse], LOG_FLOOR))
    kept_ids = torch.where(keep, ids.flatten(), torch.full_like(ids.flatten(), -1))
    return merged.clamp_min(LOG_FLOOR).view(rows, k).to(logprobs.dtype), kept_ids.view(rows, k)


def prefix_map(teacher_tokenizer: PreTrainedTokenizerFast, student_tokenizer: PreTrainedTokenizerFast) -> VocabMap:
    """`vocab_map`, with each teacher token that has no twin sent to the student token of its longest byte prefix
    (the student's first token where it spells those bytes; many teacher tokens to one student token), so the
    mass the teacher gives a word the student spells in pieces goes to the piece the student would start it with,
    not to the tail. Teacher tokens with no student prefix at all stay unmapped."""
    exact = vocab_map(teacher_tokenizer, student_tokenizer)
    teacher_pieces, student_pieces = token_bytes(teacher_tokenizer), token_bytes(student_tokenizer)
    student_of = _preferred_ids(student_tokenizer, student_pieces)
    longest = max((len(piece) for piece in student_of), default=0)
    out = exact.student_ids.tolist()
    for i, piece in enumerate(teacher_pieces):
        if out[i] >= 0 or not piece:
            continue
        for length in range(min(len(piece), longest), 0, -1):
            j = student_of.get(piece[:length])
            if j is not None:
                out[i] = j
                break
    return VocabMap(torch.tensor(out, dtype=torch.long), sum(j >= 0 for j in out), exact.teacher_size,
                    exact.student_size)  # fmt: skip


# ----------------------------------------------------------------------------------------------------------------
# Teacher tokens <-> student tokens of the same text
# ----------------------------------------------------------------------------------------------------------------


def _leading_spaces(text: bytes) -> int:
    return len(text) - len(text.lstrip(b" "))


def _drop_first_byte(pieces: list[bytes | None]) -> list[bytes | None]:
    """The same tokens with the first byte of the text removed from the first token that has bytes."""
    out = list(pieces)
    for k, piece in enumerate(out):
        if piece:
            out[k] = piece[1:]
            break
    return out


def _common_prefix_len(a: bytes, b: bytes) -> int:
    """Length of the longest common prefix of two byte strings, in O(len) (chunks compared in C)."""
    n = min(len(a), len(b))
    for start in range(0, n, _COMPARE_CHUNK):
        stop = min(start + _COMPARE_CHUNK, n)
        if a[start:stop] != b[start:stop]:
            return next(k for k in range(start, stop) if a[k] != b[k])
    return n


def _starts(pieces: Sequence[bytes | None]) -> tuple[dict[int, int], dict[int, list[int]]]:
    """Byte offset -> index of the token with bytes starting there, and offset -> indices of special tokens there."""
    words: dict[int, int] = {}
    specials: dict[int, list[int]] = {}
    offset = 0
    for i, piece in enumerate(pieces):
        if piece is None:
            specials.setdefault(offset, []).append(i)
        elif piece:
            words[offset] = i
            offset += len(piece)
    return words, specials


def align(teacher_pieces: Sequence[bytes | None], student_pieces: Sequence[bytes | None]) -> list[int]:
    """For each student token, the index of the teacher token that starts at the same byte offset, else -1.

    Both sequences tokenize the same text (each token's bytes, None for a special token, which takes zero bytes
    and aligns only with a special token of the other side at the same offset: the k-th there with the k-th). A
    token that starts after the first byte where the two texts differ gets -1, as does a token left with no bytes.
    If exactly one side has one more leading space (SentencePiece's prefix space), that space is dropped from that
    side's first token before aligning. O(n + m).
    """
    teacher, student = list(teacher_pieces), list(student_pieces)
    teacher_text, student_text = text_bytes(teacher), text_bytes(student)
    extra = _leading_spaces(teacher_text) - _leading_spaces(student_text)
    if extra == 1:
        teacher, teacher_text = _drop_first_byte(teacher), teacher_text[1:]
    elif extra == -1:
        student, student_text = _drop_first_byte(student), student_text[1:]
    limit = _common_prefix_len(teacher_text, student_text)
    words, specials = _starts(teacher)
    taken: dict[int, int] = {}  # offset -> special tokens of the student already aligned there
    out: list[int] = []
    offset = 0
    for piece in student:
        if piece is None:
            k = taken.get(offset, 0)
            taken[offset] = k + 1
            there = specials.get(offset, [])
            out.append(there[k] if offset <= limit and k < len(there) else -1)
        else:
            out.append(words.get(offset, -1) if piece and offset <= limit else -1)
            offset += len(piece)
    return out


def coverage(alignment: Sequence[int]) -> float:
    """Share of student positions aligned with a teacher token (0.0 for an empty sequence)."""
    return sum(i >= 0 for i in alignment) / len(alignment) if alignment else 0.0
