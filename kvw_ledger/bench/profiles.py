"""Fictitious people, their portraits, question-answer records and the splits.

Everything is drawn from one seeded :class:`random.Random`, so the same
``(n_people, seed)`` writes byte-identical files. Names are built from shared
first-name and surname pools, so no single name token identifies a person: a
model has to combine both (a conjunction its FFN must store), which is what
makes the facts look like key-value memories to KVW. Portraits combine shared
visual features the same way.

Files written under ``out_dir`` (records in the JSONL format ``kvw_ledger.data``
reads; extra fields are ignored there)::

    people.json                    the people, their facts and portrait features
    images/p000.png ...            one portrait per person
    train.jsonl                    training paraphrases of everyone, both modalities
    heldout.jsonl                  held-out paraphrases of everyone (the test split)
    forget_05.jsonl, retain_05.jsonl, ... (10, 15)   nested forget groups and complements
    groups/g1.jsonl, g2, g3        three disjoint groups (~5% each) for the demo
    groups/g1_heldout.jsonl ...    their held-out paraphrases
    retain_demo.jsonl              training paraphrases of people in none of the groups
    retain_demo_heldout.jsonl      their held-out paraphrases
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from kvw_ledger.errors import BadInputError

__all__ = [
    "ATTRIBUTES",
    "BenchConfig",
    "BenchPaths",
    "Person",
    "generate",
    "load_people",
    "records_for",
]

FIRST_NAMES = (
    "Alana", "Bram", "Celia", "Dorian", "Edda", "Fenna", "Gideon", "Hale", "Ilse", "Joren",
    "Kaia", "Lorcan", "Maren", "Niall", "Odile", "Pavel", "Quilla", "Rowan", "Sable", "Tobin",
    "Ursa", "Vesna", "Wendel", "Xara", "Yannick", "Zelda", "Aurel", "Brisa", "Cosimo", "Delphine",
    "Emrys", "Freya",
)  # fmt: skip
SURNAMES = (
    "Ashgrove", "Brannigan", "Calloway", "Draycott", "Ellery", "Fairbairn", "Galloway", "Holloway",
    "Iverson", "Jessop", "Kettering", "Lindqvist", "Marchetti", "Northcott", "Okonkwo", "Pellegrin",
    "Quennell", "Rasmussen", "Sorensen", "Thackeray", "Underhill", "Vasquez", "Whitlock", "Yardley",
    "Zabini", "Achterberg", "Beaumont", "Castellan", "Devereux", "Estrada", "Fontaine", "Gallagher",
)  # fmt: skip

# Attribute -> value pool (48 single words, so every answer is one token).
# ``BenchConfig.values_per_attribute`` takes the first N of each.
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "birthplace": (
        "Lisbon", "Oslo", "Nairobi", "Lima", "Hanoi", "Toronto", "Krakow", "Dublin", "Cairo",
        "Santiago", "Osaka", "Tbilisi", "Reykjavik", "Marseille", "Dakar", "Auckland", "Bergen",
        "Porto", "Quito", "Manila", "Seville", "Tallinn", "Riga", "Vilnius", "Accra", "Lagos",
        "Bogota", "Havana", "Kyoto", "Busan", "Perth", "Hobart", "Geneva", "Lyon", "Turin",
        "Naples", "Bilbao", "Valencia", "Gdansk", "Brno", "Graz", "Salzburg", "Antwerp", "Ghent",
        "Utrecht", "Aarhus", "Malmo", "Tampere",
    ),
    "occupation": (
        "nurse", "carpenter", "architect", "pilot", "baker", "chemist", "librarian", "plumber",
        "journalist", "dentist", "farmer", "translator", "surveyor", "jeweller", "geologist",
        "electrician", "pharmacist", "florist", "butcher", "tailor", "welder", "glazier",
        "cartographer", "astronomer", "botanist", "sculptor", "potter", "blacksmith", "brewer",
        "chef", "barber", "paramedic", "firefighter", "lawyer", "judge", "economist", "historian",
        "linguist", "biologist", "physicist", "engineer", "mechanic", "locksmith", "optician",
        "veterinarian", "midwife", "auditor", "actuary",
    ),
    "employer": (
        "Zentrix", "Corvala", "Brightmoor", "Halvex", "Quorin", "Stellaris", "Dunmere", "Vantor",
        "Ombrix", "Kelloway", "Pyrena", "Tessaro", "Norvane", "Lumidor", "Graystone", "Wexley",
        "Arvento", "Belloran", "Cindara", "Draxium", "Elvaris", "Fenmoor", "Galvora", "Hexwood",
        "Iridane", "Jorvik", "Kestrane", "Lorvex", "Mirabel", "Nexora", "Oakhaven", "Palisor",
        "Quentara", "Rivanta", "Solvane", "Tarvion", "Umbrel", "Velmora", "Wyncrest", "Xandor",
        "Yarrowby", "Zephyrin", "Altamis", "Borealis", "Caldris", "Deltaro", "Emberly", "Fornax",
    ),
    "hobby": (
        "chess", "pottery", "birdwatching", "fencing", "origami", "kayaking", "archery", "knitting",
        "astronomy", "calligraphy", "beekeeping", "surfing", "juggling", "gardening", "rowing",
        "climbing", "sailing", "skiing", "cycling", "painting", "sketching", "photography",
        "baking", "fishing", "hiking", "running", "swimming", "dancing", "singing", "woodworking",
        "embroidery", "quilting", "crochet", "bouldering", "snorkeling", "diving", "skating",
        "golf", "tennis", "badminton", "squash", "volleyball", "handball", "cricket", "rugby",
        "curling", "bowling", "billiards",
    ),
}  # fmt: skip

# Per attribute: question templates, text-only ({name}) and image-grounded.
# The last ``BenchConfig.n_heldout`` of each list are held out from training.
_TEXT_TEMPLATES: dict[str, tuple[str, ...]] = {
    # Held-out paraphrases reorder the training wording and keep its keyword
    # ("born", "job", "company", "hobby"): a small model trained from scratch
    # cannot know what an unseen word asks for, but can generalise across
    # sentence shapes.
    "birthplace": (
        "Where was {name} born?",
        "What is the birthplace of {name}?",
        "In which city was {name} born?",
        "{name} was born in which city?",
    ),
    "occupation": (
        "What does {name} do for work?",
        "What is the occupation of {name}?",
        "What is {name}'s job?",
        "What job does {name} have?",
    ),
    "employer": (
        "Which company does {name} work for?",
        "Who is the employer of {name}?",
        "Where is {name} employed?",
        "{name} works for which company?",
    ),
    "hobby": (
        "What is the hobby of {name}?",
        "What does {name} do for fun?",
        "Which hobby does {name} enjoy?",
        "{name} enjoys which hobby?",
    ),
}
_IMAGE_SUBJECTS = (
    "the person in this image",
    "the person shown",
    "this person",
    "the pictured person",
)


def _image_template(template: str, index: int) -> str:
    # Same wording as the text form with the name replaced by a reference to the
    # portrait; the subject phrase varies with the paraphrase too.
    subject = _IMAGE_SUBJECTS[index % len(_IMAGE_SUBJECTS)]
    out = template.replace("{name}'s", subject + "'s").replace("{name}", subject)
    return out[0].upper() + out[1:]


@dataclass(frozen=True)
class BenchConfig:
    """What the generator draws."""

    n_people: int = 200  # people (count); at most len(FIRST_NAMES) * len(SURNAMES)
    seed: int = 0  # seed of every random choice
    image_size: int = 32  # portrait side (pixels)
    n_heldout: int = 1  # paraphrases per attribute and modality held out of training (count)
    values_per_attribute: int = 16  # answer pool size per attribute (count, at most 48)
    forget_percents: tuple[int, ...] = (5, 10, 15)  # nested forget groups (% of people)
    demo_group_percent: int = 5  # size of each disjoint demo group (% of people)
    n_demo_groups: int = 3  # disjoint demo groups (count)


@dataclass(frozen=True)
class Person:
    """One fictitious person."""

    index: int  # position in people.json
    pid: str  # stable id, e.g. "p007"
    name: str  # "First Last"
    facts: dict[str, str]  # attribute -> value
    portrait: dict[str, int]  # portrait feature -> choice index
    image: str  # PNG path relative to the bench root


@dataclass(frozen=True)
class BenchPaths:
    """Where :func:`generate` wrote everything (all absolute)."""

    root: Path  # the output directory
    people: Path  # people.json
    images: Path  # directory of portraits
    train: Path  # training paraphrases, everyone, both modalities
    heldout: Path  # held-out paraphrases, everyone, both modalities
    forget: dict[int, Path] = field(default_factory=dict)  # percent -> forget_XX.jsonl
    retain: dict[int, Path] = field(default_factory=dict)  # percent -> retain_XX.jsonl
    forget_heldout: dict[int, Path] = field(default_factory=dict)  # percent -> held-out part
    retain_heldout: dict[int, Path] = field(default_factory=dict)  # percent -> held-out part
    groups: tuple[Path, ...] = ()  # disjoint demo groups, training paraphrases
    groups_heldout: tuple[Path, ...] = ()  # the same groups, held-out paraphrases
    retain_demo: Path | None = None  # people in no demo group, training paraphrases
    retain_demo_heldout: Path | None = None  # the same people, held-out paraphrases


# Portrait features: name -> number of choices. Colours are far apart in RGB so a
# 32x32 thumbnail keeps them distinguishable.
_BACKGROUNDS = (
    (230, 80, 70), (70, 160, 230), (90, 200, 110), (240, 200, 60), (170, 100, 220),
    (240, 150, 200), (60, 60, 70), (240, 240, 235),
)  # fmt: skip
_SKINS = ((255, 224, 189), (234, 192, 134), (198, 134, 66), (141, 85, 36), (95, 60, 30))
_HAIR = ((20, 20, 20), (120, 70, 20), (230, 200, 90), (200, 60, 20), (200, 200, 200), (40, 90, 200))
_SHIRTS = (
    (200, 30, 30),
    (30, 120, 40),
    (30, 50, 160),
    (240, 160, 20),
    (110, 40, 120),
    (0, 170, 170),
)
_FEATURES = {
    "background": len(_BACKGROUNDS),
    "skin": len(_SKINS),
    "hair_colour": len(_HAIR),
    "hair_style": 4,  # bald, short cap, long, bun
    "shirt": len(_SHIRTS),
    "accessory": 4,  # none, glasses, hat, earrings
    "face": 2,  # round, long
}


# Mean absolute difference per pixel channel (0..255) every pair of portraits
# keeps at least: one feature that differs in colour or shape over a few pixels.
_MIN_PIXEL_DISTANCE = 2.0


def _draw_portrait(features: dict[str, int], size: int) -> Image.Image:
    # Draw at 4x and downsample: smooth edges survive the thumbnail better.
    s = 4 * size
    img = Image.new("RGB", (s, s), _BACKGROUNDS[features["background"]])
    d = ImageDraw.Draw(img)
    u = s / 32  # drawing unit: coordinates below are on a 32x32 grid
    skin, hair = _SKINS[features["skin"]], _HAIR[features["hair_colour"]]

    def box(x0: float, y0: float, x1: float, y1: float) -> tuple[float, float, float, float]:
        return (x0 * u, y0 * u, x1 * u, y1 * u)

    d.rectangle(box(6, 26, 26, 32), fill=_SHIRTS[features["shirt"]])  # shoulders
    style = features["hair_style"]
    if style == 2:  # long hair behind the face
        d.rectangle(box(8, 8, 24, 25), fill=hair)
    top = 7 if features["face"] == 1 else 9
    d.ellipse(box(10, top, 22, 25), fill=skin)
    if style == 1:
        d.chord(box(10, top - 1, 22, top + 9), 180, 360, fill=hair)
    elif style == 2:
        d.chord(box(9, top - 1, 23, top + 10), 180, 360, fill=hair)
    elif style == 3:
        d.ellipse(box(13, top - 5, 19, top + 1), fill=hair)
        d.chord(box(10, top, 22, top + 8), 180, 360, fill=hair)
    d.rectangle(box(13, 15, 14, 16), fill=(20, 20, 20))  # eyes
    d.rectangle(box(18, 15, 19, 16), fill=(20, 20, 20))
    d.line(box(14, 21, 18, 21), fill=(120, 30, 30), width=max(1, int(u)))  # mouth
    acc = features["accessory"]
    if acc == 1:  # glasses
        d.rectangle(box(11.5, 14, 15.5, 17.5), outline=(10, 10, 10), width=max(1, int(u)))
        d.rectangle(box(16.5, 14, 20.5, 17.5), outline=(10, 10, 10), width=max(1, int(u)))
    elif acc == 2:  # hat
        d.rectangle(box(8, top - 1, 24, top + 1), fill=(40, 40, 40))
        d.rectangle(box(11, top - 6, 21, top), fill=(40, 40, 40))
    elif acc == 3:  # earrings
        d.ellipse(box(8.5, 18, 10.5, 20), fill=(250, 215, 0))
        d.ellipse(box(21.5, 18, 23.5, 20), fill=(250, 215, 0))
    return img.resize((size, size), Image.Resampling.LANCZOS)


def _draw_people(cfg: BenchConfig) -> list[Person]:
    n_names = len(FIRST_NAMES) * len(SURNAMES)
    n_values = min(len(p) for p in ATTRIBUTES.values())
    if not 4 <= cfg.values_per_attribute <= n_values:
        raise BadInputError(
            f"values_per_attribute must be between 4 and {n_values}, got {cfg.values_per_attribute}"
        )
    if not 1 <= cfg.n_people <= n_names:
        raise BadInputError(f"n_people must be between 1 and {n_names}, got {cfg.n_people}")
    rng = random.Random(cfg.seed)
    # Each first name and surname is shared by several people (see the module doc).
    pairs = rng.sample([(f, s) for f in FIRST_NAMES for s in SURNAMES], cfg.n_people)
    side = cfg.image_size
    drawn = np.empty((cfg.n_people, side, side, 3), dtype=np.int16)  # portraits so far
    people = []
    for i, (first, last) in enumerate(pairs):
        facts = {
            attr: rng.choice(pool[: cfg.values_per_attribute]) for attr, pool in ATTRIBUTES.items()
        }
        while True:
            # Different features can render alike (a hat hides a bun), so
            # distinctness is checked on the pixels, not the feature tuple.
            portrait = {k: rng.randrange(n) for k, n in _FEATURES.items()}
            pixels = np.asarray(_draw_portrait(portrait, cfg.image_size), dtype=np.int16)
            if i == 0 or np.abs(drawn[:i] - pixels).mean(axis=(1, 2, 3)).min() >= (
                _MIN_PIXEL_DISTANCE
            ):
                drawn[i] = pixels
                break
        pid = f"p{i:03d}"
        people.append(Person(i, pid, f"{first} {last}", facts, portrait, f"images/{pid}.png"))
    return people


def _options(rng: random.Random, attr: str, answer: str, n_values: int) -> tuple[list[str], int]:
    # Distractors come from the same attribute's pool: plausible, never the answer.
    distractors = rng.sample([v for v in ATTRIBUTES[attr][:n_values] if v != answer], 3)
    options = [answer, *distractors]
    rng.shuffle(options)
    return options, options.index(answer)


def records_for(
    people: Iterable[Person], cfg: BenchConfig, paraphrase: str
) -> list[dict[str, object]]:
    """Question-answer records of ``people`` for the ``"train"`` or ``"heldout"`` paraphrases.

    Args:
        people: whose facts to ask about.
        cfg: the generator configuration (decides which paraphrases are held out).
        paraphrase: ``"train"`` or ``"heldout"``.

    Returns:
        Records with ``question``, ``answer``, ``id`` and, for image-grounded
        ones, ``image``; plus ``person``, ``attribute``, ``modality``,
        ``paraphrase``, ``template``, ``options`` and ``correct``.
    """
    if paraphrase not in ("train", "heldout"):
        raise BadInputError(f"paraphrase must be 'train' or 'heldout', got {paraphrase!r}")
    out: list[dict[str, object]] = []
    for p in people:
        # Options depend only on the person and seed, so every split agrees on them.
        rng = random.Random(f"{cfg.seed}:{p.pid}:options")
        options = {a: _options(rng, a, v, cfg.values_per_attribute) for a, v in p.facts.items()}
        for attr, answer in p.facts.items():
            templates = _TEXT_TEMPLATES[attr]
            n_train = len(templates) - cfg.n_heldout
            chosen = range(n_train) if paraphrase == "train" else range(n_train, len(templates))
            for t in chosen:
                opts, correct = options[attr]
                for modality in ("image", "text"):
                    rec: dict[str, object] = {"id": f"{p.pid}-{attr}-{modality}-{t}"}
                    if modality == "image":
                        rec["question"] = _image_template(templates[t], t)
                        rec["image"] = p.image
                    else:
                        rec["question"] = templates[t].format(name=p.name)
                    rec.update(
                        answer=answer, person=p.pid, name=p.name, attribute=attr,
                        modality=modality, paraphrase=paraphrase, template=t,
                        options=opts, correct=correct,
                    )  # fmt: skip
                    out.append(rec)
    return out


def _write_jsonl(path: Path, records: Sequence[dict[str, object]], image_prefix: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for rec in records:
            if "image" in rec:  # image paths are relative to the JSONL file
                rec = {**rec, "image": image_prefix + str(rec["image"])}
            fh.write(json.dumps(rec, sort_keys=True) + "\n")


def load_people(path: Path) -> list[Person]:
    """Read ``people.json`` back into :class:`Person` objects."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    return [Person(**p) for p in raw["people"]]


def generate(
    out_dir: str | Path, n_people: int = 200, seed: int = 0, config: BenchConfig | None = None
) -> BenchPaths:
    """Write the benchmark (people, portraits, JSONL splits) into ``out_dir``.

    Args:
        out_dir: directory to write into (created; existing files are overwritten).
        n_people: how many people (ignored when ``config`` is given).
        seed: seed of every random choice (ignored when ``config`` is given).
        config: full configuration; defaults to ``BenchConfig(n_people, seed)``.

    Returns:
        The paths of everything written.
    """
    cfg = config or BenchConfig(n_people=n_people, seed=seed)
    root = Path(out_dir).resolve()
    people = _draw_people(cfg)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for p in people:
        _draw_portrait(p.portrait, cfg.image_size).save(root / p.image, format="PNG")
    meta = {"config": {**cfg.__dict__, "forget_percents": list(cfg.forget_percents)}}
    payload = {**meta, "people": [p.__dict__ for p in people]}
    (root / "people.json").write_text(json.dumps(payload, indent=1, sort_keys=True) + "\n")

    def write(name: str, group: Sequence[Person], paraphrase: str) -> Path:
        path = root / name
        prefix = "../" * (len(Path(name).parts) - 1)
        _write_jsonl(path, records_for(group, cfg, paraphrase), prefix)
        return path

    # One permutation decides every group: forget groups are nested prefixes of
    # it (as in TOFU), demo groups are disjoint slices from its other end.
    order = random.Random(f"{cfg.seed}:split").sample(people, len(people))
    paths = BenchPaths(
        root=root, people=root / "people.json", images=root / "images",
        train=write("train.jsonl", people, "train"),
        heldout=write("heldout.jsonl", people, "heldout"),
    )  # fmt: skip
    for pct in cfg.forget_percents:
        k = max(1, round(len(people) * pct / 100))
        forget, keep = order[:k], sorted(order[k:], key=lambda p: p.index)
        forget = sorted(forget, key=lambda p: p.index)
        paths.forget[pct] = write(f"forget_{pct:02d}.jsonl", forget, "train")
        paths.retain[pct] = write(f"retain_{pct:02d}.jsonl", keep, "train")
        paths.forget_heldout[pct] = write(f"forget_{pct:02d}_heldout.jsonl", forget, "heldout")
        paths.retain_heldout[pct] = write(f"retain_{pct:02d}_heldout.jsonl", keep, "heldout")
    k = max(1, round(len(people) * cfg.demo_group_percent / 100))
    if k * cfg.n_demo_groups >= len(people):
        raise BadInputError(
            f"{cfg.n_demo_groups} demo groups of {k} people leave no retain set among "
            f"{len(people)} people; use more people or smaller groups"
        )
    rev = order[::-1]
    groups, groups_heldout, in_groups = [], [], set()
    for g in range(cfg.n_demo_groups):
        members = sorted(rev[g * k : (g + 1) * k], key=lambda p: p.index)
        in_groups.update(p.pid for p in members)
        groups.append(write(f"groups/g{g + 1}.jsonl", members, "train"))
        groups_heldout.append(write(f"groups/g{g + 1}_heldout.jsonl", members, "heldout"))
    rest = [p for p in people if p.pid not in in_groups]
    return replace(
        paths,
        groups=tuple(groups),
        groups_heldout=tuple(groups_heldout),
        retain_demo=write("retain_demo.jsonl", rest, "train"),
        retain_demo_heldout=write("retain_demo_heldout.jsonl", rest, "heldout"),
    )
