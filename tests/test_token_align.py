"""Cross-tokenizer alignment on tokenizers trained here on a tiny corpus (no network)."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("tokenizers")
pytest.importorskip("transformers")

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from transformers import PreTrainedTokenizerFast  # noqa: E402

from distill.errors import DistillError  # noqa: E402
from distill.losses import LOG_FLOOR  # noqa: E402
from distill.token_align import (  # noqa: E402
    align,
    carry_top_k,
    coverage,
    decode_pieces,
    prefix_map,
    text_bytes,
    token_bytes,
    vocab_map,
)

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Knowledge distillation trains a small student to imitate a large teacher.",
    "hello world, café naïve, résumé, déjà vu, Über straße",
    "知识蒸馏 把大模型的知识 转移到小模型",
    "emoji 🙂 and 🚀 and 🙂🙂 in text",
    "  multiple   spaces\n\nnew\tlines\t\ttabs\r\n end",
    "def main():\n    return 42\n",
    "Numbers 1234567890 and symbols !@#$%^&*()_+-=[]{};:'\",.<>/?",
]
# Texts to tokenize: seen text, unseen characters (byte fallback on the SentencePiece side), whitespace runs.
TEXTS = [
    "hello world",
    "The lazy student imitates the teacher.",
    "café naïve déjà vu",
    "知识蒸馏很有用",
    "emoji 🙂🚀 here",
    "a  b   c\n\n\td",
    "unseen: € ß Ω 日本 ✓",
    " leading space",
    "\tleading tab",
    "x",
]
SP_BYTES = [f"<0x{b:02X}>" for b in range(256)]


def _fast(tokenizer: Tokenizer, eos: str, bos: str, **extra: str) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=eos, bos_token=bos, **extra)


def _byte_level(vocab_size: int, specials: list[str], eos: str, bos: str) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return _fast(tok, eos=eos, bos=bos)


def _sentencepiece_spec() -> dict:
    """A Metaspace BPE with byte fallback, laid out like Llama-2: specials, then <0x00>..<0xFF>, then the rest."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Metaspace(), decoders.ByteFallback()])
    specials = ["<unk>", "<s>", "</s>"]
    tok.train_from_iterator(CORPUS * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=specials))
    spec = json.loads(tok.to_str())
    vocab = {token: i for i, token in enumerate(specials + SP_BYTES)}
    for token, _ in sorted(spec["model"]["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(token, len(vocab))
    spec["model"].update(vocab=vocab, byte_fallback=True, unk_token=None)
    return spec


def _from_spec(spec: dict) -> PreTrainedTokenizerFast:
    return _fast(Tokenizer.from_str(json.dumps(spec)), eos="</s>", bos="<s>", unk_token="<unk>")


def _llama2_style(spec: dict) -> PreTrainedTokenizerFast:
    """The same model with Llama-2's normalizer (prepend and replace "▁") and decoder instead of Metaspace."""
    spec = json.loads(json.dumps(spec))
    replace = {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}
    spec["normalizer"] = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"}, replace]}
    spec["pre_tokenizer"] = None
    spec["decoder"] = {
        "type": "Sequence",
        "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"},
            {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0},
        ],
    }
    return _from_spec(spec)


@pytest.fixture(scope="module")
def toks() -> dict[str, PreTrainedTokenizerFast]:
    spec = _sentencepiece_spec()
    return {
        "bpe_a": _byte_level(450, ["<eos>", "<bos>"], eos="<eos>", bos="<bos>"),
        "bpe_b": _byte_level(330, ["<|pad|>", "</s>", "<s>"], eos="</s>", bos="<s>"),
        "sp": _from_spec(spec),
        "llama2": _llama2_style(spec),
    }


def _pieces(tok: PreTrainedTokenizerFast, text: str) -> list[bytes | None]:
    table = token_bytes(tok)
    return [table[i] for i in tok(text, add_special_tokens=False).input_ids]


# ----------------------------------------------------------------------------------------------------------------
# token_bytes
# ----------------------------------------------------------------------------------------------------------------


def test_byte_level_pieces_spell_the_text(toks):
    for name in ("bpe_a", "bpe_b"):
        for text in TEXTS:
            assert text_bytes(_pieces(toks[name], text)) == text.encode(), (name, text)
            assert decode_pieces(_pieces(toks[name], text)) == text


def test_byte_level_single_bytes_and_specials(toks):
    tok = toks["bpe_a"]
    table = token_bytes(tok)
    assert len(table) == len(tok)
    for token, byte in (("Ġ", b" "), ("Ċ", b"\n"), ("ĉ", b"\t"), ("A", b"A"), ("Ã", b"\xc3")):
        assert table[tok.convert_tokens_to_ids(token)] == byte
    assert table[tok.eos_token_id] is None and table[tok.bos_token_id] is None
    # every one of the 256 bytes has a token (the initial alphabet)
    assert {p for p in table if p is not None and len(p) == 1} == {bytes([b]) for b in range(256)}


def test_metaspace_pieces_spell_the_text_after_a_prefix_space(toks):
    for text in TEXTS:
        # Metaspace (prepend_scheme "always") adds "▁" in front unless the text already starts with a space
        expected = text.encode() if text.startswith(" ") else b" " + text.encode()
        assert text_bytes(_pieces(toks["sp"], text)) == expected, text
        # Llama-2's normalizer prepends "▁" unconditionally
        assert text_bytes(_pieces(toks["llama2"], text)) == b" " + text.encode(), text


def test_byte_fallback_tokens_give_their_byte(toks):
    tok = toks["sp"]
    table = token_bytes(tok)
    for b in (0x00, 0x41, 0xE2, 0xFF):
        assert table[tok.convert_tokens_to_ids(f"<0x{b:02X}>")] == bytes([b])
    ids = tok("€", add_special_tokens=False).input_ids  # "€" is not in the corpus: it falls back to its 3 bytes
    assert tok.convert_ids_to_tokens(ids)[-3:] == ["<0xE2>", "<0x82>", "<0xAC>"]
    assert text_bytes([table[i] for i in ids]) == " €".encode()
    assert table[tok.convert_tokens_to_ids("▁the")] == b" the"
    assert table[tok.unk_token_id] is None and table[tok.eos_token_id] is None


def test_non_special_added_token_is_its_text(toks):
    tok = _byte_level(300, ["<eos>", "<bos>"], eos="<eos>", bos="<bos>")
    tok.add_tokens(["<tool>", "Ωmega"])
    tok.add_special_tokens({"additional_special_tokens": ["<|ctrl|>"]})
    tok.add_tokens([AddedToken("<|control|>", special=True)])  # special, though in none of the special roles
    table = token_bytes(tok)
    assert table[tok.convert_tokens_to_ids("<tool>")] == b"<tool>"
    assert table[tok.convert_tokens_to_ids("Ωmega")] == "Ωmega".encode()
    assert table[tok.convert_tokens_to_ids("<|ctrl|>")] is None
    assert table[tok.convert_tokens_to_ids("<|control|>")] is None


def test_wordpiece_is_refused():
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(CORPUS, trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[UNK]", "[SEP]"]))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", eos_token="[SEP]")
    with pytest.raises(DistillError, match="WordPiece.*byte-level BPE and SentencePiece"):
        token_bytes(fast)


# ----------------------------------------------------------------------------------------------------------------
# align
# ----------------------------------------------------------------------------------------------------------------


def _assert_equal_spans(teacher, student, alignment):
    """Between consecutive aligned positions both sides spell the same bytes; aligned indices increase.

    The first span may differ by the one prefix space that `align` drops from one side.
    """
    pairs = [(i, j) for j, i in enumerate(alignment) if i >= 0]
    for k, ((i1, j1), (i2, j2)) in enumerate(zip(pairs, pairs[1:])):
        assert i1 < i2 and j1 < j2
        a, b = text_bytes(teacher[i1:i2]), text_bytes(student[j1:j2])
        assert a == b or k == 0 and (a == b" " + b or b" " + a == b), (teacher[i1:i2], student[j1:j2])


def _boundaries(pieces):
    offsets, offset = set(), 0
    for piece in pieces:
        if piece:
            offsets.add(offset)
            offset += len(piece)
    return offsets


@pytest.mark.parametrize(
    "pair", [("bpe_a", "bpe_b"), ("bpe_b", "bpe_a"), ("bpe_a", "sp"), ("sp", "bpe_b"), ("llama2", "bpe_a")]
)
def test_align_spans_spell_the_same_text(toks, pair):
    teacher_name, student_name = pair
    for text in TEXTS:
        teacher, student = _pieces(toks[teacher_name], text) + [None], _pieces(toks[student_name], text) + [None]
        alignment = align(teacher, student)
        assert len(alignment) == len(student)
        _assert_equal_spans(teacher, student, alignment)
        assert alignment[-1] == len(teacher) - 1, text  # the final EOS of both sides
        first = next(j for j, i in enumerate(alignment) if i >= 0)  # aligning starts at the start of the text
        assert text_bytes(student[:first]) in (b"", b" ") and text_bytes(teacher[: alignment[first]]) in (b"", b" ")
        if "sp" not in pair and "llama2" not in pair:  # same byte stream: every shared boundary is aligned
            shared = _boundaries(teacher) & _boundaries(student)
            assert sum(i >= 0 for i in alignment[:-1]) == len(shared), text


def test_align_byte_level_pair_covers_every_shared_boundary_with_multibyte_text(toks):
    text = "知识蒸馏 🙂 café"
    teacher, student = _pieces(toks["bpe_a"], text), _pieces(toks["bpe_b"], text)
    alignment = align(teacher, student)
    assert 0 < coverage(alignment) <= 1.0
    assert alignment[0] == 0
    starts = {o: i for i, o in enumerate(sorted(_boundaries(teacher)))}
    offset = 0
    for j, piece in enumerate(student):
        assert alignment[j] == starts.get(offset, -1)
        offset += len(piece)


def test_identical_tokenizations_align_to_themselves(toks):
    for name in toks:
        for text in TEXTS:
            pieces = [None] + _pieces(toks[name], text) + [None]
            alignment = align(pieces, pieces)
            assert alignment == list(range(len(pieces)))
            assert coverage(alignment) == 1.0


def test_align_stops_after_the_first_difference():
    # "hello world" vs "hello wide": same bytes up to offset 7, so tokens starting at offset <= 7 may align
    teacher = [b"he", b"llo", b" world", None]
    student = [b"hel", b"lo", b" w", b"ide", None]
    assert align(teacher, student) == [0, -1, 2, -1, -1]
    # a shared boundary after the difference does not align
    assert align([b"ab", b"cd", b"ef"], [b"ab", b"xd", b"ef"]) == [0, 1, -1]
    # so does a final EOS after different texts of the same length
    assert align([b"ab", None], [b"ax", None]) == [0, -1]


def test_align_drops_a_single_extra_leading_space():
    assert align([b"hello", b" world"], [b" hello", b" world"]) == [0, 1]
    assert align([b" hello", b" world"], [b"hello", b" world"]) == [0, 1]
    # SentencePiece's lone "▁" token is left with no bytes and aligns with nothing
    assert align([b"hello", b" world", None], [b" ", b"hello", b" world", None]) == [-1, 0, 1, 2]
    assert align([b" x", b"y"], [b" ", b" x", b"y"]) == [-1, 0, 1]  # Llama-2 on " x": "▁", "▁x", "y"
    assert align([b"  x", b"y"], [b" ", b" x", b"y"]) == [0, -1, 1]  # same leading spaces: nothing dropped


def test_specials_align_only_with_specials_at_the_same_offset():
    assert align([None, b"ab", None], [None, b"a", b"b", None]) == [0, 1, -1, 2]
    assert align([b"ab", None, None], [b"ab", None, None]) == [0, 1, 2]
    assert align([b"ab", None], [b"ab", None, None]) == [0, 1, -1]
    assert align([b"a", None, b"b"], [b"a", b"b", None]) == [0, 2, -1]


def test_coverage_and_text_helpers():
    assert coverage([]) == 0.0
    assert coverage([0, -1, 2, -1]) == 0.5
    assert text_bytes([None, b"caf", b"\xc3", b"\xa9", None]) == "café".encode()
    assert decode_pieces([b"caf", b"\xc3"]) == "caf\ufffd"


# ----------------------------------------------------------------------------------------------------------------
# vocab_map and carry_top_k
# ----------------------------------------------------------------------------------------------------------------


def test_vocab_map_of_identical_tokenizers_is_the_identity(toks):
    tok = toks["bpe_a"]
    m = vocab_map(tok, tok)
    assert torch.equal(m.student_ids, torch.arange(len(tok)))
    assert m.mapped == m.teacher_size == m.student_size == len(tok)


def test_vocab_map_between_different_bpes(toks):
    teacher, student = toks["bpe_a"], toks["bpe_b"]
    m = vocab_map(teacher, student)
    t_table, s_table = token_bytes(teacher), token_bytes(student)
    assert m.student_ids.shape == (len(teacher),) and m.student_ids.dtype == torch.long
    assert (m.teacher_size, m.student_size) == (len(teacher), len(student))
    ids = m.student_ids.tolist()
    mapped = [j for j in ids if j >= 0]
    assert len(set(mapped)) == len(mapped) == m.mapped  # injective
    for i, j in enumerate(ids):  # exactly the ids with equal bytes (each byte string is unique in a BPE vocab)
        if t_table[i] is not None:
            assert (j >= 0) == (t_table[i] in s_table)
            assert j < 0 or s_table[j] == t_table[i]
    for token in ("Ġ", "A", "Ã"):  # single bytes, by hand
        assert ids[teacher.convert_tokens_to_ids(token)] == student.convert_tokens_to_ids(token)
    assert 256 < m.mapped < len(teacher)  # all bytes and some merges map; the larger vocab has merges the other lacks
    assert teacher.eos_token_id != student.eos_token_id
    assert ids[teacher.eos_token_id] == student.eos_token_id
    assert ids[teacher.bos_token_id] == student.bos_token_id


def test_vocab_map_byte_level_to_sentencepiece(toks):
    teacher, student = toks["bpe_a"], toks["sp"]
    ids = vocab_map(teacher, student).student_ids.tolist()
    assert ids[teacher.convert_tokens_to_ids("Ġthe")] == student.convert_tokens_to_ids("▁the")
    # "T" exists both as a regular token and as <0x54>: the regular one, which the tokenizer emits, wins
    assert ids[teacher.convert_tokens_to_ids("T")] == student.convert_tokens_to_ids("T")
    # a byte that no regular student token covers maps to its byte-fallback token
    assert ids[teacher.convert_tokens_to_ids("Ã")] == student.convert_tokens_to_ids("<0xC3>")
    assert ids[teacher.eos_token_id] == student.eos_token_id
    # and back: the <0x54> is a second spelling of b"T", so it stays unmapped
    back = vocab_map(student, teacher).student_ids.tolist()
    assert back[student.convert_tokens_to_ids("T")] == teacher.convert_tokens_to_ids("T")
    assert back[student.convert_tokens_to_ids("<0x54>")] == -1
    assert back[student.convert_tokens_to_ids("<0xC3>")] == teacher.convert_tokens_to_ids("Ã")


def _synthetic_byte_level(tokens: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return _fast(tok, eos="<eos>", bos="<bos>")


def test_vocab_map_on_a_few_thousand_tokens():
    letters = "abcdefghijklmnopqrstuvwxyz"
    words = [a + b for a in letters for b in letters] + [
        "Ġ" + a + b + c for a in letters for b in letters for c in "aeiou"
    ]
    tokens = ["<eos>", "<bos>"] + sorted(pre_tokenizers.ByteLevel.alphabet()) + words
    teacher, student = _synthetic_byte_level(tokens), _synthetic_byte_level(tokens[:2] + tokens[:1:-1])
    assert len(teacher) == len(tokens) > 4000
    ids = vocab_map(teacher, student).student_ids.tolist()
    expected = [0, 1] + [len(tokens) - 1 - k + 2 for k in range(2, len(tokens))]
    assert ids == expected
    assert student.convert_ids_to_tokens(ids[teacher.convert_tokens_to_ids("Ġbee")]) == "Ġbee"


def test_carry_top_k_maps_and_floors():
    table = torch.tensor([2, -1, 0, 5, -1])  # (V_t,)
    logprobs = torch.tensor([[-0.1, -2.0, -3.0], [-0.5, -1.0, -200.0]])  # (N, K)
    ids = torch.tensor([[0, 1, 3], [4, 2, -1]])  # (N, K), -1 is padding
    out_logprobs, out_ids = carry_top_k(logprobs, ids, table)
    assert out_logprobs.shape == out_ids.shape == (2, 3)
    assert out_ids.tolist() == [[2, -1, 5], [-1, 0, -1]]
    assert out_logprobs.tolist() == [[pytest.approx(-0.1), LOG_FLOOR, -3.0], [LOG_FLOOR, -1.0, LOG_FLOOR]]
    # ids past the map (a padded logit row) are unmapped too
    _, past = carry_top_k(torch.zeros(1, 2), torch.tensor([[7, 2]]), table)
    assert past.tolist() == [[-1, 0]]
    with pytest.raises(ValueError, match="expected"):
        carry_top_k(torch.zeros(2, 3), torch.zeros(2, 4, dtype=torch.long), table)


def test_prefix_map_sends_a_word_the_student_lacks_to_its_longest_student_prefix(toks):
    teacher, student = toks["bpe_a"], toks["sp"]
    exact, prefix = vocab_map(teacher, student).student_ids.tolist(), prefix_map(teacher, student)
    t_table, s_table = token_bytes(teacher), token_bytes(student)
    ids = prefix.student_ids.tolist()
    assert prefix.mapped == sum(j >= 0 for j in ids) > sum(j >= 0 for j in exact)
    for i, j in enumerate(ids):
        if exact[i] >= 0:
            assert j == exact[i]  # a twin stays the twin
        elif j >= 0:  # else the longest student token the teacher token's bytes start with
            piece, found = t_table[i], s_table[j]
            assert piece is not None and found is not None and piece.startswith(found)
            longer = [s for s in s_table if s and piece.startswith(s) and len(s) > len(found)]
            assert not longer, (piece, found, longer)
    assert len(set(j for j in ids if j >= 0)) < prefix.mapped  # many teacher tokens to one student token


def test_carry_top_k_sums_entries_carried_to_one_student_token():
    table = torch.tensor([3, 3, 1, -1])  # (V_t,): teacher 0 and 1 both start with student token 3
    logprobs = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.05], [0.4, 0.3, 0.2, 0.1]]))  # (N, K)
    ids = torch.tensor([[0, 1, 2, 3], [2, 3, 1, -1]])  # (N, K)
    out_logprobs, out_ids = carry_top_k(logprobs, ids, table)
    assert out_ids.tolist() == [[3, -1, 1, -1], [1, -1, 3, -1]]
    torch.testing.assert_close(out_logprobs[out_ids >= 0].exp(), torch.tensor([0.7, 0.1, 0.4, 0.2]))
    assert bool((out_logprobs[out_ids < 0] == LOG_FLOOR).all())
