"""Datasets the nsa model adds to torchtitan's ``DATASETS`` (``[training] dataset = ...``).

* ``stdlib`` / ``stdlib_validation``: the embedded corpus (``nsa_flex.data.corpus``), built at
  first use, offline. ``dataset_path`` may point to another directory with train.jsonl /
  validation.jsonl files of ``{"text": ...}`` lines.
* ``fineweb`` / ``fineweb_validation``: HuggingFaceFW/fineweb-edu (``sample-10BT``), streamed
  through ``datasets``; the first 10,000 documents are held out for validation and skipped by
  training. ``dataset_path`` may name a local copy (a directory ``load_dataset`` can read).
* torchtitan's own ``c4`` / ``c4_validation`` / ``c4_test`` stay available.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from .corpus import cache_root, ensure_stdlib_corpus

EMBEDDED_DATASET = "stdlib"


def _embedded_path() -> str:
    # resolved lazily by the loader: the corpus is built on first use only
    return "embedded"


def _load_jsonl_split(path: str, split: str):
    from datasets import load_dataset

    corpus = ensure_stdlib_corpus() if path == "embedded" else Path(path).expanduser()
    data_file = Path(corpus) / f"{split}.jsonl"
    if not data_file.exists():
        raise FileNotFoundError(f"dataset file {data_file} does not exist (expected {split}.jsonl "
                                f"with one {{\"text\": ...}} object per line)")
    return load_dataset("json", data_files=str(data_file), split="train",
                        cache_dir=str(cache_root() / "hf_datasets"))


FINEWEB_HELD_OUT = 10_000


def _fineweb_stream(path: str):
    from datasets import load_dataset

    local = Path(path).expanduser()
    if local.exists():
        return load_dataset(str(local), split="train", streaming=True)
    return load_dataset(path, name="sample-10BT", split="train", streaming=True)


def _load_fineweb(path: str, split: str):
    # fineweb-edu has a single split: validation takes its first documents, training the rest
    stream = _fineweb_stream(path)
    return stream.take(FINEWEB_HELD_OUT) if split == "validation" else stream.skip(FINEWEB_HELD_OUT)


def _text(sample) -> str:
    return sample["text"]


def register_datasets() -> None:
    """Add the nsa datasets to torchtitan's registry (idempotent)."""
    DATASETS.setdefault(EMBEDDED_DATASET, DatasetConfig(
        path=_embedded_path(), loader=partial(_load_jsonl_split, split="train"),
        sample_processor=_text))
    DATASETS.setdefault(f"{EMBEDDED_DATASET}_validation", DatasetConfig(
        path=_embedded_path(), loader=partial(_load_jsonl_split, split="validation"),
        sample_processor=_text))
    DATASETS.setdefault("fineweb", DatasetConfig(
        path="HuggingFaceFW/fineweb-edu", loader=partial(_load_fineweb, split="train"),
        sample_processor=_text))
    DATASETS.setdefault("fineweb_validation", DatasetConfig(
        path="HuggingFaceFW/fineweb-edu", loader=partial(_load_fineweb, split="validation"),
        sample_processor=_text))
