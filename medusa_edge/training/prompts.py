"""Assistant-style prompts for self-distillation: what people ask a chat model, generated.

    medusa-edge prompts -n 3000 --seed 0 -o prompts.jsonl [--heldout heldout.jsonl]

Medusa heads learn what the base writes after the prompts they are trained on, so the prompts
should look like the ones they will serve. This generator combines task templates (explain,
list, compare, how-to, write, summarise, code, maths, advice, rewrite, classify, plan) with
topics from many fields, and fills maths and code tasks with random numbers and small problems.
``--n-more`` appends a second set of kinds (role play, answering from a text given in the prompt,
reasoning puzzles, discussion, writing under a constraint). It is deterministic for a seed.

Held-out split: every topic belongs to one split (a fixed hash of its text), so held-out
prompts are about topics the training prompts never mention, not paraphrases of them.
Nothing here is taken from MT-Bench; the benchmark prompts stay unseen.

``load_prompts`` reads a prompt list back (this generator's JSONL, MT-Bench's, chat logs): the
one loader of the trainer, ``medusa-edge verify`` and ``medusa-edge bench``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import sys

TOPICS = {
    "science": [
        "photosynthesis", "black holes", "plate tectonics", "the water cycle", "DNA replication", "vaccines",
        "the greenhouse effect", "quantum entanglement", "natural selection", "the immune system", "volcanoes",
        "the speed of light", "antibiotic resistance", "the periodic table", "ocean tides", "earthquakes",
        "nuclear fusion", "the human heart", "rainbows", "magnetism", "the big bang", "sleep", "gravity",
        "cloud formation", "the nitrogen cycle", "coral reefs", "stem cells", "climate change", "lightning",
        "the moon's phases", "entropy", "enzymes", "dark matter", "bird migration", "the nervous system",
    ],
    "technology": [
        "how the internet works", "machine learning", "public key cryptography", "solar panels", "electric cars",
        "GPS", "databases", "cloud computing", "blockchains", "3D printing", "compilers", "Wi-Fi", "lithium batteries",
        "operating systems", "search engines", "recommendation systems", "password managers", "open source software",
        "version control with git", "neural networks", "web browsers", "virtual memory", "containers and Docker",
        "smartphone cameras", "data compression", "email spam filters", "large language models", "wind turbines",
    ],
    "history": [
        "the Roman Empire", "the printing press", "the Industrial Revolution", "the French Revolution",
        "the Silk Road", "ancient Egypt", "the Renaissance", "the space race", "the Cold War", "the Ming dynasty",
        "the invention of the telephone", "the fall of the Berlin Wall", "the Maya civilisation", "the Vikings",
        "the history of vaccines", "the Ottoman Empire", "the abolition of slavery", "the first moon landing",
        "the history of money", "the Black Death", "ancient Greek democracy", "the invention of writing",
    ],
    "economics": [
        "inflation", "compound interest", "supply and demand", "index funds", "budgeting", "credit scores",
        "recessions", "taxes", "opportunity cost", "international trade", "central banks", "the stock market",
        "startups", "minimum wage", "insurance", "mortgages", "cryptocurrency", "retirement savings",
    ],
    "health": [
        "a balanced diet", "regular exercise", "stress", "hydration", "posture at a desk", "running a first 5K",
        "healthy sleep habits", "meditation", "strength training", "vitamin D", "screen time", "seasonal allergies",
        "stretching", "cooking at home", "reducing sugar", "walking every day", "caffeine",
    ],
    "everyday": [
        "cooking rice", "a job interview", "moving to a new city", "learning a language", "keeping houseplants alive",
        "packing for a trip", "saving money on groceries", "cleaning a kitchen", "writing a CV", "public speaking",
        "making new friends", "time management", "a birthday party", "adopting a dog", "buying a used car",
        "growing tomatoes", "remote work", "a long flight", "decluttering", "baking bread", "starting a podcast",
        "a camping trip", "negotiating a salary", "a wedding speech", "learning to swim", "training a puppy",
    ],
    "culture": [
        "jazz", "haiku", "impressionist painting", "the Olympic Games", "chess", "science fiction", "street food",
        "Shakespeare", "classical music", "film noir", "origami", "video games", "photography", "architecture",
        "board games", "poetry", "the history of football", "tea ceremonies", "comic books", "opera", "mythology",
    ],
    "nature": [
        "rainforests", "deserts", "honey bees", "whales", "mountains", "rivers", "owls", "octopuses", "wolves",
        "the Arctic", "mushrooms", "butterflies", "penguins", "elephants", "tropical storms", "autumn leaves",
        "sharks", "cacti", "the Sahara", "wetlands", "ants", "tigers", "glaciers",
    ],
}

PLACES = ["Lisbon", "Kyoto", "a small mountain village", "Mars", "a lighthouse", "a busy train station", "Nairobi",
          "a space station", "an old library", "Buenos Aires", "a farm", "the deep sea", "Reykjavik", "a desert town"]
CHARACTERS = ["a curious robot", "a retired sailor", "a young inventor", "a talking cat", "a lonely astronaut",
              "a baker", "two old friends", "a detective", "a shy dragon", "a grandmother", "a street musician", "a fox"]
AUDIENCES = ["a five-year-old", "a high-school student", "a busy manager", "a beginner", "an expert", "my grandmother",
             "a new employee", "a tourist"]
LANGS = ["Python", "JavaScript", "C", "Rust", "Go", "Java", "SQL", "Bash", "C++", "TypeScript"]
CODE_TASKS = [
    "reverses a string", "checks whether a number is prime", "counts the words in a text file",
    "finds the largest element of a list", "merges two sorted lists", "computes the Fibonacci numbers up to n",
    "removes duplicates from a list while keeping the order", "converts Celsius to Fahrenheit",
    "checks whether a string is a palindrome", "sorts a list of names alphabetically", "parses a CSV line",
    "computes the factorial of n", "returns the n most common words in a text", "validates an email address",
    "implements binary search", "flattens a nested list", "computes the average of a list of numbers",
    "finds all pairs of numbers in a list that sum to a target", "reads a JSON file and prints its keys",
    "implements a stack with push and pop", "converts a number to Roman numerals", "computes the GCD of two numbers",
    "transposes a matrix", "checks whether two strings are anagrams", "generates a random password",
]
WRITE_KINDS = ["a short story", "a poem", "a limerick", "a haiku", "a product description", "a cover letter",
               "a thank-you note", "a blog post introduction", "a speech", "a short dialogue", "a news headline and lede",
               "a fable", "a song chorus", "a recipe introduction", "a tweet"]
EMAIL_PURPOSES = ["asking for a day off", "inviting colleagues to a workshop", "apologising for a late delivery",
                  "following up after a meeting", "requesting a refund", "introducing a new team member",
                  "asking a professor for a recommendation letter", "declining an invitation politely"]
ADVICE = ["I can't fall asleep at night", "I want to change careers", "I procrastinate a lot",
          "my flatmate is messy", "I am nervous about an exam", "I want to read more books",
          "I feel unmotivated at work", "I want to start exercising", "I have too many meetings",
          "I want to learn to code", "I forget people's names", "my team misses deadlines",
          "I want to eat healthier on a budget", "I have a long commute", "I want to save for a house"]

TEMPLATES = {
    "explain": [
        "Explain {t} in simple terms.", "What is {t}?", "How does {t} work?", "Can you explain {t} to {a}?",
        "Why is {t} important?", "Give me a short introduction to {t}.", "What should everyone know about {t}?",
        "Explain the basic idea behind {t} in three paragraphs.", "I never understood {t}. Can you help?",
    ],
    "list": [
        "List five interesting facts about {t}.", "Give me {n} tips about {t}.", "What are the main advantages and disadvantages of {t}?",
        "List the key terms someone learning about {t} should know.", "Name {n} common misconceptions about {t}.",
        "What are {n} questions I could ask an expert on {t}?", "Give me a checklist for {t}.",
    ],
    "compare": [
        "Compare {t} and {u}.", "What is the difference between {t} and {u}?", "Which is more interesting, {t} or {u}? Explain.",
        "How are {t} and {u} similar?", "Write a short comparison table of {t} and {u}.",
    ],
    "howto": [
        "How do I get started with {t}?", "Give me step-by-step instructions for {t}.", "What is the best way to learn about {t}?",
        "How can I explain {t} to {a}?", "Walk me through {t} for a complete beginner.",
    ],
    "write": [
        "Write {w} about {t}.", "Write {w} set in {p}.", "Write {w} about {c}.", "Write {w} about {c} in {p}.",
        "Compose {w} that mentions {t}.", "Write {w} for {a} about {t}.",
    ],
    "email": ["Write an email {e}.", "Draft a short, polite email {e}.", "Help me write a message {e}."],
    "summarise": [
        "Summarise what is known about {t} in a few sentences.", "Give me a one-paragraph summary of {t}.",
        "Summarise the history of {t} for {a}.", "What are the three most important points about {t}?",
        "TL;DR of {t}, please.",
    ],
    "code": [
        "Write a {l} function that {k}.", "How do I write a program in {l} that {k}?", "Show me {l} code that {k}, with comments.",
        "Write a {l} function that {k}, and explain how it works.", "What is a clean way in {l} to write code that {k}?",
        "Explain what a function that {k} does, then write it in {l}.",
    ],
    "maths": [
        "What is {x} times {y}?", "What is {x} plus {y} minus {z}?", "If a shirt costs {x} dollars and is {pc}% off, what is the price?",
        "Solve for x: {a1}x + {b1} = {c1}.", "A train travels {x} km in {h} hours. What is its average speed?",
        "What is {pc}% of {x}?", "How many minutes are there in {h} days?", "Is {x} a prime number? Explain.",
        "What is the area of a rectangle {h} m wide and {y} m long?", "Convert {x} kilometres to miles.",
        "If I save {y} dollars a month, how long until I have {x} dollars?", "What is the square root of {sq}?",
    ],
    "advice": [
        "{v}. What should I do?", "{v}. Any advice?", "Can you help me? {v}.", "{v}. Give me a plan for the next week.",
        "My friend says: \"{v}.\" How can I help them?",
    ],
    "rewrite": [
        "Rewrite this sentence to sound more formal: \"hey, {t} is kind of cool, you should check it out.\"",
        "Make this clearer: \"The thing about {t} is that it is a thing that matters for a lot of reasons.\"",
        "Turn this into a bulleted list: {t} is old, it is studied widely, it changes over time, and people disagree about it.",
        "Correct the grammar: \"me and him goes to learn about {t} yesterday and it were great.\"",
        "Rewrite for {a}: \"{T} involves complex interactions that are not fully understood.\"",
    ],
    "classify": [
        "Is {t} a topic in science, history, economics or culture? Explain briefly.",
        "Sort these into categories: {t}, {u}, {t2}.", "Which of these is the odd one out: {t}, {u}, {t2}? Why?",
    ],
    "plan": [
        "Make a one-week study plan to learn about {t}.", "Plan a day trip to {p}.", "Create a 30-day plan for {t}.",
        "Outline a presentation about {t} for {a}.", "Plan a lesson about {t} for {a}.",
        "Give me an itinerary for three days in {p}.",
    ],
}


#: Draws that take the kinds of task in turn (the shipped heads' prompts were made with this value).
ROUND_ROBIN_DRAWS = 4000

# -- a second set of kinds, appended after the first (``generate(..., n_more=)``) ----------------
# Kinds of request the first set never writes: speaking as a character, answering from a text
# given in the prompt, small reasoning puzzles, open discussion questions, writing under a stated
# constraint. Appended, so a data cache of the first set's prompts extends.
PEOPLE = ["Maria", "Kenji", "Amara", "Lukas", "Priya", "Tom", "Sofia", "Omar", "Chen", "Fatima", "Ivan", "Grace"]
JOBS = ["chef", "nurse", "software engineer", "teacher", "pilot", "librarian", "farmer", "detective", "lawyer",
        "museum guide", "personal trainer", "journalist", "architect", "shop owner", "scientist"]
PRODUCTS = ["wireless headphones", "a coffee machine", "a running shoe", "a laptop bag", "a smart watch", "an electric bike",
            "a desk lamp", "a blender", "a phone case", "a tent"]
CONSTRAINTS = ["in under 100 words", "in exactly three sentences", "without using the letter e in the first sentence",
               "as a numbered list", "in a formal tone", "in the style of a news report", "with a surprising ending",
               "using only simple words", "as a dialogue between two people", "in five bullet points"]

TEMPLATES_MORE = {
    "roleplay": [
        "Pretend you are {c}. Describe your morning.", "Act as a {j}. What does a typical day look like for you?",
        "Imagine you are a tour guide in {p}. Welcome your group and describe the first stop.",
        "You are {c}. Give a short speech to {a} about {t}.",
        "Role-play a job interview for a {j} position: you are the interviewer. Ask your first three questions.",
        "You are a {j} talking to {a}. Explain what you do and why it matters.",
        "Stay in character as {c} and answer: what is the best advice you ever got?",
    ],
    "extract": [
        "Extract every name, city and number from this text: \"{P1} moved from {p} to {p2} in {yr} with {x} books, "
        "and {P2} joined a year later.\"",
        "From this review, give the product, the rating and the main complaint: \"I bought {r} last month. "
        "It is fine, but the battery dies after {h} hours. {st} stars.\"",
        "Read this and answer in one sentence, who met whom and where? \"On a rainy day in {p}, {P1} finally met {P2}, "
        "a {j} who had written to them for {h} years.\"",
        "Turn this into JSON with the keys name, job and city: \"{P1} works as a {j} in {p}.\"",
        "What is the main claim of this paragraph? \"Many people think {t} is simple. In fact, experts still disagree "
        "about it, and new findings appear every year.\"",
        "List the dates and amounts in this note: \"Paid {x} dollars on {d1}, then {y} dollars on {d2}.\"",
    ],
    "reason": [
        "{P1} is taller than {P2}, and {P2} is taller than {P3}. Who is the shortest? Explain.",
        "I have {x} apples. I give away {z} and buy {h} more. How many do I have now? Think step by step.",
        "What comes next in the sequence {s1}, {s2}, {s3}, {s4}? Explain the pattern.",
        "If all {j}s in a town are early risers and {P1} is a {j} in that town, what can we conclude? What can't we?",
        "A meeting starts at {hh}:00 and lasts {m} minutes. When does it end?",
        "{P1} is twice as old as {P2}. In {h} years {P2} will be {age}. How old is {P1} now?",
        "There are {h} red balls and {z} blue balls in a bag. What is the chance of drawing a red one?",
        "Which weighs more, {x} kg of feathers or {y} kg of iron? Explain.",
    ],
    "discuss": [
        "Discuss the impact of {t} on everyday life.", "What are the arguments for and against {t}? Give a balanced view.",
        "How might {t} change in the next twenty years?", "What can we learn from the history of {t}?",
        "Describe how {t} affects {a}.", "What would happen if {t} disappeared tomorrow?",
        "Is {t} overrated or underrated? Argue one side.",
    ],
    "constrained": [
        "Write a short story about {c} {k2}.", "Describe {p} {k2}.", "Explain {t} {k2}.",
        "Write a product announcement for {r} {k2}.", "Write a travel blog post about {p} {k2}.",
        "Write a persuasive paragraph about {t} {k2}.", "Give advice to {a} about {t} {k2}.",
    ],
}


def _draw(n: int, rng: random.Random, templates: dict, fields) -> list:
    """``n`` distinct prompts from ``templates``, the kinds in turn, then at random once some have
    run out of distinct prompts; ``fields(rng)`` fills a template. Never depends on ``n``, so a
    list is a prefix of any longer one."""
    kinds = sorted(templates)
    out, seen = [], set()
    attempts = 0
    while len(out) < n and attempts < 50 * n + 100:
        attempts += 1
        kind = kinds[len(out) % len(kinds)] if attempts <= ROUND_ROBIN_DRAWS else rng.choice(kinds)
        tmpl = rng.choice(templates[kind])
        text = tmpl.format(**fields(rng))
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def _fields(rng: random.Random, pools: dict) -> dict:
    """What the first set's templates take."""
    t, u, t2 = rng.sample(pools["t"], 3) if len(pools["t"]) >= 3 else (pools["t"] * 3)[:3]
    x = rng.choice([rng.randint(2, 99), rng.randint(100, 999), rng.randint(1000, 20000)])
    return dict(
        t=t, T=t[:1].upper() + t[1:], u=u, t2=t2, a=rng.choice(AUDIENCES), n=rng.choice([3, 4, 5, 7, 10]),
        w=rng.choice(WRITE_KINDS), p=rng.choice(pools["p"]), c=rng.choice(pools["c"]), l=rng.choice(LANGS),
        k=rng.choice(pools["k"]), e=rng.choice(pools["e"]), v=rng.choice(pools["v"]), x=x,
        y=rng.randint(2, 500), z=rng.randint(1, 99), h=rng.randint(2, 12), pc=rng.choice([5, 10, 15, 20, 25, 30, 40, 50, 75]),
        a1=rng.randint(2, 12), b1=rng.randint(1, 50), c1=rng.randint(51, 200), sq=rng.randint(2, 30) ** 2,
    )


def _fields_more(rng: random.Random, pools: dict) -> dict:
    """What the second set's templates take."""
    p1, p2, p3 = rng.sample(PEOPLE, 3)
    pl, pl2 = rng.sample(pools["p"], 2) if len(pools["p"]) >= 2 else (pools["p"] * 2)[:2]
    a0, step = rng.randint(1, 9), rng.randint(2, 5)
    seq = rng.choice([[a0 + i * step for i in range(4)], [a0 * step ** i for i in range(4)], [(a0 + i) ** 2 for i in range(4)]])
    h = rng.randint(2, 12)
    return dict(
        t=rng.choice(pools["t"]), a=rng.choice(AUDIENCES), c=rng.choice(pools["c"]), p=pl, p2=pl2, j=rng.choice(JOBS),
        P1=p1, P2=p2, P3=p3, x=rng.randint(10, 500), y=rng.randint(10, 500), z=rng.randint(1, 9), h=h,
        yr=rng.randint(1950, 2024), r=rng.choice(PRODUCTS), st=rng.randint(1, 5), d1=f"{rng.randint(1, 28)} March",
        d2=f"{rng.randint(1, 28)} April", s1=seq[0], s2=seq[1], s3=seq[2], s4=seq[3], hh=rng.randint(7, 18),
        m=rng.choice([15, 30, 45, 50, 75, 90, 120]), age=h + rng.randint(5, 30), k2=rng.choice(CONSTRAINTS),
    )


def _split_of(text: str, heldout_frac: float) -> str:
    h = int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "little") / 2**32
    return "heldout" if h < heldout_frac else "train"


def _pools(split: str, heldout_frac: float) -> dict:
    """The topics, places and characters of one split."""
    def pick(xs):
        ys = [x for x in xs if _split_of(x, heldout_frac) == split]
        return ys or list(xs)  # every pool keeps at least one entry

    topics = pick([t for ts in TOPICS.values() for t in ts])
    return {"t": topics, "p": pick(PLACES), "c": pick(CHARACTERS), "k": pick(CODE_TASKS), "v": pick(ADVICE),
            "e": pick(EMAIL_PURPOSES)}


def generate(n: int, seed: int = 0, split: str = "train", heldout_frac: float = 0.1, n_more: int = 0) -> list[str]:
    """``n`` prompts of one split ("train" or "heldout"), deterministic for ``seed``, the kinds of
    task in turn; the first ``n`` of a longer list are the same prompts. Then ``n_more`` prompts
    of the second set of kinds (``TEMPLATES_MORE``), so a list with ``n_more`` starts with the
    list without."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    if n < 0 or n_more < 0:
        raise ValueError("n and n_more must be >= 0")
    pools = _pools(split, heldout_frac)
    out = _draw(n, random.Random(f"{seed}:{split}"), TEMPLATES, lambda rng: _fields(rng, pools))
    # the second set's own stream, drawn as if alone, less any prompt the first set has
    seen = set(out)
    more = _draw(n_more + len(seen), random.Random(f"{seed}:{split}:more"), TEMPLATES_MORE,
                 lambda rng: _fields_more(rng, pools)) if n_more else []
    more = [t for t in more if t not in seen][:n_more]
    return out + more


# -- loading ---------------------------------------------------------------------------------------
def load_prompts(path: str) -> list:
    """Prompts from a JSONL file, one per non-blank line, in order: a bare JSON string, or an
    object with a "prompt" or "text" string, "turns" (a list of user turns, as in MT-Bench: the
    first is used) or "messages" (``[{"role", "content"}...]``, returned as that list of dicts;
    every other form gives a str), the first of these fields present winning. ValueError naming
    ``path:line`` for a line that is none of these, and for a file without prompts."""
    out: list = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
            out.append(_prompt_of(obj, f"{path}:{n}"))
    if not out:
        raise ValueError(f"{path}: no prompts")
    return out


def prompt_messages(prompt) -> list:
    """A loaded prompt as chat messages: a str becomes one user message."""
    return prompt if isinstance(prompt, list) else [{"role": "user", "content": prompt}]


def prompt_text(prompt) -> str:
    """A loaded prompt as plain text: a message list gives its contents, one per line."""
    return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)


def _prompt_of(obj, where: str):
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict):
        for key in ("prompt", "text"):
            if isinstance(obj.get(key), str):
                return obj[key]
        turns = obj.get("turns")
        if isinstance(turns, list) and turns:
            if not isinstance(turns[0], str):
                raise ValueError(f'{where}: "turns" must start with a string')
            return turns[0]
        msgs = obj.get("messages")
        if isinstance(msgs, list) and msgs:
            if not all(isinstance(m, dict) and "role" in m and "content" in m for m in msgs):
                raise ValueError(f'{where}: every entry of "messages" needs a "role" and a "content"')
            return [{"role": str(m["role"]), "content": str(m["content"])} for m in msgs]
    raise ValueError(f'{where}: expected a JSON string or an object with a "prompt", "text", "turns" or "messages" field')


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="medusa-edge prompts", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", type=int, default=3000, help="training prompts to write (default 3000)")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--n-more", type=int, default=0,
                   help="then this many prompts of the second set of kinds: role play, answering from a given text, "
                        "reasoning puzzles, discussion, writing under a constraint (default 0)")
    p.add_argument("-o", "--output", default="-", help="JSONL file for the training prompts (default: stdout)")
    p.add_argument("--heldout", help="also write held-out prompts (on topics the training split never uses) here")
    p.add_argument("--n-heldout", type=int, default=200, help="held-out prompts (default 200)")
    p.add_argument("--heldout-frac", type=float, default=0.1, help="share of topics reserved for the held-out split (default 0.1)")
    args = p.parse_args(argv)
    if min(args.n, args.n_more, args.n_heldout) < 0 or not 0.0 <= args.heldout_frac < 1.0:
        p.error("-n, --n-more and --n-heldout must be >= 0, and --heldout-frac in [0, 1)")

    def write(path, prompts):
        f = sys.stdout if path == "-" else open(path, "w", encoding="utf-8")
        try:
            for t in prompts:
                f.write(json.dumps({"prompt": t}, ensure_ascii=False) + "\n")
        finally:
            if f is not sys.stdout:
                f.close()

    write(args.output, generate(args.n, args.seed, "train", args.heldout_frac, n_more=args.n_more))
    if args.heldout:
        # the held-out split mixes both sets in the training list's proportion
        more = round(args.n_heldout * args.n_more / max(1, args.n + args.n_more))
        write(args.heldout, generate(args.n_heldout - more, args.seed, "heldout", args.heldout_frac, n_more=more))
    return 0


if __name__ == "__main__":
    sys.exit(main())
