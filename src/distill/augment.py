"""Transfer-set augmentation for text, after Tang et al. 2019 ("Distilling Task-Specific Knowledge from BERT into
Simple Neural Networks", section 3.3): new unlabeled sentences that the teacher labels.

For each word, with probability `p_mask` it becomes [MASK]; then, with probability `p_ngram`, the sentence is cut
to a random n-gram (n uniform in 1..5). Repeated `per_sentence` times per source sentence; duplicates and unchanged
copies are dropped. (Their third rule, part-of-speech-guided word replacement, needs a tagger and is left out.)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

MASK_TOKEN = "[MASK]"


def augment_sentence(words: Sequence[str], rng: random.Random, p_mask: float = 0.1, p_ngram: float = 0.25) -> list[str]:
    out = [MASK_TOKEN if rng.random() < p_mask else word for word in words]
    if len(out) > 1 and rng.random() < p_ngram:
        n = rng.randint(1, min(5, len(out)))
        start = rng.randint(0, len(out) - n)
        out = out[start : start + n]
    return out


def augment(
    sentences: Sequence[str],
    count: int,
    *,
    seed: int = 0,
    p_mask: float = 0.1,
    p_ngram: float = 0.25,
    max_tries: int = 20,
) -> list[str]:
    """Up to `count` new sentences made from `sentences` (cycled in a seeded random order), none equal to a source
    sentence or to each other."""
    rng = random.Random(seed)
    sources = [s.split() for s in sentences if s.split()]
    seen = {" ".join(words) for words in sources}
    out: list[str] = []
    if not sources:
        return out
    order = list(range(len(sources)))
    misses = 0
    while len(out) < count and misses < max_tries * max(count, 1):
        rng.shuffle(order)
        for i in order:
            candidate = " ".join(augment_sentence(sources[i], rng, p_mask, p_ngram))
            if candidate in seen:
                misses += 1
                continue
            seen.add(candidate)
            out.append(candidate)
            if len(out) == count:
                break
    return out
