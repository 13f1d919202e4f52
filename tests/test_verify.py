"""Final-answer extraction, number and choice normalisation, verification modes, and the GSM8K reader."""

from __future__ import annotations

import json
from fractions import Fraction
from pathlib import Path

import pytest

from distill.errors import DataError, DistillError
from distill.generate.verify import (
    NO_ANSWER,
    extract_answer,
    normalize_number,
    parse_choice,
    parse_number,
    read_gsm8k,
    verify,
)

GSM8K = Path(__file__).parents[2] / "shared" / "data" / "gsm8k"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("He has 3 + 4 = 7 apples.\n#### 7", "7"),
        ("#### 1,234", "1234"),
        ("So she pays $18.\n#### $18.", "18"),
        ("#### 5\nmore text\n#### 6", "6"),  # the last marker wins
        ("#### 12<|endoftext|>", "12"),
        ("####-3", "-3"),
        ("#### −3", "-3"),  # unicode minus
        ("####\n", None),
        (r"The result is \boxed{42}.", "42"),
        (r"\boxed{\frac{3}{4}}", "3/4"),
        (r"first \boxed{1} then \boxed{{2}+{3}}", "{2}+{3}"),  # nested braces, last box
        (r"$\boxed{\text{B}}$", "B"),
        (r"\boxed{1{,}000}", "1000"),
        (r"\boxed{50\%}", "50"),
        (r"\boxed 7", "7"),
        (r"\boxed{unclosed", None),
        ("Answer: 42", "42"),
        ("answer: -0.50", "-0.5"),
        ("The answer is 3.5.", "3.5"),
        ("The final answer is (B).", "(B)"),
        ("The answer is **1,000**.", "1000"),
        ("The answer is 12 apples.", "12"),
        ("The answer is $1,234.50.", "1234.5"),
        ("Answer:\n  -7", "-7"),
        ("The answer is 5. Wait, no: the answer is 6.", "6"),  # the last phrase wins
        ("#### 9\nIf the answer is 8 we would be wrong.", "9"),  # a marker beats any phrase
        ("#### Step 1\nadd them: \\boxed{5}", "5"),  # a markdown heading before the boxed answer
        ("To answer this, we add 2 and 2.", None),
        ("The answers vary.", None),
        ("", None),
        ("Answer: Paris", "Paris"),
    ],
)
def test_extract_answer(text: str, expected: str | None) -> None:
    assert extract_answer(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("42", "42"),
        ("+42", "42"),
        ("-0", "0"),
        ("007", "7"),
        ("1,234,567", "1234567"),
        ("$1,234.50", "1234.5"),
        ("-$5", "-5"),
        ("50%", "50"),
        ("3.0", "3"),
        (".5", "0.5"),
        ("3/4", "3/4"),
        ("-3 / 4", "-3/4"),
        ("12 dollars.", "12"),
        ("7 km/h", "7"),
        ("x = 5", "5"),
        ("1,5", None),  # not a thousands separator
        ("5 or 6", None),
        ("B", None),
        ("", None),
        ("1/0", None),
    ],
)
def test_normalize_number(text: str, expected: str | None) -> None:
    assert normalize_number(text) == expected


def test_parse_number_is_exact() -> None:
    assert parse_number("1/3") == Fraction(1, 3)
    assert parse_number("0.1") == Fraction(1, 10)
    assert parse_number("-2,500") == -2500
    assert parse_number("seven") is None


@pytest.mark.parametrize(
    ("text", "expected"),
    [("B", "B"), ("b", "B"), ("(B)", "B"), ("B)", "B"), ("[c]", "C"), ("B.", "B"), ("(D) 42", "D"), ("Option a", "A"),
     ("choice e", "E"), ("**C**", "C"), ("Bob", None), ("42", None), ("", None)],
)  # fmt: skip
def test_parse_choice(text: str, expected: str | None) -> None:
    assert parse_choice(text) == expected


def test_verify_numeric() -> None:
    assert verify("42", "42").ok
    assert verify("42.0", "42").ok
    assert verify("3/4", "0.75").ok
    assert verify("2,125", "2125").ok
    assert verify("0.3333333", "1/3", rel_tol=1e-6).ok
    assert not verify("0.333", "1/3", rel_tol=1e-6).ok
    wrong = verify("41", "42")
    assert not wrong.ok and wrong.reason == "wrong answer: 41 != 42"
    assert (wrong.predicted, wrong.gold) == ("41", "42")
    assert verify("-5", "5").reason == "wrong answer: -5 != 5"
    not_number = verify("many", "42", mode="numeric")
    assert not not_number.ok and "not a number" in not_number.reason


def test_verify_tolerances() -> None:
    assert verify("100.00001", "100", rel_tol=1e-8).ok is False
    assert verify("100.00001", "100", rel_tol=1e-8, abs_tol=1e-3).ok
    assert verify("100.00001", "100", rel_tol=1e-6).ok
    assert verify("0.1", "1/10").ok and verify("0.30000000000000004", "0.3", rel_tol=0, abs_tol=0).ok is False
    assert verify("1450001", "1,450,000", rel_tol=1e-3).ok is False  # integers compare exactly, never with tolerance
    assert verify("1450000.0", "1,450,000", rel_tol=0).ok


def test_verify_choice() -> None:
    assert verify("(b)", "B").ok  # auto picks choice for a single-letter gold
    assert verify("B) 42", "(B)", mode="choice").ok
    verdict = verify("B", "C")
    assert not verdict.ok and verdict.reason == "choice B != C"
    assert "no choice letter" in verify("forty", "C", mode="choice").reason


def test_verify_exact_and_no_answer() -> None:
    assert verify("Paris", "paris").ok
    assert verify("  new   york. ", "New York", mode="exact").ok
    assert verify("London", "Paris").reason == "wrong answer: London != Paris"
    assert verify("42", "42.0", mode="exact").ok is False
    for missing in (None, "", "   "):
        verdict = verify(missing, "42")
        assert not verdict.ok and verdict.reason == NO_ANSWER and verdict.predicted is None


def test_verify_rejects_bad_modes_and_golds() -> None:
    with pytest.raises(DistillError, match="unknown verification mode"):
        verify("1", "1", mode="fuzzy")
    with pytest.raises(DataError, match="not a number"):
        verify("1", "Paris", mode="numeric")
    with pytest.raises(DataError, match="not a choice"):
        verify("A", "42", mode="choice")


def _write(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_read_gsm8k(tmp_path: Path) -> None:
    rows = [{"question": "What is 2 + 3?", "answer": "2 + 3 = <<2+3=5>>5\n#### 5"},
            {"question": "Big?", "answer": "It is 1,000 * 2.\n#### 2,000"}]  # fmt: skip
    problems = read_gsm8k(_write(tmp_path / "train.jsonl", rows))
    assert [p.id for p in problems] == ["train-0", "train-1"]
    assert problems[1].question == "Big?" and problems[1].answer == "2,000"
    assert problems[1].solution.endswith("#### 2,000")
    assert read_gsm8k(tmp_path / "train.jsonl", limit=1) == problems[:1]


@pytest.mark.parametrize(
    ("content", "message"),
    [("not json\n", "not valid JSON"), ('{"question": "q"}\n', "worked solution"), ("[1]\n", "expected an object"),
     ('{"question": "q", "answer": "x ####  "}\n', "nothing follows"), ("\n", "no problems")],
)  # fmt: skip
def test_read_gsm8k_errors(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_gsm8k(path)


def test_read_gsm8k_missing_or_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        read_gsm8k(tmp_path / "nope.jsonl")
    with pytest.raises(DataError, match="is a folder"):
        read_gsm8k(tmp_path)


@pytest.mark.skipif(not (GSM8K / "test.jsonl").is_file(), reason=f"GSM8K reference data not found at {GSM8K}")
def test_every_gsm8k_test_solution_verifies() -> None:
    problems = read_gsm8k(GSM8K / "test.jsonl")
    assert len(problems) == 1319
    failures = []
    for problem in problems:
        predicted = extract_answer(problem.solution)
        verdict = verify(predicted, problem.answer)
        # an independent reading of the gold: GSM8K final answers are integers, some with thousands separators
        if not verdict.ok or predicted != str(int(problem.answer.replace(",", ""))):
            failures.append((problem.id, problem.answer, predicted, verdict.reason))
    assert not failures, failures[:5]
    assert (
        sum(not verify(extract_answer(p.solution), str(int(p.answer.replace(",", "")) + 1)).ok for p in problems)
        == 1319
    )
