"""The procedural word-problem generator: determinism, correct worked solutions, small numbers, held-out splits."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from distill.errors import DistillError
from distill.generate.problems import (
    MAX_VALUE,
    SCENARIOS,
    answer_only,
    make_problems,
    split_problems,
    write_problems,
)
from distill.generate.verify import Problem, extract_answer, read_gsm8k, verify

CALC = re.compile(r"(\d+) ([-+*/]) (\d+) = (\d+)\.")
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}


def test_deterministic_for_a_seed() -> None:
    first = make_problems(50, seed=7)
    assert first == make_problems(50, seed=7)
    assert first != make_problems(50, seed=8)
    assert make_problems(20, seed=7) == first[:20]  # a prefix of a longer run
    assert [p.id for p in first[:3]] == ["gen7-0", "gen7-1", "gen7-2"]


def test_problems_are_distinct_and_well_formed() -> None:
    problems = make_problems(500, seed=0)
    assert len(problems) == 500
    assert len({p.question for p in problems}) == 500
    assert len({p.id for p in problems}) == 500
    for p in problems:
        assert p.question.endswith("?")
        assert p.solution.endswith(f"\n#### {p.answer}")
        assert p.solution.count("\n") == 1  # one line of steps, then the answer line


@pytest.mark.parametrize("steps", [(1,), (2,), (3,), (4,), (2, 3)])
def test_every_solution_is_arithmetically_correct(steps: tuple[int, ...]) -> None:
    for p in make_problems(300, seed=1, steps=steps):
        calcs = CALC.findall(p.solution)
        assert len(calcs) in steps, p.solution
        known = {int(n) for n in re.findall(r"\d+", p.question)} | ({2} if "half" in p.question else set())
        for a, op, b, result in calcs:
            a_, b_, r_ = int(a), int(b), int(result)
            assert OPS[op](a_, b_) == r_, p.solution  # exact, divisions included
            assert 1 <= r_ <= MAX_VALUE and a_ <= MAX_VALUE and b_ <= MAX_VALUE, p.solution
            assert a_ in known and b_ in known, p.solution  # every operand is given or computed earlier
            known.add(r_)
        assert int(calcs[-1][3]) == int(p.answer), p.solution
        assert extract_answer(p.solution) == p.answer
        assert verify(extract_answer(p.solution), p.answer).ok


def test_all_scenarios_appear_and_language_is_regular() -> None:
    problems = make_problems(400, seed=2)
    text = " ".join(p.question for p in problems)
    assert all(marker in text for marker in ("buys", "has", "dollars", "every"))
    assert len(SCENARIOS) == 4
    assert not re.search(r"\b(?:boxs|boxess|bagss|jarss|basketss|packss)\b", text)
    for p in problems:
        assert re.fullmatch(r"[A-Za-z0-9 .,?*+/=\-\n#]+", p.question + p.solution), p.question


def test_bad_arguments() -> None:
    with pytest.raises(DistillError, match="steps"):
        make_problems(3, steps=())
    with pytest.raises(DistillError, match="steps"):
        make_problems(3, steps=(0,))
    with pytest.raises(DistillError, match="negative"):
        make_problems(-1)
    assert make_problems(0) == []


def test_answer_only() -> None:
    p = make_problems(1, seed=3)[0]
    assert answer_only(p) == f"#### {p.answer}"
    assert verify(extract_answer(answer_only(p)), p.answer).ok


def test_split_holds_out_questions() -> None:
    problems = make_problems(100, seed=4)
    train, test = split_problems(problems, n_test=20, seed=0)
    assert len(test) == 20 and len(train) == 80
    assert not {p.question for p in train} & {p.question for p in test}
    assert split_problems(problems, n_test=20, seed=0) == (train, test)
    assert [p for p in problems if p in test] == test  # order kept


def test_split_keeps_duplicate_questions_together() -> None:
    base = make_problems(30, seed=5)
    twins = [
        Problem(f"twin-{i}", "  " + p.question.upper() + " ", p.solution, p.answer) for i, p in enumerate(base[:10])
    ]
    problems = base + twins
    for seed in range(5):
        train, test = split_problems(problems, n_test=8, seed=seed)
        assert len(train) + len(test) == len(problems) and len(test) >= 8
        held = {" ".join(p.question.casefold().split()) for p in test}
        assert not any(" ".join(p.question.casefold().split()) in held for p in train)
    with pytest.raises(DistillError, match="cannot hold out"):
        split_problems(problems, n_test=len(problems) + 1)


def test_write_problems_round_trip(tmp_path: Path) -> None:
    problems = make_problems(10, seed=6)
    loaded = read_gsm8k(write_problems(problems, tmp_path / "train.jsonl"))
    assert [(p.question, p.solution, p.answer) for p in loaded] == [
        (p.question, p.solution, p.answer) for p in problems
    ]
    baseline = read_gsm8k(write_problems(problems, tmp_path / "answers.jsonl", answers_only=True))
    assert [p.solution for p in baseline] == [f"#### {p.answer}" for p in problems]
