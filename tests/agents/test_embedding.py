"""The static MiniLM embedding table: build, load and the geometry WITNESS relies on.

The real table takes ~18 s to distil, so the default cache is reused when it is already
there; otherwise it is built once per session into a temporary TRINITY_CACHE_DIR. The
atomicity tests use a fake (fast) token-vector source so they can race real builds.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from trinity.agents import embedding
from trinity.agents.embedding import (
    StaticEmbedder,
    build_table,
    default_table_path,
    load_embedder,
)


@pytest.fixture
def fake_vectors(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Replace the ONNX pass with random vectors so a build takes milliseconds."""

    def fake(vocab_size: int, cls_id: int, sep_id: int) -> np.ndarray:
        rng = np.random.default_rng(vocab_size)
        return rng.normal(size=(vocab_size, 384)).astype(np.float32)

    monkeypatch.setattr(embedding, "_token_vectors", fake)
    yield


def test_default_path_follows_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("TRINITY_CACHE_DIR", str(tmp_path))
    assert default_table_path() == tmp_path / embedding.TABLE_NAME
    monkeypatch.delenv("TRINITY_CACHE_DIR")
    assert default_table_path() == Path.home() / ".cache" / "trinity" / embedding.TABLE_NAME


def test_embed_shape_dtype_and_unit_norm(embedder: StaticEmbedder) -> None:
    texts = ["panic: runtime error: index out of range", "Add dark mode", "x" * 10_000]
    vecs = embedder.embed(texts)
    assert embedder.dim == 256
    assert vecs.shape == (3, 256)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_empty_inputs_give_zero_vectors(embedder: StaticEmbedder) -> None:
    assert embedder.embed([]).shape == (0, embedder.dim)
    vecs = embedder.embed(["", "   "])
    assert not vecs.any()


def test_paraphrase_is_closer_than_unrelated(embedder: StaticEmbedder) -> None:
    a, b, c, d = embedder.embed(
        [
            "this test fails intermittently on CI",
            "flaky test: sometimes passes, sometimes fails in continuous integration",
            "please add a dark mode toggle to the settings page",
            "segmentation fault when the server starts",
        ]
    )
    assert a @ b > a @ c + 0.1
    assert a @ b > a @ d + 0.1
    # and the embedding of a text is stable
    np.testing.assert_array_equal(embedder.embed(["abc def"]), embedder.embed(["abc def"]))


def test_fingerprint_is_sha256_of_table(embedder: StaticEmbedder) -> None:
    assert len(embedder.fingerprint) == 64
    int(embedder.fingerprint, 16)


def test_build_writes_table_and_checksum(fake_vectors: None, tmp_path: Path) -> None:
    path = build_table(tmp_path / "t.npy", dims=32)
    table = np.load(path)
    assert table.dtype == np.float16
    assert table.shape[1] == 32
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(str(path) + ".sha256").read_text().split()[0] == digest
    assert load_embedder(path).fingerprint == digest
    # frequent (low-id) tokens are down-weighted by SIF relative to rare ones
    norms = np.linalg.norm(table.astype(np.float32), axis=1)
    assert norms[1000:1100].mean() < norms[-100:].mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npy.sha256"]


def test_build_rejects_bad_dims(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_table(tmp_path / "t.npy", dims=0)


def test_load_builds_missing_table(fake_vectors: None, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.npy"
    emb = load_embedder(path)
    assert path.exists()
    assert emb.embed(["hello"]).shape == (1, 256)


def test_concurrent_builds_never_expose_a_partial_file(fake_vectors: None, tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    seen: list[tuple[int, ...]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if path.exists():
                try:
                    seen.append(np.load(path).shape)
                except BaseException as exc:  # a torn read would land here
                    errors.append(exc)

    def builder() -> None:
        try:
            build_table(path, dims=64)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader)] + [
        threading.Thread(target=builder) for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads[1:]:
        t.join()
    stop.set()
    threads[0].join()
    assert not errors
    assert seen and all(shape[1] == 64 for shape in seen)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npy.sha256"]


def test_failed_build_leaves_nothing(
    fake_vectors: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(np, "save", boom)
    with pytest.raises(OSError):
        build_table(tmp_path / "t.npy", dims=16)
    assert list(tmp_path.iterdir()) == []


def test_cache_files_are_readable_by_others(fake_vectors: None, tmp_path: Path) -> None:
    path = build_table(tmp_path / "t.npy", dims=16)
    assert os.stat(path).st_mode & 0o044 == 0o044
