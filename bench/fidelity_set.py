"""The planted-fact RAG question set of ``bench/fidelity.py``, written for this project.

Every fact is invented (people, towns, companies and products that do not exist, with made-up years and
numbers), so a model can only answer from the documents, never from memory. A *world* holds towns,
companies and people; each entity has one document of several sentences (60-250 tokens). Questions:

* ``single``: the answer stands in one document ("Who is the mayor of Quenby?");
* ``two-doc``: one document names an entity and another gives its attribute ("Marek Dovrin works at Vantrel
  Labs." + "Vantrel Labs makes solar kettles." -> "What does the company Marek Dovrin works at make?").

A question's context is 4-8 documents: the ones it needs plus distractors from the same world, shuffled, so
the same document recurs across questions in different positions, as retrieved chunks do. Answers are short
(a name, a word or a number); a greedy answer is right when it contains the gold answer (case-insensitive).

Deterministic by seed (``random.Random``); pure Python. The set is kept in the repository as
``bench/data/fidelity_set.jsonl`` (``python bench/fidelity_set.py --out bench/data/fidelity_set.jsonl``; a test
keeps the file equal to the generator's output).
"""
from __future__ import annotations

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

SEED = 7
DEFAULT_QUESTIONS = 180
SET_FILE = Path(__file__).resolve().parent / "data" / "fidelity_set.jsonl"  # generate() with the defaults
_FIRST = ["Hella", "Osric", "Marek", "Tobin", "Ilse", "Corwin", "Dagny", "Piet", "Rosalind", "Ansel", "Brigid",
          "Fenna", "Lorcan", "Mirela", "Soren", "Tamsin", "Yannick", "Zora", "Edda", "Halvard", "Greta", "Emrys",
          "Katya", "Lucan", "Nessa", "Orla", "Radek", "Sabine", "Teodor", "Wren"]
_LAST = ["Strom", "Pell", "Dovrin", "Arvault", "Quell", "Brindt", "Halloway", "Tennick", "Orrick", "Vantose",
         "Lisle", "Crandell", "Fairmont", "Ostrander", "Marrow", "Kettleby", "Duvall", "Pressley", "Ashgrove",
         "Winterbourne", "Calloway", "Thorne", "Blackwell", "Rasmussen", "Okafor", "Lindqvist", "Moreau", "Szabo"]
_TOWN_HEADS = ["Brell", "Quen", "Tarn", "Ellis", "Dun", "Varrow", "Kest", "Marl", "Ost", "Wend", "Harl", "Crom",
               "Fenn", "Gilder", "Ravel", "Sable", "Thistle", "Upton", "Yarrow", "Zell"]
_TOWN_ENDS = ["ford", "by", "wick", "mere", "holt", "stead", "ton", "vale", "bury", "leigh"]
_COMPANY_HEADS = ["Vantrel", "Oberlin", "Quillon", "Marisko", "Tessaly", "Brandor", "Corvane", "Helmond", "Ivorra",
                  "Kelvane", "Lumora", "Nordahl", "Pemberly", "Rostova", "Sorrel", "Tavish"]
_PRODUCTS = ["solar kettles", "glass violins", "paper boats", "copper lanterns", "wool umbrellas",
             "clay drones", "silk maps", "wooden clocks", "stone bicycles", "ice lamps", "felt robots",
             "brass telescopes", "bamboo pianos", "salt candles", "tin whistles", "cork helmets"]
_JOBS = ["glassblower", "beekeeper", "cartographer", "violinist", "baker", "astronomer", "potter", "surveyor",
         "librarian", "clockmaker", "ferry pilot", "weaver"]
_COLOURS = ["teal", "amber", "crimson", "violet", "ochre", "indigo", "olive", "scarlet", "silver", "jade"]
_PETS = ["dog", "cat", "parrot", "tortoise", "goat", "rabbit"]
_PET_NAMES = ["Pixel", "Biscuit", "Juniper", "Pepper", "Marble", "Clover", "Bramble", "Tofu", "Nutmeg", "Comet"]
_RIVERS = ["Asla", "Venn", "Orra", "Tamsk", "Ilde", "Brue", "Kesh", "Morva"]
_FOODS = ["pear soup", "smoked plums", "rye dumplings", "honey bread", "onion pie", "barley cakes"]


@dataclass(frozen=True)
class Question:
    documents: tuple[str, ...]
    question: str
    answer: str
    kind: str  # "single" | "two-doc"
    needed: tuple[int, ...]  # indices into documents of the ones the answer needs

    def to_dict(self) -> dict[str, object]:
        return {"documents": list(self.documents), "question": self.question, "answer": self.answer,
                "kind": self.kind, "needed": list(self.needed)}


def _unique(rng: random.Random, make, taken: set[str]) -> str:
    while True:
        name = make()
        if name not in taken:
            taken.add(name)
            return name


def _world(rng: random.Random) -> tuple[dict[str, str], list[tuple[str, str, str, str]]]:
    """Documents by entity name, and (question, answer, kind, needed entities joined by '|') facts."""
    taken: set[str] = set()
    towns = [_unique(rng, lambda: rng.choice(_TOWN_HEADS) + rng.choice(_TOWN_ENDS), taken) for _ in range(3)]
    companies = [_unique(rng, lambda: rng.choice(_COMPANY_HEADS) + rng.choice([" Labs", " Works", " Company"]), taken)
                 for _ in range(2)]
    people = [_unique(rng, lambda: f"{rng.choice(_FIRST)} {rng.choice(_LAST)}", taken) for _ in range(4)]
    docs: dict[str, str] = {}
    facts: list[tuple[str, str, str, str]] = []
    mayors = rng.sample(people, len(towns))
    products = rng.sample(_PRODUCTS, len(companies))
    for town, mayor in zip(towns, mayors):
        river, food = rng.choice(_RIVERS), rng.choice(_FOODS)
        year, population = rng.randint(1450, 1890), rng.randint(12, 98) * 100
        docs[town] = (f"{town} is a small town on the river {river}. The mayor of {town} is {mayor}. The town was "
                      f"founded in {year} and about {population} people live there. Visitors to {town} often try "
                      f"its {food}, which is sold at the market every morning.")
        facts += [(f"Who is the mayor of {town}?", mayor, "single", town),
                  (f"In which year was {town} founded?", str(year), "single", town),
                  (f"On which river is {town}?", river, "single", town)]
    for company, product in zip(companies, products):
        founder, home = rng.choice(people), rng.choice(towns)
        year, staff = rng.randint(1950, 2019), rng.randint(2, 90) * 10
        docs[company] = (f"{company} is a company that makes {product}. It was founded in {year} by {founder}. "
                         f"Its workshop is in {home}, where {staff} people work. Its {product} are sold in "
                         f"many shops and markets across the region, and the company gives tours of the workshop "
                         f"on the first Monday of every month.")
        facts += [(f"What does {company} make?", product, "single", company),
                  (f"Who founded {company}?", founder, "single", company),
                  (f"How many people work at {company}?", str(staff), "single", company)]
    for person in people:
        job, colour, pet = rng.choice(_JOBS), rng.choice(_COLOURS), rng.choice(_PETS)
        town, company = rng.choice(towns), rng.choice(companies)
        pet_name, born = rng.choice(_PET_NAMES), rng.randint(1940, 2001)
        docs[person] = (f"{person} is a {job} who lives in {town}. {person} was born in {born} and works at "
                        f"{company}. Their favourite colour is {colour}, and they have a {pet} called {pet_name}. "
                        f"On weekends {person} likes to walk along the river with friends.")
        facts += [(f"What is the job of {person}?", job, "single", person),
                  (f"In which year was {person} born?", str(born), "single", person),
                  (f"What is the {pet} of {person} called?", pet_name, "single", person),
                  (f"What does the company where {person} works make?",
                   products[companies.index(company)], "two-doc", f"{person}|{company}"),
                  (f"Who is the mayor of the town where {person} lives?",
                   mayors[towns.index(town)], "two-doc", f"{person}|{town}")]
    return docs, facts


def generate(n: int = DEFAULT_QUESTIONS, seed: int = SEED) -> list[Question]:
    """``n`` questions, about 40% of them two-doc, each over 4-8 shuffled documents of its world."""
    rng = random.Random(seed)
    questions: list[Question] = []
    while len(questions) < n:
        docs, facts = _world(rng)
        rng.shuffle(facts)
        singles = [f for f in facts if f[2] == "single"][:6]
        doubles = [f for f in facts if f[2] == "two-doc"][:4]
        for question, answer, kind, needed in singles + doubles:
            need = needed.split("|")
            others = [name for name in docs if name not in need]
            count = rng.randint(4, 8)
            chosen = need + rng.sample(others, count - len(need))
            rng.shuffle(chosen)
            questions.append(Question(tuple(docs[c] for c in chosen), question, answer, kind,
                                      tuple(chosen.index(x) for x in need)))
    rng.shuffle(questions)
    return questions[:n]


def load(path: Path = SET_FILE) -> list[Question]:
    """The question set as kept in the repository."""
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        d = json.loads(line)
        out.append(Question(tuple(d["documents"]), d["question"], d["answer"], d["kind"], tuple(d["needed"])))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=DEFAULT_QUESTIONS)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    lines = [json.dumps(q.to_dict()) for q in generate(args.n, args.seed)]
    args.out.write_text("\n".join(lines) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
