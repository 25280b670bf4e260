"""The load-test corpora: generated deterministically, committed, and loaded by name.

Two corpora live in ``loadtests/corpus/<name>.jsonl`` (UTF-8, one JSON string per line):

- ``mixed``: 3,000 texts with a long tail of lengths, like real traffic: most are 5-30 words,
  about 8% are 80-200 words (past MiniLM's 256-token limit at the top), a few are 3-4 words.
- ``short``: 2,000 texts of 10 to 20 words, uniformly.

Texts are English from a small grammar (`loadtests.grammar`): product reviews, support
tickets, news-like sentences, questions, code-ish snippets, notes and recipes, science
explanations, with names, numbers, punctuation and some non-ASCII. Every text in a corpus is
distinct, so the server's per-batch de-duplication never flatters a measurement.

Use from other code (benchmarks, load tests)::

    from loadtests.corpus import load
    texts = load("mixed")          # list[str], in file order; raises ValueError on other names

From the repository root::

    python -m loadtests.corpus            # regenerate both files (stdlib only, seeded)
    python -m loadtests.corpus --check    # exit 1 unless the files equal what it generates
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from loadtests.grammar import TOPICS, fragment, sentence

CORPUS_DIR = Path(__file__).resolve().parent / "corpus"
CORPORA = ("mixed", "short")

_SEEDS = {"mixed": 20_240_601, "short": 20_240_602}
_SIZES = {"mixed": 3_000, "short": 2_000}
_TAIL_SHARE = 0.08  # share of mixed texts of 80-200 words
_OFF_TOPIC_SHARE = 0.15  # share of sentences borrowed from another topic
_DRAWS = 12  # candidates tried for one sentence slot
_ATTEMPTS = 200  # tries for one distinct text of an acceptable length


def path(name: str) -> Path:
    """The file of corpus `name`; ValueError for a name not in `CORPORA`."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; choose one of {', '.join(CORPORA)}")
    return CORPUS_DIR / f"{name}.jsonl"


def load(name: str) -> list[str]:
    """The texts of corpus `name` (``mixed`` or ``short``), in file order."""
    with path(name).open(encoding="utf-8") as lines:
        return [json.loads(line) for line in lines]


def word_count(text: str) -> int:
    """Whitespace-separated words, the unit every length here is measured in."""
    return len(text.split())


# -- generation --------------------------------------------------------------------------------
def _sentence(rng: random.Random, topic: str, room: int, used: set[str]) -> str:
    """A sentence of `topic` (sometimes of another topic) whose template `used` does not hold:
    the first of `_DRAWS` candidates that fits in `room` words, else the shortest one."""
    chosen = topic if rng.random() >= _OFF_TOPIC_SHARE else rng.choice(TOPICS)
    best_template, best = "", ""
    for _ in range(_DRAWS):
        template, text = sentence(rng, chosen, used)
        if not best or word_count(text) < word_count(best):
            best_template, best = template, text
        if word_count(text) <= room:
            break
    used.add(best_template)
    return best


def _compose(rng: random.Random, target: int) -> str:
    """One text of about `target` words, mostly on one topic, with no template repeated.

    Up to 7 words it is a fragment; beyond, sentences are added while that brings the length
    closer to `target`. Code snippets go on lines of their own.
    """
    topic = rng.choice(TOPICS)
    if target <= 7:
        candidates = [fragment(rng, topic) for _ in range(_DRAWS)]
        return min(candidates, key=lambda text: abs(word_count(text) - target))
    used: set[str] = set()
    text, count = "", 0
    while count < target:  # every round adds a sentence of at least one word, or stops
        piece = _sentence(rng, topic, target - count, used)
        if count and count + word_count(piece) - target > target - count:
            break  # stopping here is closer to the target than adding this piece
        code = piece[-1:] not in ".?!" or text[-1:] not in ".?!"
        text = f"{text}{chr(10) if code else ' '}{piece}" if text else piece
        count += word_count(piece)
    return text


def _mixed_length(rng: random.Random) -> int:
    if rng.random() < _TAIL_SHARE:
        return rng.randint(80, 200)
    return max(3, min(79, round(rng.lognormvariate(math.log(13), 0.5))))


def _short_length(rng: random.Random) -> int:
    return rng.randint(10, 20)


_LENGTHS: dict[str, Callable[[random.Random], int]] = {
    "mixed": _mixed_length,
    "short": _short_length,
}
# Whether a text of n words is acceptable for a target length: mixed texts may miss it a
# little, short ones hit it exactly so that their lengths stay uniform.
_FITS: dict[str, Callable[[int, int], bool]] = {
    "mixed": lambda words, target: 3 <= words <= 220,
    "short": lambda words, target: words == target,
}


def generate(name: str) -> list[str]:
    """The texts of corpus `name`, generated from its fixed seed (what the file must hold)."""
    path(name)  # validates the name
    rng = random.Random(_SEEDS[name])
    seen: set[str] = set()
    texts: list[str] = []
    for _ in range(_SIZES[name]):
        target = _LENGTHS[name](rng)
        for _ in range(_ATTEMPTS):
            text = _compose(rng, target)
            if text not in seen and _FITS[name](word_count(text), target):
                break
        else:
            raise RuntimeError(f"{name}: no distinct text of about {target} words")
        seen.add(text)
        texts.append(text)
    return texts


def render(texts: list[str]) -> bytes:
    """The file format: one JSON string per line, UTF-8, ``\\n`` line ends."""
    return "".join(json.dumps(text, ensure_ascii=False) + "\n" for text in texts).encode()


def describe(texts: list[str]) -> str:
    """A one-line summary of a corpus's lengths in words."""
    counts = sorted(word_count(text) for text in texts)
    deciles = statistics.quantiles(counts, n=10)
    tail = sum(count >= 80 for count in counts) / len(counts)
    return (
        f"{len(counts)} texts, words min {counts[0]} / p10 {deciles[0]:g} / median "
        f"{statistics.median(counts):g} / p90 {deciles[-1]:g} / max {counts[-1]}, "
        f">=80 words {tail:.1%}, {sum(len(text) for text in texts)} characters"
    )


def check() -> list[str]:
    """Names of corpora whose committed file differs from what `generate` makes."""
    stale = []
    for name in CORPORA:
        file = path(name)
        if not file.is_file() or file.read_bytes() != render(generate(name)):
            stale.append(name)
    return stale


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.corpus", description=__doc__)
    parser.add_argument(
        "--check", action="store_true", help="verify the files instead of writing them"
    )
    args = parser.parse_args(argv)
    if args.check:
        stale = check()
        for name in stale:
            print(f"{path(name)} differs from the generator: run python -m loadtests.corpus")
        if not stale:
            print(f"corpora up to date: {', '.join(CORPORA)}")
        return 1 if stale else 0
    CORPUS_DIR.mkdir(exist_ok=True)
    for name in CORPORA:
        texts = generate(name)
        path(name).write_bytes(render(texts))
        print(f"{path(name)}: {describe(texts)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
