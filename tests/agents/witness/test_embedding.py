"""WITNESS's static embeddings: the MiniLM table (build, load) and the WordLlama table
beside it, joined; and the geometry WITNESS relies on.

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

from trinity.agents.witness import embedding
from trinity.agents.witness.embedding import (
    Embedder,
    JointEmbedder,
    StaticEmbedder,
    build_table,
    default_table_path,
    load_embedder,
    load_static,
    load_wordllama,
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


def test_embed_shape_dtype_and_unit_norm(embedder: Embedder) -> None:
    texts = ["panic: runtime error: index out of range", "Add dark mode", "x" * 10_000]
    vecs = embedder.embed(texts)
    assert embedder.dim == 512  # MiniLM 256 + WordLlama 256
    assert vecs.shape == (3, 512)
    assert vecs.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vecs, axis=1), 1.0, atol=1e-5)


def test_empty_inputs_give_zero_vectors(embedder: Embedder) -> None:
    assert embedder.embed([]).shape == (0, embedder.dim)
    vecs = embedder.embed(["", "   "])
    assert not vecs.any()


def test_paraphrase_is_closer_than_unrelated(embedder: Embedder) -> None:
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


def test_fingerprint_is_sha256_of_table(embedder: Embedder) -> None:
    assert len(embedder.fingerprint) == 64
    int(embedder.fingerprint, 16)


def test_joint_rows_are_the_parts_side_by_side(tmp_path: Path) -> None:
    """Each half is its part's unit row scaled by 1/sqrt(2): an inner product of two joint
    rows is the mean of the parts' cosines."""
    minilm = load_static()
    wordllama = load_wordllama(tmp_path / embedding.WORDLLAMA_TABLE_NAME)
    joint = JointEmbedder([minilm, wordllama])
    texts = ["Support for HTTPS proxies", "test_login fails on CI about 1 run in 10", "", "ok"]
    rows = joint.embed(texts)
    a, b = minilm.embed(texts), wordllama.embed(texts)
    assert joint.dim == minilm.dim + wordllama.dim == rows.shape[1]
    np.testing.assert_allclose(rows[[0, 1, 3]], np.hstack([a, b])[[0, 1, 3]] / np.sqrt(2),
                               atol=1e-6)
    assert not rows[2].any()  # no tokens: the zero row, not NaN
    np.testing.assert_allclose(rows[0] @ rows[1], (a[0] @ a[1] + b[0] @ b[1]) / 2, atol=1e-5)


def test_joint_fingerprint_follows_every_part(tmp_path: Path) -> None:
    minilm = load_static()
    wordllama = load_wordllama(tmp_path / embedding.WORDLLAMA_TABLE_NAME)
    joint = JointEmbedder([minilm, wordllama]).fingerprint
    assert joint not in (minilm.fingerprint, wordllama.fingerprint)
    assert JointEmbedder([wordllama, minilm]).fingerprint != joint
    assert JointEmbedder([minilm]).fingerprint != joint
    with pytest.raises(ValueError):
        JointEmbedder([])


def test_wordllama_table_is_the_shipped_weights(tmp_path: Path) -> None:
    """The cached .npy is the wheel's safetensors tensor, quantised, with a checksum."""
    from safetensors.numpy import load_file

    path = embedding.build_wordllama_table(tmp_path / "w.npy")
    shipped = load_file(str(embedding._wordllama_file(*embedding._WORDLLAMA_WEIGHTS)))
    (weights,) = shipped.values()
    table = np.load(path)
    assert table.shape == (32000,) and table["q"].shape == weights.shape == (32000, 256)
    rows = weights.astype(np.float32)
    error = np.abs(table["q"] * table["s"][:, None] - rows).max(axis=1)
    assert np.all(error <= table["s"] / 2 + 1e-6)  # rounding only
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(str(path) + ".sha256").read_text().split()[0] == digest
    assert load_wordllama(path).fingerprint == digest


def test_missing_wordllama_package_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedding.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match="wordllama package is not installed"):
        load_wordllama(tmp_path / "w.npy")
    assert not (tmp_path / "w.npy").exists()


def test_quantised_rows_embed_as_the_float_rows_do() -> None:
    rng = np.random.default_rng(7)
    tok = embedding._load_tokenizer()
    table = rng.normal(size=(tok.get_vocab_size(), 48)).astype(np.float16)
    table[5] = 0.0  # an all-zero row keeps a usable scale
    q = embedding.quantise(table)
    assert q["s"][5] == 1.0 and not q["q"][5].any()
    texts = ["Support for HTTPS proxies", "panic: runtime error: index out of range", "ok"]
    exact = np.stack([table[tok.encode(t, add_special_tokens=False).ids].astype(np.float32)
                      .mean(axis=0) for t in texts])
    exact /= np.linalg.norm(exact, axis=1, keepdims=True)
    packed = StaticEmbedder(q, "q", tok)
    assert packed.dim == 48
    assert np.all((exact * packed.embed(texts)).sum(axis=1) > 0.9999)
    with pytest.raises(ValueError, match="quantised rows"):
        StaticEmbedder(table, "f", tok)
    with pytest.raises(ValueError, match="2-D"):
        embedding.quantise(np.zeros(4))


def test_table_smaller_than_the_vocabulary_is_refused() -> None:
    with pytest.raises(ValueError, match="fewer than the tokenizer"):
        StaticEmbedder(embedding.quantise(np.zeros((100, 8))), "x", embedding._load_tokenizer())


def test_build_writes_table_and_checksum(fake_vectors: None, tmp_path: Path) -> None:
    path = build_table(tmp_path / "t.npy", dims=32)
    table = np.load(path)
    assert table.dtype.names == ("q", "s") and table["q"].dtype == np.int8
    assert table["q"].shape[1] == 32
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert Path(str(path) + ".sha256").read_text().split()[0] == digest
    assert load_static(path).fingerprint == digest
    # frequent (low-id) tokens are down-weighted by SIF relative to rare ones
    norms = np.linalg.norm(table["q"] * table["s"][:, None], axis=1)
    assert norms[1000:1100].mean() < norms[-100:].mean()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t.npy", "t.npy.sha256"]


def test_build_rejects_bad_dims(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        build_table(tmp_path / "t.npy", dims=0)


def test_load_builds_missing_table(fake_vectors: None, tmp_path: Path) -> None:
    path = tmp_path / "sub" / "t.npy"
    emb = load_embedder(path)
    assert path.exists()
    assert (path.parent / embedding.WORDLLAMA_TABLE_NAME).exists()
    assert emb.embed(["hello"]).shape == (1, 512)


def test_concurrent_builds_never_expose_a_partial_file(fake_vectors: None, tmp_path: Path) -> None:
    path = tmp_path / "t.npy"
    seen: list[tuple[int, ...]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def reader() -> None:
        while not stop.is_set():
            if path.exists():
                try:
                    seen.append(np.load(path)["q"].shape)
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


def test_embedding_a_batch_starts_no_tokenizer_threads() -> None:
    """WITNESS embeds the few events waiting as one batch on its own thread: tokenizers'
    thread pool would cost more CPU per text and a malloc arena per thread. Measured in
    a child, so that no earlier test in this process has started the pool already."""
    import subprocess
    import sys

    code = ("import psutil; from trinity.agents.witness.embedding import load_embedder; "
            "e = load_embedder(); p = psutil.Process(); before = p.num_threads(); "
            "e.embed([f'TimeoutError in worker {i}: job took too long' for i in range(200)]); "
            "print(before, p.num_threads())")
    env = {k: v for k, v in os.environ.items() if k != "TOKENIZERS_PARALLELISM"}
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           timeout=120, env=env)
    assert found.returncode == 0, found.stderr
    before, after = found.stdout.split()
    assert after == before
