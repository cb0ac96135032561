"""Write data/sample/: small commonsense-format sets of our own making, for the embedded default.

    python data/make_sample.py

Comparisons of small numbers and membership in everyday categories, in BoolQ's true/false and
ARC's four-choice formats: answers a tiny random model can learn from the question alone, no
record taken from a benchmark. Seeded: rerunning reproduces the committed files byte for byte.
"""

import json
import random
from pathlib import Path

SEED = 0
N_TRAIN_PER_FORMAT = 300  # train.json mixes both formats: 600 records
N_TEST = 40  # per test set
OUT = Path(__file__).resolve().parent / "sample"

CATEGORIES = {
    "animal": ["dog", "cat", "horse", "cow", "sheep", "goat", "rabbit", "mouse", "lion", "tiger"],
    "fruit": ["apple", "banana", "cherry", "grape", "lemon", "mango", "peach", "pear", "plum", "melon"],
    "vehicle": ["car", "bus", "truck", "train", "bicycle", "boat", "plane", "tram", "taxi", "van"],
    "tool": ["hammer", "saw", "wrench", "drill", "shovel", "rake", "chisel", "screwdriver", "axe", "file"],
    "piece of furniture": ["chair", "table", "sofa", "bed", "desk", "shelf", "stool", "bench", "wardrobe", "dresser"],
    "musical instrument": ["piano", "violin", "guitar", "drum", "flute", "trumpet", "harp", "cello", "oboe", "banjo"],
}
CATEGORY_OF = {item: category for category, items in CATEGORIES.items() for item in items}

# The wording of the real sets' instructions and outputs (boolq/test.json, ARC-Easy/test.json).
BOOLQ = "Please answer the following question with true or false, question: {question}\n\nAnswer format: true/false"
ARC = ("Please choose the correct answer to the question: {question}\n\n{choices}\n\n"
       "Answer format: answer1/answer2/answer3/answer4")


def a(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


def record(instruction: str, answer: str) -> dict:
    return {"instruction": instruction, "input": "", "output": f"the correct answer is {answer}", "answer": answer}


def true_false_number(rng: random.Random) -> dict:
    x, y = rng.sample(range(21), 2)
    relation, holds = rng.choice([("greater than", x > y), ("larger than", x > y),
                                  ("less than", x < y), ("smaller than", x < y)])
    return record(BOOLQ.format(question=f"is {x} {relation} {y}?"), str(holds).lower())


def true_false_category(rng: random.Random) -> dict:
    item = rng.choice(list(CATEGORY_OF))
    # Half true, half false, so the label prior teaches nothing.
    if rng.random() < 0.5:
        category = CATEGORY_OF[item]
    else:
        category = rng.choice([c for c in CATEGORIES if c != CATEGORY_OF[item]])
    question = rng.choice(["is {x} {a_c}?", "is {x} a kind of {c}?", "can {x} be called {a_c}?"])
    question = question.format(x=a(item), c=category, a_c=a(category))
    return record(BOOLQ.format(question=question), str(category == CATEGORY_OF[item]).lower())


def choice_record(question: str, choices: list[str], correct: int) -> dict:
    listed = " ".join(f"Answer{i + 1}: {choice}" for i, choice in enumerate(choices))
    return record(ARC.format(question=question, choices=listed), f"answer{correct + 1}")


def choice_number(rng: random.Random) -> dict:
    numbers = rng.sample(range(100), 4)
    extreme = rng.choice(["largest", "smallest"])
    best = max(numbers) if extreme == "largest" else min(numbers)
    return choice_record(f"Which number is the {extreme}?", [str(n) for n in numbers], numbers.index(best))


def choice_category(rng: random.Random) -> dict:
    category = rng.choice(list(CATEGORIES))
    others = [item for item in CATEGORY_OF if CATEGORY_OF[item] != category]
    choices = rng.sample(others, 3)
    correct = rng.randrange(4)
    choices.insert(correct, rng.choice(CATEGORIES[category]))
    return choice_record(f"Which of these is {a(category)}?", choices, correct)


def draw(rng: random.Random, makers: list, n: int, taken: set[str]) -> list[dict]:
    """n records from the makers in turn, none repeating an instruction in `taken` (which grows)."""
    records = []
    while len(records) < n:
        r = makers[len(records) % len(makers)](rng)
        if r["instruction"] not in taken:
            taken.add(r["instruction"])
            records.append(r)
    return records


def write(path: Path, records: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        json.dump(records, f, indent=4)  # upstream's layout: indent 4, ASCII, no trailing newline


def main():
    rng = random.Random(SEED)
    true_false, multiple_choice = [true_false_number, true_false_category], [choice_number, choice_category]
    taken = set()  # every instruction drawn so far: keeps the test sets disjoint from train
    boolq_test = draw(rng, true_false, N_TEST, taken)
    arc_test = draw(rng, multiple_choice, N_TEST, taken)
    train = draw(rng, true_false, N_TRAIN_PER_FORMAT, taken) + draw(rng, multiple_choice, N_TRAIN_PER_FORMAT, taken)
    rng.shuffle(train)
    write(OUT / "train.json", train)
    write(OUT / "boolq" / "test.json", boolq_test)
    write(OUT / "ARC-Easy" / "test.json", arc_test)


if __name__ == "__main__":
    main()
