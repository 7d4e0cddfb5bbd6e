"""The embedded sample: instruction tasks whose answers can be checked exactly, and a text corpus.

Everything is drawn from one `random.Random(seed)`, so the same seed gives the
same rows in the same order on every machine. Each task family is registered
with a generator returning (prompt, response, statement); `solve` recomputes the
answer from the prompt, which is how tests (and later the evaluation) check exactness.

The families are skills a small character-level model learns in a few minutes on a
CPU: reading letters off made-up words (so no answer can be recalled from a list),
counting them, stepping and comparing numbers, converting units by powers of ten.

The corpus teaches the same skills in plain sentences and in question/answer lines,
about other instances: every item (a prompt) belongs either to the corpus or to the
instruction rows, by a hash of its text, never to both. No answer of the eval split
(nor of the train split) is in the pretraining text, so exact match on the eval
split measures the skill, not recall.
"""

from __future__ import annotations

import random
import re
import zlib
from typing import Callable

UNITS = {  # name -> (target unit, factor): exact conversions by powers of ten
    "centimeters": ("millimeters", 10),
    "centuries": ("years", 100),
    "decades": ("years", 10),
    "kilograms": ("grams", 1000),
    "kilometers": ("meters", 1000),
    "liters": ("milliliters", 1000),
    "meters": ("centimeters", 100),
    "tonnes": ("kilograms", 1000),
}
CONSONANTS, VOWELS = "bcdfghklmnprstvz", "aeiou"

Task = Callable[[random.Random], tuple[str, str, str]]  # rng -> (prompt, response, the fact as a sentence)
TASKS: dict[str, Task] = {}


def task(name: str):
    def register(fn: Task) -> Task:
        TASKS[name] = fn
        return fn

    return register


def made_up_word(rng: random.Random) -> str:
    """A pronounceable made-up word of 3 to 8 letters ('tamuzo', 'ekvalo')."""
    while True:
        word = "".join(rng.choice(CONSONANTS) + rng.choice(VOWELS) + (rng.choice(CONSONANTS) if rng.random() < 0.3 else "")
                       for _ in range(rng.randint(2, 3)))
        if rng.random() < 0.3:
            word = rng.choice(VOWELS) + word
        if 3 <= len(word) <= 8:
            return word


@task("count_letters")
def _count_letters(rng: random.Random) -> tuple[str, str, str]:
    w = made_up_word(rng)
    return f"How many letters are in '{w}'?", str(len(w)), f"The word {w} has {len(w)} letters."


@task("first_letter")
def _first_letter(rng: random.Random) -> tuple[str, str, str]:
    w = made_up_word(rng)
    return f"What is the first letter of '{w}'?", w[0], f"The word {w} starts with {w[0]}."


@task("last_letter")
def _last_letter(rng: random.Random) -> tuple[str, str, str]:
    w = made_up_word(rng)
    return f"What is the last letter of '{w}'?", w[-1], f"The word {w} ends with {w[-1]}."


@task("next_number")
def _next_number(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(0, 999)
    return f"What number comes after {n}?", str(n + 1), f"After {n} comes {n + 1}."


@task("prev_number")
def _prev_number(rng: random.Random) -> tuple[str, str, str]:
    n = rng.randint(1, 999)
    return f"What number comes before {n}?", str(n - 1), f"Before {n} comes {n - 1}."


@task("larger")
def _larger(rng: random.Random) -> tuple[str, str, str]:
    a, b = rng.sample(range(100), 2)
    return f"Which is larger, {a} or {b}?", str(max(a, b)), f"Of {a} and {b}, the larger is {max(a, b)}."


@task("convert_units")
def _convert_units(rng: random.Random) -> tuple[str, str, str]:
    unit = rng.choice(sorted(UNITS))
    target, factor = UNITS[unit]
    n = rng.randint(1, 99)
    return f"Convert {n} {unit} to {target}.", f"{n * factor} {target}", f"{n} {unit} are {n * factor} {target}."


_SOLVERS: dict[str, tuple[re.Pattern, Callable[..., str | None]]] = {  # task family -> (its prompt, its answer)
    "count_letters": (re.compile(r"How many letters are in '([a-z]+)'\?"), lambda w: str(len(w))),
    "first_letter": (re.compile(r"What is the first letter of '([a-z]+)'\?"), lambda w: w[0]),
    "last_letter": (re.compile(r"What is the last letter of '([a-z]+)'\?"), lambda w: w[-1]),
    "next_number": (re.compile(r"What number comes after (\d+)\?"), lambda n: str(int(n) + 1)),
    "prev_number": (re.compile(r"What number comes before (\d+)\?"), lambda n: str(int(n) - 1)),
    "larger": (re.compile(r"Which is larger, (\d+) or (\d+)\?"), lambda a, b: str(max(int(a), int(b)))),
    "convert_units": (re.compile(r"Convert (\d+) (\w+) to (\w+)\."),
                      lambda n, u, t: f"{int(n) * UNITS[u][1]} {t}" if UNITS.get(u, ("", 0))[0] == t else None),
}


def check(prompt: str) -> tuple[str, str] | None:
    """(task family, exact answer) of a generated prompt, recomputed from its text; None if not a sample task."""
    for name, (pattern, answer) in _SOLVERS.items():
        m = pattern.fullmatch(prompt.strip())
        if m and (expected := answer(*m.groups())) is not None:
            return name, expected
    return None


def solve(prompt: str) -> str | None:
    """The exact answer to a generated prompt, recomputed from its text; None if not a sample task."""
    found = check(prompt)
    return found and found[1]


def in_corpus_share(prompt: str) -> bool:
    """Whether an item belongs to the corpus (a quarter of each family, by a hash of its prompt) or to the rows."""
    return zlib.crc32(prompt.encode()) % 4 == 0


def instructions(seed: int, n: int) -> list[dict[str, str]]:
    """`n` distinct instruction rows {prompt, response, task}, drawn round-robin from the task families.

    Items of the corpus's share are skipped, so no row's answer is stated in the corpus.

    Raises:
        ValueError: the task families cannot produce `n` distinct prompts.
    """
    rng = random.Random(seed)
    names = list(TASKS)
    rows, seen = [], set()
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n:
            raise ValueError(f"could only generate {len(rows)} distinct examples, asked for {n}")
        name = names[attempts % len(names)]  # a family that runs out of prompts yields to the others
        prompt, response, _ = TASKS[name](rng)
        if prompt in seen or in_corpus_share(prompt):
            continue
        seen.add(prompt)
        rows.append({"prompt": prompt, "response": response, "task": name})
    return rows


def split(rows: list[dict], eval_fraction: float, seed: int) -> tuple[list[dict], list[dict]]:
    """Shuffle with `seed` and hold out `eval_fraction` of the rows (at least one on each side)."""
    if len(rows) < 2:
        raise ValueError(f"need at least 2 rows to split into train and eval, got {len(rows)}")
    order = list(rows)
    random.Random(seed).shuffle(order)
    n_eval = min(max(1, round(len(order) * eval_fraction)), len(order) - 1)
    return order[n_eval:], order[:n_eval]


def corpus(seed: int, lines: int) -> str:
    """Pretraining text: `lines` lines, each a fact of a task family, as a sentence or as a Q/A line.

    Only items of the corpus's share (`in_corpus_share`) appear, so no instruction row's answer does.
    """
    rng = random.Random(seed + 1)  # its own stream: the corpus does not echo the instruction rows
    names = list(TASKS)
    out = []
    for _ in range(lines):
        generate = TASKS[rng.choice(names)]
        while True:
            prompt, response, statement = generate(rng)
            if in_corpus_share(prompt):
                break
        out.append(f"Q: {prompt} A: {response}" if rng.random() < 0.5 else statement)
    return "\n".join(out) + "\n"
