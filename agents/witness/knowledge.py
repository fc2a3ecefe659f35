"""What WITNESS and ``trinity classify`` share: embedder, pattern store and detector.

Opening it seeds a fresh store with the shipped labelled examples and loads the
trained model from the cache (training it once when the cache has none for this
dev set and embedding table), so it works on a fresh install with no prior run.
"""

from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from trinity.agents.witness.dataset import DATA_DIR, load_devset
from trinity.agents.witness.embedding import Embedder, default_table_path, load_embedder
from trinity.agents.witness.model import Detection, Detector, TrainedModel
from trinity.agents.witness.store import PatternStore, Recorded
from trinity.agents.witness.text import event_text
from trinity.agents.witness.train import train
from trinity.contract import NONE
from trinity.settings import Settings

log = logging.getLogger(__name__)

# The modules whose code decides what is trained and how a model classifies, in a fixed
# order: editing any of them changes the model key, so the cached model is retrained.
MODEL_MODULES = ("text", "features", "exemplars", "model", "train", "dataset")


# An event to observe: (the event, its id, the run it belongs to or None).
Seen = tuple[dict[str, Any], str, str | None]


@dataclass(frozen=True)
class Observation:
    pattern: str | None
    label: str
    confidence: float
    reason: str | None
    new: bool  # False when the event had been recorded before


def _model_key(embedder: Embedder) -> str:
    digest = hashlib.sha256(embedder.fingerprint.encode())
    for path in sorted(DATA_DIR.glob("devset_*.jsonl")):
        digest.update(path.read_bytes())
    for name in MODEL_MODULES:
        module = importlib.import_module(f"trinity.agents.witness.{name}")
        digest.update(Path(module.__file__ or "").read_bytes())
    return digest.hexdigest()[:16]


def load_model(embedder: Embedder, cache_dir: Path | None = None, *,
               train_apart: bool = False) -> TrainedModel:
    """The model trained on the shipped dev set, from the cache or trained now (seconds).

    With ``train_apart`` a missing model is trained by a child process (``python -m
    trinity.agents.witness.knowledge``) and then read from the cache: training imports
    scikit-learn and SciPy, ~125 MB that a long-lived WITNESS would otherwise keep for
    its whole life after the dev set or the detector changed. If the child fails, the
    model is trained here after all.
    """
    cache_dir = cache_dir or default_table_path().parent
    path = cache_dir / f"witness_model-{_model_key(embedder)}.pkl"
    if train_apart and not path.exists():
        child = subprocess.run([sys.executable, "-m", "trinity.agents.witness.knowledge",
                                str(cache_dir)], capture_output=True, text=True, check=False)
        if child.returncode != 0:
            log.warning("training the WITNESS model in a child process failed (exit %d): "
                        "%s; training here", child.returncode,
                        (child.stderr.strip().splitlines() or ["no output"])[-1])
    if path.exists():
        try:
            with path.open("rb") as fh:
                model: TrainedModel = pickle.load(fh)
            _mark_used(path)
            return model
        except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as exc:
            log.warning("retraining: cached model %s unreadable (%s)", path, exc)
    started = time.perf_counter()
    model = train([(event, label) for event, label, _ in load_devset()], embedder)
    log.info("trained the WITNESS model in %.1f s", time.perf_counter() - started)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        pickle.dump(model, fh)
    os.replace(tmp, path)
    _mark_used(path)
    return model


# A cached model not loaded for this long belongs to a dev set or detector no install
# uses any more (each version is ~1.4 MB; installs sharing the cache keep theirs fresh).
STALE_MODEL_S = 14 * 24 * 3600.0


def _mark_used(path: Path) -> None:
    """Note that ``path`` is in use (its mtime) and delete cached models left unused."""
    now = time.time()
    try:
        os.utime(path, (now, now))
        for other in path.parent.glob("witness_model-*.pkl"):
            if other != path and now - other.stat().st_mtime > STALE_MODEL_S:
                other.unlink()
                log.info("removed %s, a cached WITNESS model unused for %d days",
                         other.name, STALE_MODEL_S // 86400)
    except OSError as exc:  # a read-only or shared cache: nothing to tidy then
        log.debug("cannot tidy the model cache %s: %s", path.parent, exc)


class Knowledge:
    def __init__(self, embedder: Embedder, store: PatternStore,
                 model: TrainedModel) -> None:
        self.embedder = embedder
        self.store = store
        self.detector = Detector(embedder, model, store)

    @classmethod
    def open(cls, settings: Settings) -> Knowledge:
        embedder = load_embedder()
        store = _pattern_store(settings, embedder)
        devset = load_devset()
        seeded = store.seed([(event_text(event).text, label, origin)
                             for event, label, origin in devset])
        if seeded:
            log.info("seeded the pattern store with %d labelled examples", seeded)
        # Seeding (or re-embedding a store) read nearly all of both mapped tables: ~16 MB
        # of their pages would stay resident for the process's life, and filled the
        # embedding's segment caches with the dev set's words (~1.2 MB of USS).
        embedder.release_pages()
        embedder.forget_segments()
        return cls(embedder, store, load_model(embedder, train_apart=True))

    def observe(self, event: dict[str, Any], *, event_id: str, run_id: str | None = None,
                started: float | None = None, learn: bool = True) -> Observation:
        """Classify and record an event once (raises InvalidPayload for bad input).

        Without ``learn`` nothing is written: the event is classified against what
        the store knows and left out of its counts and exemplars.
        """
        return self.observe_many([(event, event_id, run_id)], started=started,
                                 learn=learn)[0]

    def observe_many(self, seen: Sequence[Seen], *, started: float | None = None,
                     learn: bool = True) -> list[Observation]:
        """``observe`` for several events: classified as one batch and recorded in one
        store transaction (an event recorded before keeps its decision). Raises
        InvalidPayload when an event is bad input: callers isolate such events by
        observing them alone."""
        started = time.perf_counter() if started is None else started
        out: list[Observation | None] = []
        todo: list[int] = []
        for i, (_, event_id, _) in enumerate(seen):
            stored = self.store.detection(event_id)
            if stored is None:
                out.append(None)
                todo.append(i)
            else:
                out.append(Observation(stored.pattern, stored.pattern or NONE,
                                       stored.confidence, "recorded before", new=False))
        detections = self.decide_many([seen[i][0] for i in todo])
        latency_ms = (time.perf_counter() - started) * 1000
        if learn and todo:
            recorded = self.store.record_many(
                [Recorded(det, seen[i][1], seen[i][2], latency_ms)
                 for i, det in zip(todo, detections, strict=True)])
        else:
            recorded = [True] * len(todo)
        for i, det, new in zip(todo, detections, recorded, strict=True):
            reason = None
            if det.pattern is None:
                reason = (f"no pattern: best label {det.label} "
                          f"(p={det.probabilities.get(det.label, 0.0):.2f})")
            # the same event id twice in one batch: the second is a repeat
            out[i] = Observation(det.pattern, det.label, det.confidence,
                                 reason if new else "recorded before", new=new)
        return [o for o in out if o is not None]

    def decide(self, event: dict[str, Any]) -> Detection:
        """The detector's decision, unless a person corrected this text (or one nearly
        identical): then theirs, with confidence 1."""
        return self.decide_many([event])[0]

    def decide_many(self, events: Sequence[dict[str, Any]]) -> list[Detection]:
        """``decide`` for several events, classified as one batch."""
        out = []
        for detection in self.detector.classify_many(events):
            label = self.store.correction_for(detection.text, detection.neighbours,
                                              detection.key or None)
            if label is not None:
                detection = replace(
                    detection, pattern=None if label == NONE else label, label=label,
                    confidence=1.0,
                    notes=(*detection.notes, f"decided by a correction: {label}"))
            out.append(detection)
        return out

    def close(self) -> None:
        self.store.close()


def _pattern_store(settings: Settings, embedder: Embedder) -> PatternStore:
    replica = None
    if settings.pattern_backend == "firestore":
        from trinity.stores.patterns.firestore import FirestoreReplica

        replica = FirestoreReplica(settings.firestore_project)
    return PatternStore(settings.patterns_db, embedder, replica)


@contextmanager
def open_store(settings: Settings) -> Iterator[PatternStore]:
    """The pattern store alone (no model): for the operator's tools."""
    store = _pattern_store(settings, load_embedder())
    try:
        yield store
    finally:
        store.close()


def warm(cache_dir: Path | None = None) -> None:
    """Build the embedding table and train the model into the cache (``make install``),
    or into ``cache_dir``."""
    embedder = load_embedder()
    started = time.perf_counter()
    load_model(embedder, cache_dir)
    print(f"WITNESS model ready in the cache ({time.perf_counter() - started:.1f} s)")


if __name__ == "__main__":
    warm(Path(sys.argv[1]) if len(sys.argv) > 1 else None)
