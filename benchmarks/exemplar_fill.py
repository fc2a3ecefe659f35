"""A pattern store of a given size, for the benchmarks that measure WITNESS at that size.

The shipped dev set seeds it (as on a fresh install), then recombined real messages fill
it: the first 3-20 words of one dev-set text and the first 0-8 of another, labelled as the
first, so the index holds realistic, distinct vectors rather than copies.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

# exemplars added per index write while filling
_CHUNK = 5000


def fill_store(store: Any, size: int, *, seed: int) -> int:
    """Seed ``store`` (a ``PatternStore``) with the dev set and add recombined messages
    until it holds ``size`` exemplars (or the dev set's count, if larger); its count."""
    from trinity.agents.witness.dataset import load_devset
    from trinity.agents.witness.text import event_text

    devset = load_devset()
    texts = [event_text(event).text for event, _, _ in devset]
    store.seed([(t, label, origin) for t, (_, label, origin) in zip(texts, devset,
                                                                    strict=True)])
    rng = random.Random(seed)
    extra: list[tuple[str, str, str]] = []
    while store.exemplar_count() + len(extra) < size:
        a, b = rng.sample(range(len(texts)), 2)
        words = texts[a].split()[: rng.randint(3, 20)] + texts[b].split()[: rng.randint(0, 8)]
        extra.append((" ".join(words), devset[a][1], "bench"))
        if len(extra) == _CHUNK:
            store.add_exemplars(extra, source="bench")
            extra = []
    if extra:
        store.add_exemplars(extra, source="bench")
    count: int = store.exemplar_count()
    return count


def build_store(path: Path, size: int, *, seed: int) -> int:
    """A pattern store file at ``path`` (its index beside it) holding ``size`` exemplars,
    written and closed, as WITNESS finds it on start; its count."""
    from trinity.agents.witness.embedding import load_embedder
    from trinity.agents.witness.store import PatternStore

    store = PatternStore(path, load_embedder())
    try:
        return fill_store(store, size, seed=seed)
    finally:
        store.close()


if __name__ == "__main__":  # python benchmarks/exemplar_fill.py PATH SIZE: build, print the count
    import sys

    print(build_store(Path(sys.argv[1]), int(sys.argv[2]), seed=int(sys.argv[2])))
