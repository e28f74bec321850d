"""Regenerate data/flashcards_by_student.jsonl: the bundled flashcards grouped into "students".

Each card of data/medical_flashcards.jsonl (the project's own text) gets a `student_id`; students hold
2-20 cards each, most few and some many (sizes 2 + floor(19 u^2.5), u uniform), the cards dealt after
a seeded shuffle. Deterministic: the same file on every run. For trying --privacy_unit user:

    python data/make_flashcards_by_student.py
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).resolve().parent
SOURCE, TARGET = HERE / "medical_flashcards.jsonl", HERE / "flashcards_by_student.jsonl"
MIN_CARDS, MAX_CARDS, SEED = 2, 20, 13


def student_sizes(n_cards: int, rng: random.Random) -> list[int]:
    sizes = []
    while sum(sizes) < n_cards:
        sizes.append(MIN_CARDS + int((MAX_CARDS - MIN_CARDS + 1) * rng.random() ** 2.5))
    excess = sum(sizes) - n_cards
    while excess:  # trim the last students, never below MIN_CARDS
        i = max(range(len(sizes)), key=lambda j: (sizes[j] > MIN_CARDS, j))
        cut = min(excess, sizes[i] - MIN_CARDS)
        if cut == 0:
            excess -= sizes.pop()  # only possible when every size is MIN_CARDS
            continue
        sizes[i] -= cut
        excess -= cut
    return sizes


def main() -> None:
    cards = [json.loads(line) for line in SOURCE.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(SEED)
    order = list(range(len(cards)))
    rng.shuffle(order)
    sizes = student_sizes(len(cards), rng)
    owner = []
    for student, size in enumerate(sizes):
        owner += [f"student_{student + 1:03d}"] * size
    rows = [dict(cards[i], student_id=owner[k]) for k, i in enumerate(order)]
    rows.sort(key=lambda r: (r["student_id"], cards.index({k: v for k, v in r.items() if k != "student_id"})))
    TARGET.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    print(f"{TARGET.name}: {len(rows)} cards, {len(sizes)} students, {min(sizes)}-{max(sizes)} cards each")


if __name__ == "__main__":
    main()
