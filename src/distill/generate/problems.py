"""Procedural multi-step arithmetic word problems with worked solutions in GSM8K format.

For a CPU reasoning recipe: a small transformer (a few M parameters, character or small BPE tokenizer) learns to
solve them from worked solutions. The language is templated and regular, operands are small and every intermediate
result stays in 1..MAX_VALUE, so a model this small can learn the arithmetic. A solution restates each fact and
spells out its calculation, then ends with the GSM8K answer line:

    Tom buys 3 packs of pens at 4 dollars each. 3 * 4 = 12. The notebook costs 5 dollars. 12 + 5 = 17.
    #### 17

Scenarios: shopping totals, sharing, money remaining after buying, and rates (so much per hour for so many hours).
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from distill.errors import DistillError
from distill.generate.verify import Problem

MAX_VALUE = 200
"""Largest operand or intermediate result in any calculation."""

Calc = tuple[int, str, int, int]  # (a, op, b, result) with op in + - * /

NAMES = (("Tom", "He"), ("Ann", "She"), ("Sam", "He"), ("Mia", "She"), ("Ben", "He"), ("Lily", "She"),
         ("Max", "He"), ("Emma", "She"), ("Leo", "He"), ("Zoe", "She"), ("Jack", "He"), ("Ella", "She"))  # fmt: skip
PACKS = (("pack", "packs", "pens"), ("box", "boxes", "pencils"), ("bag", "bags", "apples"), ("box", "boxes", "crayons"),
         ("pack", "packs", "cards"))  # fmt: skip
THINGS = ("notebook", "ruler", "book", "cap", "ball", "lamp", "cup")
ITEMS = ("apples", "cookies", "marbles", "stickers", "candies", "shells", "beads")
CONTAINERS = (("box", "boxes"), ("bag", "bags"), ("jar", "jars"), ("basket", "baskets"))
RATES = (("machine", "makes", "toys", "hour"), ("baker", "bakes", "cakes", "day"),
         ("farm", "collects", "eggs", "day"), ("factory", "fills", "bottles", "minute"))  # fmt: skip


@dataclass(frozen=True)
class Step:
    story: str  # sentence(s) in the question
    fact: str  # the same fact restated in the solution, before its calculations
    calcs: tuple[Calc, ...]
    value: int  # the running quantity after this step
    question: str | None = None  # a closing step asks its own question


def _calc(a: int, op: str, b: int) -> Calc | None:
    """One calculation, or None when its result leaves 1..MAX_VALUE or a division is not exact."""
    if op == "/":
        if b == 0 or a % b:
            return None
        result = a // b
    else:
        result = {"+": a + b, "-": a - b, "*": a * b}[op]
    return (a, op, b, result) if 1 <= result <= MAX_VALUE and a <= MAX_VALUE and b <= MAX_VALUE else None


def _step(story: str, fact: str, calcs: Sequence[Calc | None], question: str | None = None) -> Step | None:
    if any(c is None for c in calcs):
        return None
    done = tuple(c for c in calcs if c is not None)
    return Step(story, fact, done, done[-1][3], question)


def _divisor(rng: random.Random, value: int) -> int | None:
    choices = [d for d in range(2, 10) if value % d == 0]
    return rng.choice(choices) if choices else None


Op = Callable[[random.Random, int], Step | None]  # (rng, running value) -> the next step, None if it cannot fit


@dataclass(frozen=True)
class Plan:
    """One scenario's steps, each with its number of calculations: a story opens with a start, continues with
    middles and may end with a closing step (which asks its own question); otherwise `question` is asked."""

    starts: list[tuple[int, Op]]
    middles: list[tuple[int, Op]]
    closings: list[tuple[int, Op]]
    question: str


# ------------------------------------------------------------------------------------------------ scenarios


def shopping(rng: random.Random) -> Plan:
    name, he = rng.choice(NAMES)
    pack, packs, item = rng.choice(PACKS)
    thing = rng.choice(THINGS)

    def start(r: random.Random, v: int) -> Step | None:
        a, b = r.randint(2, 9), r.randint(2, 12)
        return _step(f"{name} buys {a} {packs} of {item}. Each {pack} costs {b} dollars.",
                     f"{name} buys {a} {packs} at {b} dollars each.", [_calc(a, "*", b)])  # fmt: skip

    def extra(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 20)
        return _step(
            f"{he} also buys a {thing} for {k} dollars.", f"The {thing} costs {k} dollars.", [_calc(v, "+", k)]
        )

    def coupon(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 10)
        return _step(
            f"{he} uses a coupon for {k} dollars off.", f"The coupon takes off {k} dollars.", [_calc(v, "-", k)]
        )

    def change(r: random.Random, v: int) -> Step | None:
        bill = next((b for b in (20, 50, 100, 200) if b > v), None)
        if bill is None:
            return None
        return _step(f"{he} pays with a {bill} dollar bill.", f"{he} pays {bill} dollars.", [_calc(bill, "-", v)],
                     f"How many dollars of change does {name} get?")  # fmt: skip

    def split(r: random.Random, v: int) -> Step | None:
        d = _divisor(r, v)
        if d is None:
            return None
        return _step(f"The cost is shared equally by {d} people.", f"{d} people share the cost.",
                     [_calc(v, "/", d)], "How many dollars does each person pay?")  # fmt: skip

    return Plan([(1, start)], [(1, extra), (1, coupon)], [(1, change), (1, split)],
                f"How many dollars does {name} spend in total?")  # fmt: skip


def sharing(rng: random.Random) -> Plan:
    name, he = rng.choice(NAMES)
    (box, boxes), item, size = rng.choice(CONTAINERS), rng.choice(ITEMS), rng.randint(2, 12)

    def start(r: random.Random, v: int) -> Step | None:
        a = r.randint(2, 9)
        return _step(f"{name} has {a} {boxes} with {size} {item} in each {box}.",
                     f"{name} has {a} {boxes} with {size} {item} each.", [_calc(a, "*", size)])  # fmt: skip

    def more_boxes(r: random.Random, v: int) -> Step | None:
        a = r.randint(2, 5)
        m = _calc(a, "*", size)
        return _step(f"{he} gets {a} more {boxes} like that.", f"{he} gets {a} more {boxes} of {size}.",
                     [m, _calc(v, "+", m[3]) if m else None])  # fmt: skip

    def found(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 20)
        return _step(f"{he} finds {k} more {item}.", f"{he} finds {k} more.", [_calc(v, "+", k)])

    def gives(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 15)
        return _step(f"{he} gives away {k} {item}.", f"{he} gives away {k}.", [_calc(v, "-", k)])

    def share(r: random.Random, v: int) -> Step | None:
        d = _divisor(r, v)
        if d is None:
            return None
        return _step(f"{he} shares them equally among {d} friends.", f"{d} friends share them.", [_calc(v, "/", d)],
                     f"How many {item} does each friend get?")  # fmt: skip

    return Plan([(1, start)], [(2, more_boxes), (1, found), (1, gives)], [(1, share)],
                f"How many {item} does {name} have now?")  # fmt: skip


def remaining(rng: random.Random) -> Plan:
    name, he = rng.choice(NAMES)
    item = rng.choice(PACKS)[2]
    money = rng.choice((20, 30, 40, 50, 60, 80, 100, 120, 150, 200))
    has = f"{name} has {money} dollars."

    def spend(r: random.Random, v: int) -> Step | None:
        k, thing = r.randint(1, 30), r.choice(THINGS)
        first = f"{has} {he}" if v == 0 else f"Then {he.lower()}"
        return _step(f"{first} spends {k} dollars on a {thing}.", f"{first} spends {k} dollars.",
                     [_calc(v or money, "-", k)])  # fmt: skip

    def buys(r: random.Random, v: int) -> Step | None:
        a, b = r.randint(2, 9), r.randint(2, 12)
        first = f"{has} {he}" if v == 0 else f"Then {he.lower()}"
        m = _calc(a, "*", b)
        return _step(f"{first} buys {a} {item} for {b} dollars each.", f"{first} buys {a} {item} at {b} dollars each.",
                     [m, _calc(v or money, "-", m[3]) if m else None])  # fmt: skip

    def earns(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 30)
        return _step(f"Then {he.lower()} earns {k} dollars.", f"{he} earns {k} dollars.", [_calc(v, "+", k)])

    def half(r: random.Random, v: int) -> Step | None:
        return _step(f"{he} saves half of the money that is left.", "Half of it is saved.", [_calc(v, "/", 2)],
                     f"How many dollars does {name} save?")  # fmt: skip

    return Plan([(1, spend), (2, buys)], [(1, spend), (2, buys), (1, earns)], [(1, half)],
                f"How many dollars does {name} have left?")  # fmt: skip


def rates(rng: random.Random) -> Plan:
    who, verb, item, period = rng.choice(RATES)

    def start(r: random.Random, v: int) -> Step | None:
        a, b = r.randint(2, 12), r.randint(2, 9)
        text = f"A {who} {verb} {a} {item} every {period} for {b} {period}s."
        return _step(text, text, [_calc(a, "*", b)])

    def second(r: random.Random, v: int) -> Step | None:
        a, b = r.randint(2, 12), r.randint(2, 6)
        m = _calc(a, "*", b)
        text = f"Then the {who} {verb} {a} {item} every {period} for {b} more {period}s."
        return _step(text, text, [m, _calc(v, "+", m[3]) if m else None])

    def sold(r: random.Random, v: int) -> Step | None:
        k = r.randint(1, 15)
        return _step(f"Then {k} of the {item} are sold.", f"{k} are sold.", [_calc(v, "-", k)])

    def packed(r: random.Random, v: int) -> Step | None:
        d = _divisor(r, v)
        if d is None:
            return None
        return _step(f"The {item} are packed in boxes of {d}.", f"Each box holds {d}.", [_calc(v, "/", d)],
                     "How many boxes are filled?")  # fmt: skip

    return Plan([(1, start)], [(2, second), (1, sold)], [(1, packed)], f"How many {item} are there now?")


SCENARIOS: dict[str, Callable[[random.Random], Plan]] = {
    "shopping": shopping,
    "sharing": sharing,
    "remaining": remaining,
    "rates": rates,
}


# ------------------------------------------------------------------------------------------------ generation


def _one(rng: random.Random, calcs: int) -> tuple[str, str, int] | None:
    """(question, solution, answer) with exactly `calcs` calculations, or None when this draw failed."""
    plan = SCENARIOS[rng.choice(sorted(SCENARIOS))](rng)
    steps: list[Step] = []
    left, value = calcs, 0
    options = [(n, op) for n, op in plan.starts if n <= left]
    while left > 0 and options:
        n, op = rng.choice(options)
        step = op(rng, value)
        if step is None:
            return None
        steps.append(step)
        left, value = left - n, step.value
        if step.question is not None:
            break
        options = [(k, o) for k, o in plan.middles if k <= left] + [(k, o) for k, o in plan.closings if k == left]
    if left != 0 or not steps:
        return None
    text = " ".join(s.story for s in steps) + " " + (steps[-1].question or plan.question)
    worked = " ".join(s.fact + "".join(f" {a} {o} {b} = {r}." for a, o, b, r in s.calcs) for s in steps)
    return text, f"{worked}\n#### {value}", value


def make_problems(n: int, seed: int = 0, steps: Sequence[int] = (2, 3)) -> list[Problem]:
    """n distinct problems (no two share a question), each with a number of calculations drawn from `steps`.

    Deterministic for a given (n, seed, steps); ids are "gen<seed>-<index>".
    """
    if n < 0:
        raise DistillError(f"the number of problems must not be negative (got {n})")
    if not steps or any(not 1 <= s <= 6 for s in steps):
        raise DistillError(f"steps must be calculation counts between 1 and 6 (got {tuple(steps)})")
    rng = random.Random(seed)
    problems: list[Problem] = []
    seen: set[str] = set()
    attempts = 0
    while len(problems) < n:
        attempts += 1
        if attempts > 100 * n + 1000:
            raise DistillError(f"only {len(problems)} distinct problems found for steps {tuple(steps)}; ask for fewer")
        drawn = _one(rng, rng.choice(list(steps)))
        if drawn is None or drawn[0] in seen:
            continue
        seen.add(drawn[0])
        problems.append(Problem(f"gen{seed}-{len(problems)}", drawn[0], drawn[1], str(drawn[2])))
    return problems


def answer_only(problem: Problem) -> str:
    """The completion of an answers-only baseline: just the GSM8K answer line, e.g. "#### 7"."""
    return f"#### {problem.answer}"


def _key(question: str) -> str:
    return " ".join(question.casefold().split())


def split_problems(problems: Sequence[Problem], n_test: int, seed: int = 0) -> tuple[list[Problem], list[Problem]]:
    """(train, test) with n_test problems held out (a few more when the last held-out question has duplicates).

    Problems sharing a question text (up to case and spacing) all land on the same side, so no held-out question
    appears in training. Order within each side is kept.
    """
    groups: dict[str, list[int]] = {}
    for i, problem in enumerate(problems):
        groups.setdefault(_key(problem.question), []).append(i)
    if not 0 <= n_test <= len(problems):
        raise DistillError(f"cannot hold out {n_test} of {len(problems)} problems")
    keys = list(groups)
    random.Random(seed).shuffle(keys)
    held: set[int] = set()
    for key in keys:
        if len(held) >= n_test:
            break
        held.update(groups[key])
    train = [p for i, p in enumerate(problems) if i not in held]
    test = [p for i, p in enumerate(problems) if i in held]
    return train, test


def write_problems(problems: Sequence[Problem], path: Path | str, answers_only: bool = False) -> Path:
    """Problems as GSM8K JSONL ({"question", "answer"} a line; `read_gsm8k` and `lm_data` read it back)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as handle:
        for p in problems:
            answer = answer_only(p) if answers_only else p.solution
            handle.write(json.dumps({"question": p.question, "answer": answer}) + "\n")
    return path
