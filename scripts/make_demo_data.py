"""Makes the demo dataset: dates written in many ways, to be rewritten as ISO 8601 (YYYY-MM-DD).

The base model answers in sentences, or gets the order wrong; a short QLoRA run teaches it to answer with
the date alone, which exact match can check. Deterministic (seeded); run from the repository root:
    python3 scripts/make_demo_data.py
"""
import json
import random

MONTHS = ["January", "February", "March", "April", "May", "June", "July", "August", "September", "October", "November", "December"]
SYSTEM = "Rewrite the date the user gives in ISO 8601 format (YYYY-MM-DD). Answer with the date only."


def ordinal(n):
    suffix = "th" if 11 <= n % 100 <= 13 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def phrase(rng, year, month, day):
    name = MONTHS[month - 1]
    forms = [
        f"{name} {day}, {year}",
        f"{day} {name} {year}",
        f"{name[:3]} {day} {year}",
        f"the {ordinal(day)} of {name}, {year}",
        f"{name} {ordinal(day)} {year}",
        f"{day}. {name} {year}",
        f"{name[:3]}. {day}, {year}",
    ]
    return rng.choice(forms)


def example(rng):
    year = rng.randint(1950, 2035)
    month = rng.randint(1, 12)
    day = rng.randint(1, 28)
    return {"messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": phrase(rng, year, month, day)},
        {"role": "assistant", "content": f"{year:04d}-{month:02d}-{day:02d}"},
    ]}


def main():
    rng = random.Random(2026)
    seen = set()
    rows = []
    while len(rows) < 440:
        e = example(rng)
        key = e["messages"][1]["content"]
        if key not in seen:
            seen.add(key)
            rows.append(e)
    for name, part in [("train", rows[:400]), ("test", rows[400:])]:
        with open(f"data/dates/{name}.jsonl", "w") as f:
            for e in part:
                f.write(json.dumps(e, ensure_ascii=False) + "\n")


if __name__ == "__main__":
    main()
