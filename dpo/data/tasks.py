"""Built-in preference tasks the project generates itself: seeded, deterministic, with a ground-truth reward.

In the spirit of the DPO paper's controlled-sentiment experiment (Rafailov et al. 2023, section 6.1:
the reward there is a sentiment classifier, and the policy must write positive reviews), the default
task `sentiment` asks for one-sentence reviews of made-up restaurants, hotels, films, books and
gadgets. The chosen reply praises, the rejected one complains; both use the same sentence template and
the same aspects, so a pair differs only in the words that carry the sentiment. The reward is a
lexicon score that can be computed on any text, the model's own greedy generations included:

    reward(prompt, completion) = (# positive lexicon words) - (# negative lexicon words)

where a word preceded (within three words) by a negator ("not", "never", "wasn't", ...) counts with
the opposite sign ("not great" is negative, "never disappointing" positive).

Train and held-out rows come from disjoint sets of reviewed places/products (split by a hash of the
name), so no held-out prompt, and no held-out name, appears in training.

Rows are conversational, as TRL's conversational format: {"prompt": [user message], "chosen":
[assistant message], "rejected": [assistant message]}; the chat template renders them.

The dataset string `builtin:sentiment` (or `builtin:default`) names this task on the command line;
`rows_for(dataset)` turns it into rows and returns None for anything that is not `builtin:...`.
"""

from __future__ import annotations

import hashlib
import random
import re
from dataclasses import dataclass
from typing import Any, Callable

from dpo.data.sources import DataError, PreferenceRow, Rows

BUILTIN_PREFIX = "builtin:"
DEFAULT_TASK = "sentiment"
DEFAULT_DATASET = BUILTIN_PREFIX + DEFAULT_TASK  # the default run's --dataset
DEFAULT_TRAIN_ROWS = 512  # rows `rows_for("builtin:sentiment")` yields (training reads what it needs)
DEFAULT_EVAL_ROWS = 48
EVAL_SHARE = 5  # one name in EVAL_SHARE goes to the held-out split

# The default run (`python -m dpo.train` with no flags): TrainConfig values. Measured on a shared 2-core
# CPU (SmolLM2-135M-Instruct, float32, torch on 1 thread while another process held the other core):
# the whole run, load + reference eval + 8 steps + eval + generations, took 177 s; held-out
# length-normalised accuracy rose by 33-46 points over three seeds. 8 steps x 8 pairs = 64 training pairs.
# Gradient checkpointing is the CPU plan's (dpo.cpu_plan): off where the available memory holds a step's
# activations (16 rows x up to 75 tokens x 30 layers), on below it; the numbers are the same either way. On the
# shared 2-core machine (load average 6.5-10.5 from other work, 2026-12-07) the whole run peaked at 2.97 GB RSS
# in 36 min 47 s with checkpointing off, 1.63 GB in 41 min 17 s on (dpo.host_memory's allocator setting in
# both); its 8 steps took 1018 s off (96-163 s each) and 1570 s on (147-240 s each) there.
DEFAULT_RUN = {
    "dataset": DEFAULT_DATASET,
    "max_steps": 8,
    "per_device_batch_size": 8,
    "grad_accum": 1,
    "learning_rate": 5e-4,
    "lr_scheduler": "linear",
    "warmup_steps": 0.0,
    "beta": 0.1,
    "lora_r": 16,
    "lora_alpha": 16,
    "max_length": 128,
}
# ... and its held-out evaluation (dpo.eval.evaluation.Evaluation, GenerationSettings).
DEFAULT_EVAL = {
    "n_pairs": 48,
    "batch_size": 16,
    "generations": 24,
    "max_new_tokens": 40,
    "generation_batch_size": 32,
}

# --- the lexicon (the ground-truth reward) -----------------------------------------------------

POSITIVE_WORDS = frozenset("""
    good great excellent wonderful fantastic superb lovely delightful outstanding impressive pleasant brilliant
    perfect amazing awesome beautiful charming delicious tasty fresh friendly helpful welcoming warm cozy cosy
    comfortable clean spotless spacious stunning breathtaking gorgeous elegant stylish vibrant lively fun
    enjoyable memorable moving gripping captivating engaging compelling masterful thoughtful touching funny
    witty clever smart fast quick reliable sturdy solid smooth crisp sharp bright generous affordable
    reasonable worth worthwhile favorite favourite best love loved loving lovable enjoyed enjoy like liked
    recommend recommended happy glad pleased satisfied impressed delighted joy joyful gem treat refreshing
    relaxing peaceful attentive efficient polite professional excellently wonderfully beautifully perfectly
    nice fine flawless exceptional remarkable marvelous marvellous terrific splendid fabulous incredible
    unforgettable luxurious exquisite heavenly divine superior tender juicy flavorful flavourful rich
    satisfying wholesome inviting immaculate convenient intuitive powerful seamless premium
    thrilled excited exciting passionate passion pleasure delight gem stellar phenomenal spectacular impeccable
    innovative unparalleled seamlessly immersive sleek versatile beloved magical fascinating inspiring uplifting
    heartwarming acclaimed praised praise hearty charm
    top-notch must-see must-visit must-try must-watch must-read must-have high-quality world-class well-made
    top-rated award-winning cutting-edge first-rate
""".split())

NEGATIVE_WORDS = frozenset("""
    bad poor terrible awful horrible dreadful disappointing disappointed disappointment mediocre dull boring
    bland tasteless stale soggy greasy cold lukewarm burnt overcooked undercooked rude unfriendly unhelpful
    slow sloppy careless dirty filthy grimy smelly noisy loud cramped tiny shabby worn broken faulty flimsy
    cheap overpriced expensive pricey uncomfortable unpleasant frustrating annoying confusing tedious
    forgettable predictable clumsy weak flat lifeless messy chaotic crowded dingy dated laggy buggy glitchy
    unreliable useless pointless waste wasted worst hate hated dislike disliked regret avoid sad unhappy
    dissatisfied angry upset mess problem problems issue issues fail failed failure lacking lackluster
    lacklustre subpar sour bitter dry rubbery watery chewy inedible disgusting gross nasty ugly dreary
    sluggish painful wrong lousy pathetic atrocious abysmal miserable
    sorry unfortunately unfortunate confusion confused criticized criticism mistake mistakes overrated
    underwhelming disaster horrendous flawed flaw flaws lacks outdated worse complaint complaints unusable harsh
    low-quality second-rate poorly-made over-priced
""".split())

NEGATORS = frozenset("""
    not no never nothing neither nor hardly barely none nobody cannot without
    isn't wasn't aren't weren't don't doesn't didn't won't wouldn't can't couldn't shouldn't hasn't haven't hadn't
    isnt wasnt arent werent dont doesnt didnt wont wouldnt cant couldnt shouldnt hasnt havent
""".split())

_WORD = re.compile(r"[a-z]+(?:['\u2019][a-z]+)?(?:-[a-z]+(?:['\u2019][a-z]+)?)*")


def _words(text: str) -> list[str]:
    """Lower-case words; a hyphenated word stays whole where the lexicon knows it ("top-notch"), else its
    parts count ("user-friendly" -> "user", "friendly")."""
    out = []
    for w in _WORD.findall(text.lower()):
        w = w.replace("\u2019", "'")
        if "-" in w and w not in POSITIVE_WORDS and w not in NEGATIVE_WORDS:
            out.extend(w.split("-"))
        else:
            out.append(w)
    return out


def sentiment_words(text: str) -> list[tuple[str, int]]:
    """Each lexicon word of `text` with its signed polarity (+1/-1), negation already applied."""
    words = _words(text)
    out = []
    for i, word in enumerate(words):
        polarity = 1 if word in POSITIVE_WORDS else -1 if word in NEGATIVE_WORDS else 0
        if polarity and any(w in NEGATORS for w in words[max(0, i - 3):i]):
            polarity = -polarity
        if polarity:
            out.append((word, polarity))
    return out


def sentiment_score(text: str) -> float:
    """Positive minus negative lexicon words (negated words flip sign)."""
    return float(sum(p for _, p in sentiment_words(text)))


# --- what the reviews are about ----------------------------------------------------------------


@dataclass(frozen=True)
class Kind:
    noun: str  # "restaurant"
    group: str  # "place", "title" or "product": how the prompt refers to it
    aspects: tuple[str, ...]


KINDS = (
    Kind("restaurant", "place", ("food", "service", "pasta", "dessert", "wine list", "atmosphere", "staff")),
    Kind("noodle bar", "place", ("broth", "noodles", "service", "dumplings", "staff", "prices")),
    Kind("bakery", "place", ("bread", "croissants", "coffee", "staff", "cakes", "pastries")),
    Kind("cafe", "place", ("coffee", "cake", "music", "staff", "seating", "tea")),
    Kind("pizzeria", "place", ("pizza", "crust", "service", "salad", "staff", "tiramisu")),
    Kind("hotel", "place", ("room", "bed", "breakfast", "staff", "view", "pool", "bathroom")),
    Kind("museum", "place", ("exhibits", "guided tour", "gift shop", "building", "staff", "audio guide")),
    Kind("gym", "place", ("equipment", "classes", "changing rooms", "trainers", "staff", "showers")),
    Kind("film", "title", ("plot", "acting", "soundtrack", "ending", "dialogue", "pacing", "cinematography")),
    Kind("novel", "title", ("story", "characters", "writing", "ending", "pacing", "dialogue")),
    Kind("video game", "title", ("gameplay", "graphics", "story", "controls", "soundtrack", "level design")),
    Kind("Bluetooth speaker", "product", ("sound", "battery", "bass", "app", "build quality", "design")),
    Kind("laptop", "product", ("screen", "keyboard", "battery", "speakers", "trackpad", "build quality")),
    Kind("phone", "product", ("camera", "battery", "screen", "speaker", "design", "software")),
    Kind("coffee maker", "product", ("coffee", "design", "milk frother", "controls", "build quality", "price")),
)

_PLACE_FIRST = ("Golden", "Blue", "Little", "Old", "Silver", "Green", "Red", "Misty", "Quiet", "Royal", "Lucky",
                "Wild", "Sunny", "Velvet", "Copper", "Painted", "Hidden", "Crooked", "Salty", "Northern")
_PLACE_SECOND = ("Lantern", "Fig", "Anchor", "Oak", "Harbor", "Sparrow", "Olive", "Bridge", "Garden", "Crown",
                 "Lemon", "Fox", "Kettle", "Pine", "Compass", "Orchard", "Tide", "Owl", "Meadow", "Lark")
_TITLE_FIRST = ("The Silent", "The Last", "A Distant", "The Northern", "The Hollow", "The Endless", "The Paper",
                "The Iron", "A Quiet", "The Burning", "The Glass", "The Sleeping", "The Winter", "The Lost")
_TITLE_SECOND = ("River", "Summer", "Signal", "Orchard", "Kingdom", "Lighthouse", "Letters", "Harbor", "Garden",
                 "Machine", "Frontier", "Island", "Station", "Mountain")
_BRANDS = ("Zentro", "Aurel", "Nimbus", "Kestrel", "Vanta", "Orbit", "Lumio", "Norde", "Pixa", "Sonora", "Tessel",
           "Vireo")
_MODELS = ("One", "Pro", "Air", "Max", "Lite", "S2", "X5", "Neo", "Plus", "Go")
_CITIES = ("Lisbon", "Lyon", "Porto", "Kyoto", "Austin", "Dublin", "Oslo", "Seville", "Krakow", "Melbourne",
           "Boston", "Vienna", "Naples", "Denver", "Bergen", "Quebec City")

_PROMPTS = {
    "place": (
        "Write a one-sentence review of {name}, a {kind} in {city}.",
        "In one sentence, how was your visit to {name} in {city}?",
        "Give me a one-sentence review of the {kind} {name} in {city}.",
        "What did you think of {name}, the {kind} in {city}? Answer in one sentence.",
        "Describe your experience at {name}, a {kind} in {city}, in one sentence.",
    ),
    "title": (
        "Write a one-sentence review of the {kind} \"{name}\".",
        "In one sentence, what did you think of the {kind} \"{name}\"?",
        "Give me a one-sentence review of \"{name}\", the new {kind}.",
        "Describe the {kind} \"{name}\" in one sentence.",
        "What is your one-sentence verdict on the {kind} \"{name}\"?",
    ),
    "product": (
        "Write a one-sentence review of the {name} {kind}.",
        "In one sentence, what do you think of the {name} {kind}?",
        "Give me a one-sentence review of the {name}, a {kind}.",
        "Describe your experience with the {name} {kind} in one sentence.",
        "What is your one-sentence verdict on the {name} {kind}?",
    ),
}

# Reply templates, filled twice with the same aspects: once with praise (chosen), once with
# complaints (rejected). {ref} is how the reply names the thing ("Golden Lantern", "the film").
_REPLIES = (
    "{Ref} was {w1}: the {a1} {v1} {w2} and the {a2} {v2} {w3}.",
    "The {a1} {prep} {ref} {v1} {w1}, and the {a2} {v2} {w2}.",
    "{Ref} was {w1}; the {a1} {v1} {w2}.",
    "I found {ref} {w1}, with {w2} {a1} and {w3} {a2}.",
    "{V1} {ref}: the {a1} {v1} {w1} and the {a2} {v2} {w2}.",
    "{Ref} was {w1}, the {a1} {v1} {w2}, and {end}.",
)
_PRAISE = ("wonderful", "excellent", "superb", "lovely", "great", "fantastic", "outstanding", "impressive",
           "delightful", "brilliant", "perfect", "pleasant")
_COMPLAINT = ("terrible", "awful", "disappointing", "poor", "dreadful", "mediocre", "bad", "horrible",
              "unpleasant", "dull", "sloppy", "frustrating")
_PRAISE_VERB = ("I loved", "I really enjoyed", "I was impressed by")
_COMPLAINT_VERB = ("I hated", "I did not enjoy", "I was disappointed by")
_PRAISE_END = ("I would gladly recommend it", "I would happily go back", "it was worth every penny")
_COMPLAINT_END = ("I would not recommend it", "I would never go back", "it was a waste of money")


def _stable_hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _names(group: str) -> list[str]:
    if group == "place":
        return [f"{a} {b}" for a in _PLACE_FIRST for b in _PLACE_SECOND]
    if group == "title":
        return [f"{a} {b}" for a in _TITLE_FIRST for b in _TITLE_SECOND]
    return [f"{a} {b}" for a in _BRANDS for b in _MODELS]


def _split_of(name: str) -> str:
    return "eval" if _stable_hash(name) % EVAL_SHARE == 0 else "train"


def _was(aspect: str) -> str:
    """"was" or "were" for an aspect ("the noodles were")."""
    return "were" if aspect.endswith("s") and not aspect.endswith("ss") else "was"


def _capitalise(text: str) -> str:
    return text[:1].upper() + text[1:]


def sentiment_pair(rng: random.Random, split: str) -> dict[str, Any]:
    """One row of the sentiment task, drawn from `rng`, about a name of the given split."""
    kind = rng.choice(KINDS)
    name = rng.choice([n for n in _names(kind.group) if _split_of(n) == split])
    city = rng.choice(_CITIES)
    prompt = rng.choice(_PROMPTS[kind.group]).format(name=name, kind=kind.noun, city=city)
    ref = name if kind.group == "place" else rng.choice((f"the {kind.noun}", f"\"{name}\"" if kind.group == "title"
                                                         else f"the {name}"))
    template = rng.choice(_REPLIES)
    a1, a2 = rng.sample(kind.aspects, 2)
    slots = dict(ref=ref, Ref=_capitalise(ref), a1=a1, a2=a2, v1=_was(a1), v2=_was(a2),
                 prep="at" if kind.group == "place" else "of")
    k = rng.randrange(len(_PRAISE_VERB))
    e = rng.randrange(len(_PRAISE_END))
    pos = rng.sample(_PRAISE, 3)
    neg = rng.sample(_COMPLAINT, 3)
    chosen = template.format(**slots, w1=pos[0], w2=pos[1], w3=pos[2], V1=_PRAISE_VERB[k], end=_PRAISE_END[e])
    rejected = template.format(**slots, w1=neg[0], w2=neg[1], w3=neg[2], V1=_COMPLAINT_VERB[k],
                               end=_COMPLAINT_END[e])
    return {
        "prompt": [{"role": "user", "content": prompt}],
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }


# --- the task object ---------------------------------------------------------------------------


def prompt_text(prompt: Any) -> str:
    """The last user message of a conversational prompt, or a text prompt as it is."""
    if isinstance(prompt, list):
        users = [m["content"] for m in prompt if m.get("role") == "user"]
        return users[-1] if users else (prompt[-1]["content"] if prompt else "")
    return str(prompt)


def completion_text(completion: Any) -> str:
    """The text of a completion: a string, or the contents of a list of (assistant) messages."""
    if isinstance(completion, list):
        return " ".join(m["content"] for m in completion)
    return str(completion)


@dataclass(frozen=True)
class Task:
    """A generated preference task with a ground-truth reward."""

    name: str
    description: str
    make_row: Callable[[random.Random, str], dict[str, Any]]
    score: Callable[[str], float]  # completion text -> reward

    @property
    def dataset(self) -> str:
        """The --dataset string that names this task."""
        return BUILTIN_PREFIX + self.name

    def rows(self, split: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
        """n distinct-prompt rows of `split` ("train" or "eval"); row k depends only on (split, seed, k)
        so a longer list starts with the shorter one."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        if n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        rng = random.Random(f"{self.name}:{split}:{seed}")
        rows, seen = [], set()
        attempts = 0
        while len(rows) < n:
            attempts += 1
            if attempts > 50 * n + 1000:
                raise ValueError(f"task {self.name!r} cannot make {n} distinct {split} prompts")
            row = self.make_row(rng, split)
            key = prompt_text(row["prompt"])
            if key in seen:
                continue
            seen.add(key)
            rows.append(row)
        return rows

    def train_rows(self, n: int = DEFAULT_TRAIN_ROWS, seed: int = 0) -> list[dict[str, Any]]:
        return self.rows("train", n, seed)

    def eval_rows(self, n: int = DEFAULT_EVAL_ROWS, seed: int = 0) -> list[dict[str, Any]]:
        """Held-out rows: about names (places, titles, products) that no training row mentions."""
        return self.rows("eval", n, seed)

    def reward(self, prompt: Any, completion: Any) -> float:
        """Ground-truth reward of a completion (text or assistant messages) to a prompt."""
        return float(self.score(completion_text(completion)))


SENTIMENT = Task(
    name="sentiment",
    description=("One-sentence reviews of made-up restaurants, hotels, films, books and gadgets; chosen praises, "
                 "rejected complains (same template and aspects). Reward: positive minus negative lexicon words, "
                 "negation-aware (as the DPO paper's controlled-sentiment task, with a word list for the classifier)."),
    make_row=sentiment_pair,
    score=sentiment_score,
)

TASKS = {"sentiment": SENTIMENT, "default": SENTIMENT}


def builtin_task(name: str = "default") -> Task:
    """A built-in task by name ("default" is "sentiment"); a `builtin:` prefix is accepted."""
    key = name[len(BUILTIN_PREFIX):] if name.startswith(BUILTIN_PREFIX) else name
    if key not in TASKS:
        raise UnknownTask(f"{name}: no such built-in task (known: {', '.join(sorted(TASKS))})")
    return TASKS[key]


class UnknownTask(ValueError):
    pass


def is_builtin(dataset: str | None) -> bool:
    return bool(dataset) and dataset.startswith(BUILTIN_PREFIX)


def parse_builtin(dataset: str) -> tuple[Task, str]:
    """`builtin:NAME` or `builtin:NAME:eval` -> (task, split). Raises DataError when unknown."""
    rest = dataset[len(BUILTIN_PREFIX):]
    name, _, split = rest.partition(":")
    split = split or "train"
    if split not in ("train", "eval"):
        raise DataError(f"{dataset}: the split after the task name must be 'train' or 'eval', got {split!r}")
    try:
        return builtin_task(name or DEFAULT_TASK), split
    except UnknownTask as e:
        raise DataError(str(e)) from None


def rows_for(dataset: str | None, n: int | None = None, seed: int = 0) -> list[dict[str, Any]] | None:
    """Rows of a `builtin:NAME[:train|:eval]` dataset (n of them: DEFAULT_TRAIN_ROWS or DEFAULT_EVAL_ROWS
    when None); None for any other dataset string. Unknown task names raise DataError."""
    if not is_builtin(dataset):
        return None
    task, split = parse_builtin(dataset)
    if n is None:
        n = DEFAULT_TRAIN_ROWS if split == "train" else DEFAULT_EVAL_ROWS
    return task.rows(split, n, seed)


def preference_rows(rows: list[dict[str, Any]], source: str = "builtin"):
    """The rows as Rows of PreferenceRow, ready for dpo.data.pairs.prepare_pairs."""
    out = Rows(PreferenceRow(r["prompt"], r["chosen"], r["rejected"], i, source, f"row {i + 1}")
               for i, r in enumerate(rows))
    out.format = "conversation, explicit prompt"
    return out


def load_builtin(dataset: str | None, n: int | None = None, seed: int = 0):
    """dpo.data.Rows for a `builtin:...` dataset, or None for any other dataset string."""
    rows = rows_for(dataset, n, seed)
    return None if rows is None else preference_rows(rows, source=dataset)
