"""Write problems.jsonl: arithmetic and logic word problems with integer answers.

The problems are templates we wrote, filled with numbers from a fixed seed; each answer is computed
by the same code that writes the question, so it is right by construction. Run from the repository
root: ``python data/make_problems.py`` (the output is committed and stable).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = ["Ana", "Ben", "Chen", "Dara", "Eli", "Fatima", "Gus", "Hana", "Ivan", "Jo", "Kemal", "Lena"]
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def arithmetic(rng: random.Random):
    name, other = rng.sample(NAMES, 2)
    a, b, c = rng.randint(3, 20), rng.randint(2, 9), rng.randint(2, 12)
    yield (
        f"{name} has {a} apples and buys {b} bags with {c} apples each. How many apples does {name} have now?",
        a + b * c,
    )
    p, q = rng.randint(20, 60), rng.randint(2, 9)
    yield (
        f"A box holds {p} pencils. {name} gives {q} pencils to each of 3 friends. How many pencils are left in the box?",
        p - 3 * q,
    )
    s, t = rng.randint(30, 90), rng.randint(2, 5)
    yield (f"A train travels {s} kilometres per hour for {t} hours. How many kilometres does it travel?", s * t)
    x, y = rng.randint(5, 15), rng.randint(5, 15)
    yield (
        f"{name} is {x} years old. {other} is {y} years older than {name}. How old will {other} be in 4 years?",
        x + y + 4,
    )
    n, k = rng.randint(4, 9), rng.randint(3, 8)
    yield (f"There are {n * k} cookies shared equally among {n} children. How many cookies does each child get?", k)
    d, e = rng.randint(10, 40), rng.randint(2, 6)
    yield (
        f"A shirt costs {d} dollars. {name} buys {e} shirts and pays with a 500 dollar note. How much change does {name} get?",
        500 - d * e,
    )


def logic(rng: random.Random):
    a, b, c = rng.sample(NAMES, 3)
    h = sorted(rng.sample(range(140, 190), 3))
    yield (
        f"{a} is taller than {b}, and {b} is taller than {c}. {c} is {h[0]} cm tall, {b} is {h[1]} cm and {a} is {h[2]} cm. "
        f"How many centimetres taller is the tallest person than the shortest?",
        h[2] - h[0],
    )
    start, shift = rng.randrange(7), rng.randint(8, 40)
    yield (
        f"Today is {DAYS[start]}. Counting Monday as day 1 and Sunday as day 7, which day number of the week is it {shift} days from today?",
        (start + shift) % 7 + 1,
    )
    m = rng.randint(10, 30)
    yield (
        f"Every number in a list is either even or odd. The list holds the whole numbers from 1 to {2 * m}. How many of them are odd?",
        m,
    )
    k = rng.randint(3, 7)
    yield (
        f"In a room, every one of {k} people shakes hands once with every other person. How many handshakes happen?",
        k * (k - 1) // 2,
    )
    w = rng.randint(2, 6)
    yield (
        f"A snail climbs 3 metres up a wall each day and slides back 1 metre each night. The wall is {2 * w + 1} metres high. "
        f"On which day does the snail reach the top?",
        w,
    )
    r = rng.randint(3, 9)
    yield (
        f"{a} has twice as many marbles as {b}, and {b} has {r} more marbles than {c}. {c} has {r} marbles. How many marbles does {a} have?",
        2 * (2 * r),
    )


def problems(seed: int = 2026, rounds: int = 6) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rounds):
        for kind, family in (("arithmetic", arithmetic), ("logic", logic)):
            for question, answer in family(rng):
                out.append({"id": f"p{len(out) + 1:03d}", "kind": kind, "question": question, "answer": int(answer)})
    return out


if __name__ == "__main__":
    path = Path(__file__).resolve().parents[1] / "analyses" / "data" / "problems.jsonl"
    path.write_text("".join(json.dumps(p) + "\n" for p in problems()), encoding="utf-8")
    print(path)
