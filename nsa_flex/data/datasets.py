"""Datasets the nsa model adds to torchtitan's ``DATASETS`` (``[training] dataset = ...``).

* ``stdlib`` / ``stdlib_validation``: the embedded corpus (``nsa_flex.data.corpus``), built at
  first use, offline. ``dataset_path`` may point to another directory with train.jsonl /
  validation.jsonl files of ``{"text": ...}`` lines.
* ``fineweb`` / ``fineweb_validation``: HuggingFaceFW/fineweb-edu (``sample-10BT``), streamed
  through ``datasets``; the first 10,000 documents are held out for validation and skipped by
  training. ``dataset_path`` may name a local copy (a directory ``load_dataset`` can read).
* ``stdlib_passkey`` / ``stdlib_passkey_validation``: the embedded corpus mixed with synthetic
  passkey documents (``nsa_flex.data.passkey``), offline and seeded. Every sample is exactly one
  training row (its text encodes, with BOS and EOS, to ``seq_len + 1`` tokens), so a passkey
  document always spans a whole packed sequence: corpus filler with 1 to ``needles`` named keys,
  each at a uniform random depth, and the questions and answers at the end. The options ride in
  ``dataset_path`` as a query string after the corpus location, e.g.
  ``dataset_path = "embedded?share=0.75&needles=16&seq_len=4096"`` (see ``PASSKEY_OPTIONS``);
  ``seq_len`` must equal ``training.seq_len`` (resp. ``validation.seq_len``) and ``tokenizer``
  ``model.hf_assets_path``, since the loader cuts rows by token count. Training cycles over the
  train split for ever; validation reads the validation split once.
* torchtitan's own ``c4`` / ``c4_validation`` / ``c4_test`` stay available.
"""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from urllib.parse import parse_qsl

from torchtitan.hf_datasets import DatasetConfig
from torchtitan.hf_datasets.text_datasets import DATASETS

from .corpus import cache_root, ensure_stdlib_corpus
from .passkey import NAMES

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


# the options of the passkey mixture, in dataset_path's query string: (default, meaning)
PASSKEY_OPTIONS = {
    "share": (0.25, "share of rows that are passkey documents, in [0, 1]"),
    "seq_len": (4096, "tokens per row: set it to training.seq_len (validation.seq_len)"),
    "seed": (0, "seed of the keys, depths and row kinds"),
    "digits": (5, "digits of a key"),
    "needles": (1, "most needles (named keys) in one passkey document: each draws 1..needles"),
    "shards": (12, "independent row streams (dataloader workers and data-parallel ranks "
                   "split them; use a multiple of both)"),
    "tokenizer": ("embedded", "the tokenizer that cuts the rows: model.hf_assets_path"),
}
PASSKEY_DATASET = "stdlib_passkey"
TOKENS_PER_NEEDLE = 160   # row tokens per needle at most: the haystack keeps most of the row


def parse_passkey_path(path: str) -> tuple[str, dict]:
    """``"CORPUS?key=value&..."`` -> (corpus location, options with defaults), checked."""
    corpus, _, query = (path or "embedded").partition("?")
    opts = {k: v[0] for k, v in PASSKEY_OPTIONS.items()}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ValueError(f"dataset_path {path!r}: the options after '?' must be key=value pairs "
                         f"joined by '&', e.g. embedded?share=0.5&seq_len=4096") from None
    for key, value in pairs:
        if key not in PASSKEY_OPTIONS:
            raise ValueError(f"dataset_path {path!r}: unknown passkey option {key!r}; known: "
                             f"{', '.join(PASSKEY_OPTIONS)} (e.g. embedded?share=0.5&seq_len=4096)")
        default = PASSKEY_OPTIONS[key][0]
        try:
            opts[key] = type(default)(value)
        except ValueError:
            raise ValueError(f"dataset_path {path!r}: {key}={value!r} is not a "
                             f"{type(default).__name__}") from None
    if not 0.0 <= opts["share"] <= 1.0:
        raise ValueError(f"dataset_path {path!r}: share={opts['share']} must lie in [0, 1]")
    if opts["seq_len"] < 64:
        raise ValueError(f"dataset_path {path!r}: seq_len={opts['seq_len']} is too short for a "
                         f"passkey document; use training.seq_len (>= 64)")
    if not 1 <= opts["digits"] <= 18:
        raise ValueError(f"dataset_path {path!r}: digits={opts['digits']} must lie in 1..18")
    if not 1 <= opts["needles"] <= len(NAMES):
        raise ValueError(f"dataset_path {path!r}: needles={opts['needles']} must lie in "
                         f"1..{len(NAMES)}")
    if opts["needles"] * TOKENS_PER_NEEDLE > opts["seq_len"]:
        raise ValueError(f"dataset_path {path!r}: needles={opts['needles']} do not fit in rows of "
                         f"seq_len={opts['seq_len']} (a needle with its question and answer takes "
                         f"~50 tokens; allow {TOKENS_PER_NEEDLE} a needle): use needles <= "
                         f"{max(1, opts['seq_len'] // TOKENS_PER_NEEDLE)}")
    if opts["shards"] < 1:
        raise ValueError(f"dataset_path {path!r}: shards={opts['shards']} must be >= 1")
    return corpus or "embedded", opts


def _passkey_rows(shards: list[int], corpus: str, split: str, options: str):
    """Rows of the shards given (round robin); each shard its own seed and corpus start."""
    from .corpus import iter_texts
    from .passkey import CorpusStream, mixture_rows
    from .tokenizer import load_tokenizer

    o = json.loads(options)
    corpus_dir = ensure_stdlib_corpus() if corpus == "embedded" else Path(corpus).expanduser()
    if not (corpus_dir / f"{split}.jsonl").exists():
        raise FileNotFoundError(f"dataset file {corpus_dir / (split + '.jsonl')} does not exist "
                                f"(expected {split}.jsonl with one {{\"text\": ...}} object per line)")
    tok = load_tokenizer(o["tokenizer"])
    n_docs = sum(1 for _ in iter_texts(corpus_dir, split))
    n, cycle = o["shards"], split == "train"
    if not cycle and n_docs < n:
        raise ValueError(f"{split} split of {corpus_dir} has {n_docs} documents, fewer than "
                         f"shards={n}; use fewer shards")
    rows = [mixture_rows(tok, CorpusStream(tok, corpus_dir, split, cycle=cycle,
                                           first=k * n_docs // n, last=(k + 1) * n_docs // n),
                         o["seq_len"], o["share"], o["seed"] * 1_000_003 + k, o["digits"],
                         o["needles"])
            for k in shards]
    while rows:
        for it in list(rows):
            try:
                yield next(it)
            except StopIteration:
                rows.remove(it)


def _load_passkey(path: str, split: str):
    from datasets import IterableDataset
    from torchtitan.tools.logging import logger

    corpus, opts = parse_passkey_path(path)
    logger.info(f"nsa_flex: passkey mixture from {corpus!r} ({split}): {opts['share']:.0%} passkey "
                f"rows of exactly {opts['seq_len']} tokens (+1 for the labels), seed {opts['seed']}, "
                f"1-{opts['needles']} needles of {opts['digits']}-digit keys a row, "
                f"{opts['shards']} shards, tokenizer "
                f"{opts['tokenizer']!r}. training.seq_len must be {opts['seq_len']}.")
    return IterableDataset.from_generator(
        _passkey_rows, gen_kwargs=dict(shards=list(range(opts["shards"])), corpus=corpus,
                                       split=split, options=json.dumps(opts)))


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
    DATASETS.setdefault(PASSKEY_DATASET, DatasetConfig(
        path="embedded?share=0.25&seq_len=4096", loader=partial(_load_passkey, split="train"),
        sample_processor=_text))
    DATASETS.setdefault(f"{PASSKEY_DATASET}_validation", DatasetConfig(
        path="embedded?share=0.25&seq_len=4096", loader=partial(_load_passkey, split="validation"),
        sample_processor=_text))
