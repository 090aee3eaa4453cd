"""Embedded data and tokenizers, on a small generated source tree (fast, no network)."""

import base64
import json
import zlib
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

from nsa_flex.data import corpus as corpus_mod  # noqa: E402
from nsa_flex.data.corpus import (  # noqa: E402
    VALIDATION_EVERY, build_corpus, docstrings, iter_texts, stdlib_sources)
from nsa_flex.data.tokenizer import (  # noqa: E402
    BOS, EOS, TiktokenTokenizer, ensure_embedded_tokenizer, load_tokenizer,
    resolve_tokenizer_path, train_bpe_tokenizer)

MODULE = '''"""Module {i}: utilities for counting things and reporting their totals."""


class Counter{i}:
    """Count items {i} times, and remember the largest count seen so far."""

    def add(self, item):
        """Add one item to the running count and return the new total."""
        return item + {i}
'''


def make_tree(root: Path, n: int = 120) -> Path:
    for i in range(n):
        pkg = root / f"pkg{i % 7}"
        pkg.mkdir(parents=True, exist_ok=True)
        (pkg / f"mod{i}.py").write_text(MODULE.format(i=i))
    (root / "test").mkdir()
    (root / "test" / "test_skip.py").write_text("SKIPPED = 'tests are left out'\n")
    (root / "site-packages").mkdir()
    (root / "site-packages" / "third.py").write_text("THIRD = 'party'\n")
    (root / "latin1.py").write_bytes(b"x = '\xe9\xe8'\n")  # not UTF-8: skipped
    (root / "empty.py").write_text("   \n")
    return root


def test_sources_leave_out_tests_and_third_party(tmp_path):
    files = stdlib_sources(make_tree(tmp_path))
    names = {f.name for f in files}
    assert "test_skip.py" not in names and "third.py" not in names
    assert "mod0.py" in names and len([n for n in names if n.startswith("mod")]) == 120
    assert files == sorted(files)


def test_docstrings_extracted():
    text = docstrings(MODULE.format(i=3))
    assert "Module 3: utilities" in text
    assert "Counter3:\nCount items 3 times" in text
    assert "add:\nAdd one item" in text
    assert docstrings("def broken(:\n") == ""


def test_build_corpus_splits_and_manifest(tmp_path):
    src = make_tree(tmp_path / "src")
    out = tmp_path / "corpus"
    m = build_corpus(out, stdlib_sources(src), src, progress=False)
    train = list(iter_texts(out, "train"))
    val = list(iter_texts(out, "validation"))
    # every module gives its source and its docstrings; 2 files are skipped (latin-1, empty)
    assert len(train) + len(val) == 2 * 120
    assert m["documents"] == {"train": len(train), "validation": len(val)}
    expected_val = sum(
        1 for i in range(120)
        if zlib.crc32(f"pkg{i % 7}/mod{i}.py".encode()) % VALIDATION_EVERY == 0)
    assert len(val) == 2 * expected_val > 0
    assert not any("tests are left out" in t for t in train + val)
    # the shuffle is fixed: a rebuild gives the same files
    build_corpus(tmp_path / "again", stdlib_sources(src), src, progress=False)
    assert (out / "train.jsonl").read_bytes() == (tmp_path / "again" / "train.jsonl").read_bytes()
    assert json.loads((out / "manifest.json").read_text())["files"] == 122


def test_corpus_cache_missing_a_split_is_rebuilt(tmp_path):
    src = make_tree(tmp_path / "src")
    out = corpus_mod.ensure_stdlib_corpus(tmp_path / "cache", progress=False, source=src)
    train = (out / "train.jsonl").read_bytes()
    (out / "train.jsonl").unlink()      # a cache copied without its largest file
    again = corpus_mod.ensure_stdlib_corpus(tmp_path / "cache", progress=False, source=src)
    assert again == out and (out / "train.jsonl").read_bytes() == train
    assert (out / "manifest.json").exists()


def test_embedded_tokenizer_built_once_and_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_FLEX_CACHE", str(tmp_path / "cache"))
    src = make_tree(tmp_path / "src")
    tok_dir = ensure_embedded_tokenizer(vocab_size=400, progress=False, source=src)
    assert tok_dir.parent == tmp_path / "cache"
    assert (tok_dir / "tokenizer.json").exists()
    stamp = (tok_dir / "tokenizer.json").stat().st_mtime_ns
    corpus_stamp = (corpus_mod.stdlib_corpus_dir() / "manifest.json").stat().st_mtime_ns
    again = ensure_embedded_tokenizer(vocab_size=400, progress=False, source=src)
    assert again == tok_dir and (tok_dir / "tokenizer.json").stat().st_mtime_ns == stamp
    assert (corpus_mod.stdlib_corpus_dir() / "manifest.json").stat().st_mtime_ns == corpus_stamp

    from torchtitan.components.tokenizer import HuggingFaceTokenizer

    tok = HuggingFaceTokenizer(str(tok_dir))
    assert tok.get_vocab_size() == 400
    text = "class Counter7:\n    def add(self, item):\n        return item + 7\n"
    ids = tok.encode(text, add_bos=True, add_eos=True)
    assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
    assert tok.bos_id == tok.tokenizer.token_to_id(BOS) and tok.eos_id == tok.tokenizer.token_to_id(EOS)
    assert tok.decode(ids[1:-1]) == text
    # trained merges compress the code it was trained on
    assert len(ids) - 2 < len(text.encode()) / 2


def test_train_bpe_refuses_tiny_vocab(tmp_path):
    with pytest.raises(ValueError, match="too small"):
        train_bpe_tokenizer(["abc"], tmp_path, vocab_size=100, progress=False)


def make_tiktoken_file(path: Path) -> Path:
    ranks = {bytes([b]): b for b in range(256)}
    for merge in (b"he", b"ll", b"hell", b"hello", b" w", b" wo"):
        ranks[merge] = len(ranks)
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_tiktoken_tokenizer(tmp_path):
    f = make_tiktoken_file(tmp_path / "tiny.tiktoken")
    tok = TiktokenTokenizer(f)
    assert tok.get_vocab_size() == 262 + 256
    assert (tok.bos_id, tok.eos_id) == (262, 263)
    ids = tok.encode("hello world", add_bos=True, add_eos=True)
    assert ids[0] == 262 and ids[-1] == 263
    assert ids[1] == 259  # "hello" is one merged token (rank 259)
    assert tok.decode(ids[1:-1]) == "hello world"
    # special-token text in the data is encoded as plain text, never as a control token
    assert 263 not in tok.encode("<|end_of_text|>")
    # long inputs are encoded in chunks with the same result
    long = "hello world " * 50_000
    assert tok.decode(tok.encode(long)) == long


def test_resolve_tokenizer_paths(tmp_path):
    f = make_tiktoken_file(tmp_path / "bpe.tiktoken")
    assert resolve_tokenizer_path(str(f)) == ("tiktoken", f)
    llama_dir = tmp_path / "original"
    llama_dir.mkdir()
    make_tiktoken_file(llama_dir / "tokenizer.model")
    assert resolve_tokenizer_path(str(llama_dir)) == ("tiktoken", llama_dir / "tokenizer.model")
    assert isinstance(load_tokenizer(str(llama_dir)), TiktokenTokenizer)
    with pytest.raises(FileNotFoundError, match="does not exist.*embedded"):
        resolve_tokenizer_path(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        resolve_tokenizer_path(str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not a tiktoken BPE file"):
        (tmp_path / "bad.tiktoken").write_text("not base64 at all\n")
        TiktokenTokenizer(tmp_path / "bad.tiktoken")


def test_datasets_registered_and_read_through_torchtitan(tmp_path, monkeypatch):
    monkeypatch.setenv("NSA_FLEX_CACHE", str(tmp_path / "cache"))
    from torchtitan.hf_datasets.text_datasets import DATASETS, HuggingFaceTextDataset

    from nsa_flex.data.datasets import register_datasets

    register_datasets()
    for name in ("stdlib", "stdlib_validation", "fineweb", "fineweb_validation", "c4"):
        assert name in DATASETS
    src = make_tree(tmp_path / "src")
    corpus_dir = tmp_path / "corpus"
    build_corpus(corpus_dir, stdlib_sources(src), src, progress=False)
    tok = load_tokenizer(str(ensure_embedded_tokenizer(vocab_size=400, progress=False, source=src)))
    ds = HuggingFaceTextDataset("stdlib_validation", str(corpus_dir), tok, seq_len=32)
    x, y = next(iter(ds))
    assert x["input"].shape == (32,) and y.shape == (32,)
    assert x["input"][0].item() == tok.bos_id
    assert (x["input"][1:] == y[:-1]).all()
