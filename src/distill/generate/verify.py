"""Final answers of reasoning traces: find them, normalise them, check them against the gold answer.

A trace ends its reasoning with a final answer in one of these forms (the last explicit marker, #### or \\boxed, wins,
so a model that corrects itself is judged on its last word; an answer phrase counts only without a marker):

    #### 42                      GSM8K
    \\boxed{\\frac{3}{4}}          LaTeX, nested braces allowed
    Answer: 42 / The answer is 42 / The final answer is (B).

Numbers are normalised before comparison: "$1,234.50." -> "1234.5", "50%" -> "50", "12 apples" -> "12", "-3/4"
stays a fraction and compares exactly. GSM8K files load with `read_gsm8k`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

from distill.data import json_lines
from distill.errors import DataError, DistillError

Mode = Literal["auto", "exact", "numeric", "choice"]
MODES: tuple[str, ...] = ("auto", "exact", "numeric", "choice")
NO_ANSWER = "no final answer found"
CORRECT = "correct"


@dataclass(frozen=True)
class Problem:
    """A word problem: the question, a worked solution that ends with "#### <answer>", and the gold answer."""

    id: str
    question: str
    solution: str
    answer: str


@dataclass(frozen=True)
class Verdict:
    """Whether a predicted final answer matches the gold one, and why not when it does not."""

    ok: bool
    reason: str
    predicted: str | None
    gold: str


# ---------------------------------------------------------------------------------------------------- extraction

_HASHES = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*")
_PHRASE = re.compile(r"\banswer\b\s*(?:is\b\s*:?|:|=)[ \t]*\n?[ \t]*", re.IGNORECASE)
_SENTENCE_END = re.compile(r"\.(?:\s|$)")
_SPECIAL_TOKENS = re.compile(r"<\|[^|>]*\|>|</s>|<eos>|<end_of_turn>")
_WRAPPERS = re.compile(r"\\(?:text|textbf|textrm|mathrm|mathbf|mbox)\s*\{([^{}]*)\}")
_FRAC = re.compile(r"\\[dt]?frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}")


def extract_answer(text: str) -> str | None:
    """The final answer of a trace, normalised (a number as "1234.5", anything else as cleaned text), or None.

    "#### x" and "\\boxed{x}" are explicit markers: the last one in the text wins. Only without them does an
    "Answer: x" / "The answer is x" phrase count (again the last one).
    """
    marked = [c for c in (_last_hashes(text), _last_boxed(text)) if c is not None]
    candidates = [max(marked)[1]] if marked else []
    phrase = _last_phrase(text)
    candidates += [phrase] if phrase is not None else []
    for raw in candidates:
        cleaned = _clean(raw)
        if cleaned:
            return normalize_number(cleaned) or cleaned
    return None


def _last_hashes(text: str) -> tuple[int, str] | None:
    found = [(m.start(), m.group(1)) for m in _HASHES.finditer(text) if _clean(m.group(1))]
    return found[-1] if found else None


def _last_boxed(text: str) -> tuple[int, str] | None:
    for match in reversed(list(_BOXED.finditer(text))):
        start = match.end()
        if start < len(text) and text[start] == "{":
            content = _braced(text, start)
            if content is not None and _clean(content):
                return match.start(), content
        else:
            bare = re.match(r"[^\s$}]+", text[start:])
            if bare:
                return match.start(), bare.group(0)
    return None


def _braced(text: str, start: int) -> str | None:
    """The text inside the brace group opening at text[start], or None when it never closes."""
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[start + 1 : i]
    return None


def _last_phrase(text: str) -> str | None:
    for match in reversed(list(_PHRASE.finditer(text))):
        value = text[match.end() :].split("\n", 1)[0]
        end = _SENTENCE_END.search(value)
        value = value[: end.start()] if end else value
        if value.strip(" \t*_:"):
            return value
    return None


def _clean(raw: str) -> str:
    """Strip markup around an answer: special tokens, markdown emphasis, $...$ math, \\text{}, trailing period."""
    text = _SPECIAL_TOKENS.sub("", raw)
    for _ in range(3):
        text = _WRAPPERS.sub(r"\1", text)
        text = _FRAC.sub(r"\1/\2", text)
    text = text.replace("\\$", "$").replace("\\%", "%").replace("{,}", ",").replace("\\,", "").replace("\\!", "")
    text = text.strip().strip("*_`").strip()
    if len(text) > 2 and text.startswith("$") and text.endswith("$"):
        text = text.strip("$").strip()
    if text.startswith("\\(") and text.endswith("\\)") or text.startswith("\\[") and text.endswith("\\]"):
        text = text[2:-2].strip()
    return text.rstrip(".").strip()


# ---------------------------------------------------------------------------------------------------- numbers

_NUMBER = re.compile(r"([-+]?(?:\d+(?:\.\d*)?|\.\d+))(?:/((?:\d+(?:\.\d*)?|\.\d+)))?")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_UNITS = re.compile(r"(?<=[\d%.])\s*[A-Za-z][A-Za-z\s./²³^'-]*$")
_VARIABLE = re.compile(r"^[A-Za-z]\s*=\s*")


def _number_text(text: str) -> str | None:
    """The bare number in a decorated answer ("$1,234.50 dollars." -> "1234.50"), or None if it is not one."""
    s = text.strip().replace("\u2212", "-").replace("\\$", "$").replace("\\%", "%")
    s = _VARIABLE.sub("", s)
    s = re.sub(r"^(?:=|≈|~)\s*", "", s)
    s = s.replace("$", "").replace("€", "").replace("£", "").strip()
    s = _THOUSANDS.sub("", s)
    s = _UNITS.sub("", s).strip().rstrip(".").strip()
    s = s.removesuffix("%").strip()
    s = re.sub(r"\s*/\s*", "/", s)
    if s.startswith("-") or s.startswith("+"):
        s = s[0] + s[1:].lstrip()
    return s if _NUMBER.fullmatch(s) else None


def parse_number(text: str) -> Fraction | None:
    """The value of a numeric answer as an exact fraction; None when it is not a number (or divides by zero)."""
    s = _number_text(text)
    if s is None:
        return None
    match = _NUMBER.fullmatch(s)
    assert match is not None
    numerator, denominator = match.group(1), match.group(2)
    value = Fraction(numerator)
    if denominator is not None:
        if Fraction(denominator) == 0:
            return None
        value /= Fraction(denominator)
    return value


def normalize_number(text: str) -> str | None:
    """A numeric answer in canonical form ("$1,234.50" -> "1234.5", "+7" -> "7", "3/4" stays), or None."""
    s = _number_text(text)
    if s is None or parse_number(s) is None:
        return None
    s = s.lstrip("+")
    parts = s.split("/")
    canonical = []
    for part in parts:
        sign, digits = ("-", part[1:]) if part.startswith("-") else ("", part)
        if "." in digits:
            digits = digits.rstrip("0").rstrip(".")
        digits = digits.lstrip("0") or "0"
        if digits.startswith("."):
            digits = "0" + digits
        canonical.append(("" if digits == "0" else sign) + digits)
    return "/".join(canonical)


# ---------------------------------------------------------------------------------------------------- choices

_CHOICE = re.compile(r"(?:(?:option|choice)\s*)?[(\[]?([A-Za-z])[)\]]?(?=$|[\s.:)])", re.IGNORECASE)
_BARE_CHOICE = re.compile(r"[(\[]?[A-Za-z][)\]]?\.?")


def parse_choice(text: str) -> str | None:
    """The letter of a multiple-choice answer, upper case: "(b)", "B)", "b", "Option B", "B. 42" -> "B"."""
    match = _CHOICE.match(_clean(text))
    return match.group(1).upper() if match else None


# ---------------------------------------------------------------------------------------------------- verification


def _plain(text: str) -> str:
    return " ".join(_clean(text).casefold().split()).strip("\"'")


def verify(
    predicted: str | None, gold: str, mode: Mode | str = "auto", rel_tol: float = 1e-6, abs_tol: float = 1e-9
) -> Verdict:
    """Compare a predicted final answer (from `extract_answer`) with the gold answer.

    mode "numeric" compares values (two integers exactly, otherwise within rel_tol / abs_tol), "choice" compares option
    letters, "exact" compares case-folded text, and "auto" picks numeric when the gold answer is a number, choice
    when it is a single letter, exact otherwise.
    """
    if mode not in MODES:
        raise DistillError(f"unknown verification mode {mode!r}; choose one of {', '.join(MODES)}")
    gold = str(gold)
    if predicted is None or not predicted.strip():
        return Verdict(False, NO_ANSWER, None, gold)
    if mode == "auto":
        if parse_number(gold) is not None:
            mode = "numeric"
        elif _BARE_CHOICE.fullmatch(gold.strip()):
            mode = "choice"
        else:
            mode = "exact"
    if mode == "numeric":
        return _numeric(predicted, gold, rel_tol, abs_tol)
    if mode == "choice":
        return _choice(predicted, gold)
    ok = _plain(predicted) == _plain(gold)
    return Verdict(ok, CORRECT if ok else f"wrong answer: {_clean(predicted)} != {_clean(gold)}", predicted, gold)


def _numeric(predicted: str, gold: str, rel_tol: float, abs_tol: float) -> Verdict:
    want = parse_number(gold)
    if want is None:
        raise DataError(f"gold answer {gold!r} is not a number; verify it with mode 'exact' or 'auto'")
    got = parse_number(predicted)
    shown_gold = normalize_number(gold)
    if got is None:
        return Verdict(
            False, f"wrong answer: {_clean(predicted)!r} is not a number (gold {shown_gold})", predicted, gold
        )
    exact = got.denominator == 1 and want.denominator == 1  # integers (counts, GSM8K answers) must match exactly
    ok = got == want or not exact and math.isclose(float(got), float(want), rel_tol=rel_tol, abs_tol=abs_tol)
    reason = CORRECT if ok else f"wrong answer: {normalize_number(predicted)} != {shown_gold}"
    return Verdict(ok, reason, predicted, gold)


def _choice(predicted: str, gold: str) -> Verdict:
    want = parse_choice(gold)
    if want is None:
        raise DataError(f"gold answer {gold!r} is not a choice letter; verify it with mode 'exact' or 'auto'")
    got = parse_choice(predicted)
    if got is None:
        return Verdict(False, f"no choice letter in {_clean(predicted)!r} (gold {want})", predicted, gold)
    return Verdict(got == want, CORRECT if got == want else f"choice {got} != {want}", predicted, gold)


# ---------------------------------------------------------------------------------------------------- GSM8K


def read_gsm8k(path: Path | str, limit: int | None = None) -> list[Problem]:
    """Problems from a GSM8K JSONL file ({"question", "answer"} per line, the answer ending in "#### <gold>").

    `Problem.answer` is the gold text after the last "####" as written in the file (e.g. "2,125"); `verify`
    normalises it. Ids are "<file stem>-<row index>", e.g. "test-0".
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path} is a folder; pass one GSM8K file, e.g. {path / 'test.jsonl'}")
    if not path.is_file():
        raise DataError(f"GSM8K file {path} does not exist (the reference copy is in ../shared/data/gsm8k)")
    problems: list[Problem] = []
    for where, row in json_lines(path):
        if not isinstance(row, dict) or not isinstance(row.get("question"), str):
            raise DataError(f"{where}: expected an object with string 'question' and 'answer' keys")
        solution = row.get("answer")
        if not isinstance(solution, str) or "####" not in solution:
            raise DataError(f"{where}: the 'answer' must be a worked solution ending in '#### <answer>'")
        gold = solution.rsplit("####", 1)[1].strip()
        if not gold:
            raise DataError(f"{where}: nothing follows '####' in the answer")
        problems.append(Problem(f"{path.stem}-{len(problems)}", row["question"], solution, gold))
        if limit is not None and len(problems) >= limit:
            break
    if not problems:
        raise DataError(f"GSM8K file {path} has no problems")
    return problems
