"""Haystack text and needle values for the offline needle-in-a-haystack tasks.

RULER's S-NIAH tasks hide a "needle" sentence in one of two haystacks: a repeated noise paragraph, or essays. The
essays RULER uses must be downloaded, so here they are replaced by a procedural essay generator: sentences are drawn
from hand-written templates and word lists (this file's own text), deterministically from a seed. The result reads
like plain expository prose, which is what matters for the test (natural-looking distractor text with no digits or
UUIDs that could be confused with a needle value).

Every function takes a `random.Random` so the caller controls determinism; nothing here keeps state.
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Collection

# The noise paragraph of RULER's S-NIAH-1 (one haystack unit, repeated).
NOISE_UNIT = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."

# Needle sentence (RULER's wording, so prompts match those of the lm-eval ruler tasks).
NEEDLE = "One of the special magic {kind} for {key} is: {value}."

_ADJECTIVES = (
    "amber ancient bitter brave calm careful clever cold crooked curious damp distant dusty eager early faint fancy "
    "fierce gentle giant glossy golden hollow humble icy jolly keen large late lively lonely loud lucky mellow "
    "misty modest narrow noble odd pale patient plain polite proud quiet rapid rough round rusty salty shiny silent "
    "silver simple sleepy slow smooth soft solid sour spare steady sticky stormy sturdy sudden sunny swift tall "
    "tender thin tidy tiny vast velvet vivid warm wary wide wild wise witty wooden young"
).split()
_NOUNS = (
    "anchor apple arch badge basket beacon bell blanket bottle bridge bucket cabin candle canoe canyon castle cellar "
    "chimney cloud comet compass cottage crayon crystal desert dolphin engine falcon feather fence fiddle forest "
    "fountain garden glacier harbor helmet island jacket kettle ladder lantern lemon magnet maple meadow mirror "
    "mountain needle orchard otter paddle parrot pebble pencil pepper piano pillow planet pocket pond quarry rabbit "
    "raven ribbon river saddle sailor scarf shovel signal spoon statue tablet teapot thimble tiger tower tractor "
    "trumpet tunnel umbrella valley violin wagon walnut whistle window"
).split()

_SUBJECTS = (
    "most people",
    "good teachers",
    "the best engineers I know",
    "small companies",
    "new students",
    "the people who build cities",
    "careful readers",
    "those who write for a living",
    "the founders of successful projects",
    "towns that want to grow",
    "young scientists",
    "most committees",
    "old craftsmen",
    "teams that ship often",
    "beginners",
)
_VERBS = (
    "underestimate",
    "slowly learn to value",
    "rarely talk about",
    "end up rediscovering",
    "tend to ignore",
    "quietly depend on",
    "spend years looking for",
    "often confuse",
    "eventually come to trust",
    "are surprised by",
    "learn the hard way about",
    "keep coming back to",
)
_OBJECTS = (
    "the value of boring work",
    "how long simple things take",
    "the habit of writing things down",
    "the difference between effort and progress",
    "the cost of switching tasks",
    "the power of small experiments",
    "the way good tools shape thinking",
    "how much of a plan is guesswork",
    "the patience that real craft requires",
    "the quiet hours before anyone else is awake",
    "the advice of people who disagree with them",
    "the maps drawn by earlier travellers",
    "the slow compounding of good decisions",
    "the questions nobody in the room wants to ask",
)
_CLAUSES = (
    "and that is not a bad thing",
    "even when the evidence is in front of them",
    "because nobody taught them otherwise",
    "until a deadline forces the issue",
    "which explains more than it seems to",
    "long before they can explain why",
    "in the same way a gardener learns the soil",
    "though few would admit it",
    "once the first excitement wears off",
    "as if it were a law of nature",
)
_OPENERS = (
    "It is tempting to think otherwise, but",
    "In my experience,",
    "Looking back,",
    "Strangely enough,",
    "For better or worse,",
    "If you watch closely,",
    "Sooner or later,",
    "Over the years,",
    "On a good day,",
    "To put it plainly,",
)
_REFLECTIONS = (
    "The lesson seems obvious once it is written down.",
    "Nothing about this is new, yet it keeps being forgotten.",
    "That is why the first version of anything is usually too ambitious.",
    "A walk around the block often solves what an afternoon at the desk could not.",
    "The hard part is not knowing this but acting on it.",
    "Good work tends to look easy from the outside.",
    "Most of the real decisions are made in the margins of the day.",
    "It helps to remember that the map is not the territory.",
    "What looks like luck is often preparation meeting a quiet opportunity.",
    "A river does not argue with the stones in its path.",
)


def random_key(rng: random.Random) -> str:
    """A needle key such as `"rusty-lantern"` (RULER uses adjective-noun word pairs)."""
    return f"{rng.choice(_ADJECTIVES)}-{rng.choice(_NOUNS)}"


def random_number(rng: random.Random, *, digits: int = 7) -> str:
    """A `digits`-digit decimal number as text, without a leading zero."""
    return str(rng.randint(10 ** (digits - 1), 10**digits - 1))


def random_uuid(rng: random.Random) -> str:
    """A version-4 UUID drawn from `rng` (not from the OS), as text."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def random_value(kind: str, rng: random.Random) -> str:
    """A needle value of `kind` `"numbers"`, `"uuids"` or `"words"`."""
    if kind == "numbers":
        return random_number(rng)
    if kind == "uuids":
        return random_uuid(rng)
    if kind == "words":
        return random_key(rng)
    raise ValueError(f"value kind must be 'numbers', 'uuids' or 'words', got {kind!r}")


def essay_sentence(rng: random.Random) -> str:
    """One sentence of procedurally generated essay prose (no digits)."""
    style = rng.random()
    if style < 0.15:
        return rng.choice(_REFLECTIONS)
    core = f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)}"
    if style < 0.55:
        core = f"{core}, {rng.choice(_CLAUSES)}"
    if style < 0.8:
        return f"{rng.choice(_OPENERS)} {core}."
    return f"{core[0].upper()}{core[1:]}."


def essay_sentences(count: int, rng: random.Random) -> list[str]:
    """`count` essay sentences; a paragraph break (`"\\n\\n"` prefix) roughly every six sentences."""
    sentences = []
    for i in range(count):
        sentence = essay_sentence(rng)
        if i > 0 and rng.random() < 1 / 6:
            sentence = "\n\n" + sentence
        sentences.append(sentence)
    return sentences


def haystack_units(
    kind: str, count: int, rng: random.Random, *, value_kind: str = "numbers", avoid_keys: Collection[str] = ()
) -> list[str]:
    """`count` haystack units (the granularity at which needles are inserted and lengths are fitted).

    Args:
        kind: `"noise"` (RULER's repeated paragraph), `"essay"` (generated sentences) or `"needle"` (distractor
            needle sentences with random keys and `value_kind` values, RULER's S-NIAH multikey-2/3 haystack).
        count: number of units.
        rng: the random source (only `"essay"` and `"needle"` use it).
        value_kind: value kind of the distractor needles.
        avoid_keys: keys the distractor needles must not use (the real needles' keys, so the answer is unique).
    """
    if count < 0:
        raise ValueError(f"count must be >= 0, got {count}")
    if kind == "noise":
        return [NOISE_UNIT] * count
    if kind == "essay":
        return essay_sentences(count, rng)
    if kind == "needle":
        key_kind = "uuids" if value_kind == "uuids" else "words"
        units = []
        while len(units) < count:
            key = random_value(key_kind, rng)
            if key not in avoid_keys:
                units.append(NEEDLE.format(kind=value_kind, key=key, value=random_value(value_kind, rng)))
        return units
    raise ValueError(f"haystack kind must be 'noise', 'essay' or 'needle', got {kind!r}")


def join_units(kind: str, units: list[str]) -> str:
    """Join haystack units into text: lines for `noise`/`needle` haystacks, spaces for essays."""
    if kind == "essay":
        return " ".join(units).replace(" \n\n", "\n\n")
    return "\n".join(units)
