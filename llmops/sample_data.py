"""The embedded sample: instruction tasks whose answers can be checked exactly, and a text corpus.

Everything is drawn from one `random.Random(seed)`, so the same seed gives the
same rows in the same order on every machine. Each task family is registered
with a generator returning (prompt, response); `solve` recomputes the answer from
the prompt, which is how tests (and later the evaluation) check exactness.
"""

from __future__ import annotations

import random
import re
from typing import Callable

WORDS = """
apple river stone garden planet window silver bridge forest candle marble pencil
orange rocket yellow castle dragon mirror summer winter spring autumn cloud thunder
basket button copper desert engine feather guitar harbor island jacket kettle ladder
meadow needle ocean pepper quartz rabbit saddle tunnel velvet wagon zebra anchor
blanket cactus dolphin falcon glacier hammer insect jungle lantern magnet nectar
orchid parrot quiver ribbon shadow timber violet walnut lemon tiger piano coffee
""".split()

UNITS = {  # name -> (target unit, factor): exact integer conversions only
    "kilometers": ("meters", 1000),
    "meters": ("centimeters", 100),
    "kilograms": ("grams", 1000),
    "hours": ("minutes", 60),
    "minutes": ("seconds", 60),
    "feet": ("inches", 12),
    "yards": ("feet", 3),
    "liters": ("milliliters", 1000),
}

Task = Callable[[random.Random], tuple[str, str]]
TASKS: dict[str, Task] = {}


def task(name: str):
    def register(fn: Task) -> Task:
        TASKS[name] = fn
        return fn

    return register


@task("add")
def _add(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} + {b}?", str(a + b)


@task("subtract")
def _subtract(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 999), rng.randint(0, 999)
    return f"What is {a} - {b}?", str(a - b)


@task("multiply")
def _multiply(rng: random.Random) -> tuple[str, str]:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    return f"What is {a} * {b}?", str(a * b)


@task("reverse")
def _reverse(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Reverse the word '{word}'.", word[::-1]


@task("uppercase")
def _uppercase(rng: random.Random) -> tuple[str, str]:
    words = " ".join(rng.sample(WORDS, 2))
    return f"Write '{words}' in uppercase.", words.upper()


@task("count_letters")
def _count_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"How many letters are in '{word}'?", str(len(word))


@task("sort_letters")
def _sort_letters(rng: random.Random) -> tuple[str, str]:
    word = rng.choice(WORDS)
    return f"Sort the letters of '{word}' alphabetically.", "".join(sorted(word))


@task("convert_units")
def _convert_units(rng: random.Random) -> tuple[str, str]:
    unit = rng.choice(sorted(UNITS))
    target, factor = UNITS[unit]
    n = rng.randint(1, 50)
    return f"Convert {n} {unit} to {target}.", f"{n * factor} {target}"


_SOLVERS: list[tuple[re.Pattern, Callable[..., str]]] = [
    (re.compile(r"What is (\d+) \+ (\d+)\?"), lambda a, b: str(int(a) + int(b))),
    (re.compile(r"What is (\d+) - (\d+)\?"), lambda a, b: str(int(a) - int(b))),
    (re.compile(r"What is (\d+) \* (\d+)\?"), lambda a, b: str(int(a) * int(b))),
    (re.compile(r"Reverse the word '(\w+)'\."), lambda w: w[::-1]),
    (re.compile(r"Write '([\w ]+)' in uppercase\."), str.upper),
    (re.compile(r"How many letters are in '(\w+)'\?"), lambda w: str(len(w))),
    (re.compile(r"Sort the letters of '(\w+)' alphabetically\."), lambda w: "".join(sorted(w))),
    (re.compile(r"Convert (\d+) (\w+) to (\w+)\."), lambda n, u, t: f"{int(n) * UNITS[u][1]} {t}"),
]


def solve(prompt: str) -> str | None:
    """The exact answer to a generated prompt, recomputed from its text; None if not a sample task."""
    for pattern, answer in _SOLVERS:
        m = pattern.fullmatch(prompt)
        if m:
            return answer(*m.groups())
    return None


def instructions(seed: int, n: int) -> list[dict[str, str]]:
    """`n` distinct instruction rows {prompt, response, task}, drawn round-robin from the task families.

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
        prompt, response = TASKS[name](rng)
        if prompt in seen:
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


_SENTENCES = [
    "The {a} {noun} rests beside the {noun2}.",
    "A {noun} and a {noun2} were found near the {noun3}.",
    "Every {season} the {noun} turns {color}.",
    "She carried the {noun} across the {noun2} before the {weather}.",
    "Nobody expected the {noun} to outlast the {noun2}.",
    "The word {word} has {length} letters.",
    "Reversed, the word {word} reads {reversed}.",
    "{x} plus {y} equals {sum}.",
    "{x} minus {y} equals {diff}.",
    "{n} {unit} are {converted}.",
]


def corpus(seed: int, lines: int) -> str:
    """Plain English pretraining text: `lines` templated sentences, some stating checkable facts."""
    rng = random.Random(seed + 1)  # its own stream: the corpus does not echo the instruction rows
    colors = ["red", "green", "gold", "grey", "blue", "brown"]
    out = []
    for _ in range(lines):
        unit = rng.choice(sorted(UNITS))
        target, factor = UNITS[unit]
        n, x, y, word = rng.randint(1, 50), rng.randint(0, 999), rng.randint(0, 999), rng.choice(WORDS)
        nouns = rng.sample(WORDS, 3)
        out.append(
            rng.choice(_SENTENCES).format(
                a=rng.choice(["old", "small", "bright", "quiet", "heavy"]),
                noun=nouns[0], noun2=nouns[1], noun3=nouns[2],
                season=rng.choice(["summer", "winter", "spring", "autumn"]),
                color=rng.choice(colors), weather=rng.choice(["storm", "rain", "snow", "dusk"]),
                word=word, length=len(word), reversed=word[::-1],
                x=x, y=y, sum=x + y, diff=x - y,
                n=n, unit=unit, converted=f"{n * factor} {target}",
            )
        )
    return "\n".join(out) + "\n"
