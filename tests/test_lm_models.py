"""Tokenizers and models of the CPU LM recipes (distill.lm_models)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("transformers")

from distill.lm_models import run_tokenizer, train_tokenizer  # noqa: E402

TEXTS = [f"Tom buys {a} packs at {b} dollars each. {a} * {b} = {a * b}.\n#### {a * b}" for a in range(2, 30)
         for b in range(2, 13)]  # fmt: skip


def test_the_digits_tokenizer_spells_every_number_digit_by_digit(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXTS, 400, tmp_path, digits=True)
    text = "Tom buys 12 packs at 7 dollars each. 12 * 7 = 84.\n#### 84"
    ids = tokenizer(text)["input_ids"]
    pieces = [tokenizer.decode([i]) for i in ids]
    assert tokenizer.decode(ids) == text
    assert [p for p in pieces if any(c.isdigit() for c in p)] == ["1", "2", "7", "1", "2", "7", "8", "4", "8", "4"]


def test_the_plain_tokenizer_learns_whole_numbers_as_tokens(tmp_path: Path) -> None:
    tokenizer = train_tokenizer(TEXTS, 400, tmp_path)
    pieces = [tokenizer.decode([i]).strip() for i in tokenizer("12 * 7 = 84")["input_ids"]]
    assert "12" in pieces or "84" in pieces


def test_a_resumed_run_loads_the_digits_tokenizer_it_saved(tmp_path: Path) -> None:
    first = run_tokenizer(TEXTS, 400, tmp_path, resume=False, kind="bpe-digits")
    again = run_tokenizer(["unrelated text"], 400, tmp_path, resume=True, kind="bpe-digits")
    text = "Ann has 150 dollars."
    assert again(text)["input_ids"] == first(text)["input_ids"]
    assert [again.decode([i]) for i in again(text)["input_ids"]].count("5") == 1
