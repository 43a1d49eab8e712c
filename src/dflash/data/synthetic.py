"""A synthetic instruction corpus in three flavours that mirror the benchmark families (math, code, chat).

Each generator is seeded and templated, so a small target trained on it answers predictably but not trivially
(numbers, names and list items vary). Used by the smoke phase for the target's pretraining, the training prompts and
the held-out smoke benchmark sets.
"""

from __future__ import annotations

import random

FAMILIES = ("math", "code", "chat")

_NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eve", "Finn", "Gus", "Hana", "Ivy", "Jon", "Kai", "Lia", "Max", "Nia", "Omar",
          "Pia", "Raj", "Sam", "Tia", "Uma"]
_ITEMS = ["apples", "books", "coins", "stamps", "marbles", "pencils", "cookies", "shells", "cards", "flowers"]
_COUNTRIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Egypt": "Cairo",
              "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo", "India": "New Delhi",
              "Chile": "Santiago", "Greece": "Athens"}
_ANIMALS = {"cats": ("curious", "climb", "nap in the sun"), "dogs": ("loyal", "run", "play fetch"),
            "owls": ("quiet", "fly at night", "hunt mice"), "horses": ("strong", "gallop", "eat hay"),
            "rabbits": ("gentle", "hop", "dig burrows"), "bees": ("busy", "collect nectar", "build hives"),
            "dolphins": ("clever", "swim fast", "jump over waves"), "foxes": ("shy", "sneak", "hide in dens")}
_TIPS = {"studying": ["Set a fixed time each day.", "Take short breaks.", "Review your notes.", "Sleep well."],
         "cooking": ["Read the recipe first.", "Prepare all ingredients.", "Taste as you go.", "Keep knives sharp."],
         "running": ["Warm up before you start.", "Drink enough water.", "Increase distance slowly.",
                     "Wear good shoes."],
         "saving money": ["Make a budget.", "Cook at home.", "Avoid impulse buys.", "Save a part of every pay."],
         "sleeping well": ["Go to bed at the same time.", "Avoid screens late.", "Keep the room dark.",
                           "Limit coffee after noon."]}
_OPS = {"sum": ("0", "result + x", "adds every number to a running total"),
        "product": ("1", "result * x", "multiplies the numbers together"),
        "maximum": ("numbers[0]", "max(result, x)", "keeps the largest number seen so far"),
        "minimum": ("numbers[0]", "min(result, x)", "keeps the smallest number seen so far"),
        "count of even numbers": ("0", "result + (x % 2 == 0)", "counts the numbers divisible by two")}
_SCALAR = {"plus": "+", "minus": "-", "times": "*"}


def _math(rng: random.Random) -> tuple[str, str]:
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    a, b = rng.randint(2, 40), rng.randint(2, 30)
    kind = rng.randrange(3)
    if kind == 0:
        q = f"{name} has {a} {item}. {name} buys {b} more. How many {item} does {name} have now?"
        r = (f"{name} starts with {a} {item} and buys {b} more.\nSo {name} has {a} + {b} = {a + b} {item}.\n"
             f"The answer is \\boxed{{{a + b}}}.")
    elif kind == 1:
        a, b = max(a, b), min(a, b)
        q = f"{name} had {a} {item} and gave away {b}. How many {item} are left?"
        r = (f"{name} starts with {a} {item} and gives away {b}.\nSo {a} - {b} = {a - b} {item} are left.\n"
             f"The answer is \\boxed{{{a - b}}}.")
    else:
        a, b = rng.randint(2, 9), rng.randint(2, 9)
        q = f"{name} has {a} boxes with {b} {item} in each box. How many {item} are there in total?"
        r = (f"There are {a} boxes and each box holds {b} {item}.\nSo there are {a} * {b} = {a * b} {item}.\n"
             f"The answer is \\boxed{{{a * b}}}.")
    return q + "\nPlease reason step by step, and put your final answer within \\boxed{}.", r


def _code(rng: random.Random) -> tuple[str, str]:
    if rng.random() < 0.5:
        op = rng.choice(list(_OPS))
        init, expr, how = _OPS[op]
        fname = op.split()[0] + "_of_" + rng.choice(["values", "numbers", "items", "data"])
        q = f"Write a Python function `{fname}` that returns the {op} of a list of numbers."
        r = (f"```python\ndef {fname}(numbers):\n    result = {init}\n    for x in numbers:\n"
             f"        result = {expr}\n    return result\n```\nThe function {how} and returns the result.")
    else:
        word = rng.choice(list(_SCALAR))
        k = rng.randint(2, 12)
        fname = f"{word}_{k}"
        q = f"Write a Python function `{fname}(x)` that returns x {word} {k}."
        r = (f"```python\ndef {fname}(x):\n    return x {_SCALAR[word]} {k}\n```\n"
             f"For example, {fname}(10) returns {eval(f'10 {_SCALAR[word]} {k}')}.")
    return q, r


def _chat(rng: random.Random) -> tuple[str, str]:
    kind = rng.randrange(3)
    if kind == 0:
        country = rng.choice(list(_COUNTRIES))
        q = f"What is the capital of {country}?"
        r = f"The capital of {country} is {_COUNTRIES[country]}. It is the largest political center of {country}."
    elif kind == 1:
        animal = rng.choice(list(_ANIMALS))
        adj, v1, v2 = _ANIMALS[animal]
        q = f"Tell me about {animal}."
        r = (f"{animal.capitalize()} are {adj} animals. They like to {v1} and {v2}.\n"
             f"Many people enjoy watching {animal}.")
    else:
        topic = rng.choice(list(_TIPS))
        n = rng.randint(2, 4)
        q = f"Give me {n} tips for {topic}."
        tips = "\n".join(f"{i + 1}. {t}" for i, t in enumerate(_TIPS[topic][:n]))
        r = f"Here are {n} tips for {topic}:\n{tips}\nGood luck with {topic}!"
    return q, r


_GEN = {"math": _math, "code": _code, "chat": _chat}


def examples(family: str, n: int, seed: int) -> list[tuple[str, str]]:
    """n (prompt, response) pairs of one family; the same (family, n, seed) always gives the same list."""
    if family not in _GEN:
        raise ValueError(f"unknown synthetic family {family!r}; expected one of {FAMILIES}")
    rng = random.Random(f"{family}:{seed}")
    return [_GEN[family](rng) for _ in range(n)]


def mixed(n: int, seed: int) -> list[tuple[str, str, str]]:
    """n (family, prompt, response) triples cycling through the families."""
    per = [examples(f, (n + len(FAMILIES) - 1) // len(FAMILIES), seed) for f in FAMILIES]
    out = [(FAMILIES[i % 3], *per[i % 3][i // 3]) for i in range(n)]
    return out


# Seeds used by the project's own sets, kept apart so training prompts never equal benchmark prompts by seed.
PRETRAIN_SEED, TRAIN_PROMPT_SEED, BENCH_SEED = 1000, 2000, 3000
