"""The demo model's training corpus: generated here, so it is offline, reproducible and ours to ship.

Short chat exchanges a tiny model can actually learn (arithmetic, counting, spelling, opposites,
plurals, colours, animal sounds, capitals, greetings) and templated children's stories, in the
demo's chat format:

    USER: <question>
    ASSISTANT: <answer></s>

    python demo/corpus.py --out build/demo-data --n 60000 --seed 0

writes train.txt (one conversation per line, "\\n" escaped as the two characters "\\n"), heldout.txt,
and prompts.jsonl (held-out user turns, for the heads trainer and the benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import random

SYSTEM = ""
NUMBER_WORDS = "zero one two three four five six seven eight nine ten eleven twelve".split()
CAPITALS = {
    "France": "Paris", "Germany": "Berlin", "Italy": "Rome", "Spain": "Madrid", "Japan": "Tokyo",
    "China": "Beijing", "India": "New Delhi", "Egypt": "Cairo", "Canada": "Ottawa", "Brazil": "Brasilia",
    "Russia": "Moscow", "Kenya": "Nairobi", "Norway": "Oslo", "Sweden": "Stockholm", "Greece": "Athens",
    "Portugal": "Lisbon", "Ireland": "Dublin", "Poland": "Warsaw", "Austria": "Vienna", "Peru": "Lima",
    "Mexico": "Mexico City", "Australia": "Canberra", "Turkey": "Ankara", "Thailand": "Bangkok",
    "Argentina": "Buenos Aires", "Finland": "Helsinki", "Denmark": "Copenhagen", "Cuba": "Havana",
}
COLOURS = {
    "the sky": "blue", "grass": "green", "snow": "white", "coal": "black", "a banana": "yellow",
    "a strawberry": "red", "an orange": "orange", "a lemon": "yellow", "milk": "white", "a leaf": "green",
    "the sun": "yellow", "a tomato": "red", "chocolate": "brown", "the sea": "blue", "a crow": "black",
}
SOUNDS = {"dog": "barks", "cat": "meows", "cow": "moos", "duck": "quacks", "lion": "roars", "sheep": "baas",
          "horse": "neighs", "owl": "hoots", "pig": "oinks", "frog": "croaks", "bee": "buzzes", "snake": "hisses"}
OPPOSITES = {"hot": "cold", "big": "small", "up": "down", "fast": "slow", "happy": "sad", "old": "new",
             "light": "dark", "open": "closed", "early": "late", "wet": "dry", "loud": "quiet", "full": "empty",
             "hard": "soft", "high": "low", "near": "far", "strong": "weak", "rich": "poor", "thick": "thin"}
PLURALS = {"cat": "cats", "dog": "dogs", "box": "boxes", "child": "children", "mouse": "mice", "foot": "feet",
           "tooth": "teeth", "man": "men", "woman": "women", "baby": "babies", "city": "cities", "leaf": "leaves",
           "knife": "knives", "bus": "buses", "fish": "fish", "sheep": "sheep", "goose": "geese", "story": "stories"}
WORDS = ["cat", "dog", "sun", "tree", "book", "apple", "house", "river", "green", "happy", "table", "water",
         "music", "bird", "light", "cloud", "friend", "garden", "window", "orange", "school", "summer"]
NAMES = ["Tom", "Lily", "Max", "Mia", "Ben", "Sara", "Leo", "Anna", "Sam", "Emma", "Jack", "Zoe"]
ANIMALS = ["cat", "dog", "rabbit", "bird", "fox", "bear", "mouse", "duck", "frog", "horse"]
PLACES = ["the park", "the forest", "the beach", "the garden", "the farm", "the hill", "the river", "the town"]
THINGS = ["a red ball", "a shiny stone", "a small key", "a blue kite", "an old map", "a golden leaf", "a tiny boat"]
FEELINGS = ["happy", "excited", "curious", "brave", "sleepy", "surprised"]


def _arith(r):
    a, b = r.randint(0, 50), r.randint(0, 50)
    op = r.choice(["plus", "minus", "times"])
    if op == "minus" and b > a:
        a, b = b, a
    if op == "times":
        a, b = r.randint(0, 12), r.randint(0, 12)
    v = a + b if op == "plus" else a - b if op == "minus" else a * b
    q = r.choice([f"What is {a} {op} {b}?", f"How much is {a} {op} {b}?", f"Compute {a} {op} {b}."])
    return q, f"{a} {op} {b} is {v}."


def _count(r):
    a = r.randint(0, 20)
    b = a + r.randint(2, 8)
    return f"Count from {a} to {b}.", ", ".join(str(i) for i in range(a, b + 1)) + "."


def _spell(r):
    w = r.choice(WORDS)
    return r.choice([f"Spell the word {w}.", f"How do you spell {w}?"]), f"{w} is spelled " + "-".join(w.upper()) + "."


def _opposite(r):
    a, b = r.choice(list(OPPOSITES.items()))
    if r.random() < 0.5:
        a, b = b, a
    return f"What is the opposite of {a}?", f"The opposite of {a} is {b}."


def _plural(r):
    a, b = r.choice(list(PLURALS.items()))
    return f"What is the plural of {a}?", f"The plural of {a} is {b}."


def _colour(r):
    a, b = r.choice(list(COLOURS.items()))
    return f"What colour is {a}?", f"{a[0].upper() + a[1:]} is {b}."


def _sound(r):
    a, b = r.choice(list(SOUNDS.items()))
    return f"What sound does a {a} make?", f"A {a} {b}."


def _capital(r):
    a, b = r.choice(list(CAPITALS.items()))
    return r.choice([f"What is the capital of {a}?", f"Which city is the capital of {a}?"]), f"The capital of {a} is {b}."


def _greet(r):
    name = r.choice(NAMES)
    q = r.choice(["Hello!", "Hi there.", f"Hello, I am {name}.", "Good morning!", "How are you?"])
    if "I am" in q:
        return q, f"Hello, {name}! It is nice to meet you. How can I help you today?"
    if q == "How are you?":
        return q, "I am doing well, thank you. How can I help you today?"
    return q, "Hello! How can I help you today?"


def _story(r):
    name, animal, place, thing, feel = r.choice(NAMES), r.choice(ANIMALS), r.choice(PLACES), r.choice(THINGS), r.choice(FEELINGS)
    q = r.choice([f"Tell me a story about a {animal} named {name}.", f"Write a short story about {name} the {animal}.",
                  f"Tell me a story about a {animal}."])
    s = (f"Once upon a time, there was a little {animal} named {name}. One day, {name} went to {place}. "
         f"There, {name} found {thing}. {name} felt very {feel}. "
         f"{name} took {thing} home and showed it to a friend. They played together until the sun went down. "
         f"From that day on, {name} went to {place} every day. The end.")
    return q, s


TASKS = [(_arith, 3), (_count, 2), (_spell, 2), (_opposite, 2), (_plural, 2), (_colour, 2), (_sound, 2),
         (_capital, 2), (_greet, 1), (_story, 4)]


def conversation(r: random.Random) -> tuple[str, str]:
    fns, weights = zip(*TASKS)
    return r.choices(fns, weights)[0](r)


def render(q: str, a: str | None) -> str:
    """The demo chat format (the GGUF's chat template renders the same)."""
    return f"USER: {q}\nASSISTANT:" + ("" if a is None else f" {a}")


CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + '\\n' }}"
    "{% elif message['role'] == 'assistant' %}{{ 'ASSISTANT: ' + message['content'] + eos_token + '\\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--n", type=int, default=60000, help="training conversations")
    ap.add_argument("--heldout", type=int, default=400)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    r = random.Random(args.seed)
    with open(os.path.join(args.out, "train.txt"), "w") as f:
        for _ in range(args.n):
            q, a = conversation(r)
            f.write(render(q, a).replace("\n", "\\n") + "\n")
    rh = random.Random(args.seed + 1)
    with open(os.path.join(args.out, "heldout.txt"), "w") as f, open(os.path.join(args.out, "prompts.jsonl"), "w") as g:
        for _ in range(args.heldout):
            q, a = conversation(rh)
            f.write(render(q, a).replace("\n", "\\n") + "\n")
            g.write(json.dumps({"prompt": render(q, None)}) + "\n")
    print(f"wrote {args.n} training and {args.heldout} held-out conversations to {args.out}")


if __name__ == "__main__":
    main()
