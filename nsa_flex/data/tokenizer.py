"""Tokenizers for the nsa model: the embedded one, HF ``tokenizer.json``, and tiktoken BPE files.

``model.hf_assets_path`` picks the tokenizer:

* ``"embedded"``: a byte-level BPE (HF ``tokenizers``) trained once on the embedded stdlib
  corpus (``nsa_flex.data.corpus``) and cached as ``tokenizer.json`` + ``tokenizer_config.json``;
  loaded through torchtitan's ``HuggingFaceTokenizer``. No network.
* a directory with ``tokenizer.json`` (any HF tokenizer): torchtitan's ``HuggingFaceTokenizer``.
* a tiktoken BPE file (``*.tiktoken``), or a directory holding ``tokenizer.model`` in tiktoken
  format and no ``tokenizer.json`` (Llama 3's ``original/`` layout): :class:`TiktokenTokenizer`
  with Llama 3's split pattern and special tokens.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from pathlib import Path

from torchtitan.components.tokenizer import BaseTokenizer, HuggingFaceTokenizer

from .corpus import build_lock, cache_root, ensure_stdlib_corpus, iter_texts, stdlib_corpus_dir

logger = logging.getLogger("nsa_flex.data")

EMBEDDED = "embedded"
EMBEDDED_VOCAB = 8192
TOKENIZER_VERSION = 1
BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|pad|>"


def embedded_tokenizer_dir(root: Path | None = None, vocab_size: int = EMBEDDED_VOCAB) -> Path:
    corpus = stdlib_corpus_dir(root)
    return (root or cache_root()) / f"tokenizer-{corpus.name}-bpe{vocab_size}-v{TOKENIZER_VERSION}"


def train_bpe_tokenizer(texts, out_dir: Path, vocab_size: int, progress: bool = True,
                        length: int | None = None) -> Path:
    """Train a byte-level BPE on ``texts`` and write tokenizer.json + tokenizer_config.json."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    special = [BOS, EOS, PAD]
    if vocab_size < 256 + len(special) + 1:
        raise ValueError(f"vocab_size={vocab_size} is too small for a byte-level BPE "
                         f"(256 bytes + {len(special)} special tokens)")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=special, show_progress=progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), min_frequency=2)
    tok.train_from_iterator(texts, trainer=trainer, length=length)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / "tokenizer.json.tmp"
    tok.save(str(tmp))
    config = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD,
              "add_bos_token": False, "add_eos_token": False,
              "model_max_length": 1 << 30, "tokenizer_class": "PreTrainedTokenizerFast"}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    os.replace(tmp, out_dir / "tokenizer.json")  # written last: its presence means complete
    return out_dir


def ensure_embedded_tokenizer(root: Path | None = None, vocab_size: int = EMBEDDED_VOCAB,
                              progress: bool = True, source: Path | None = None) -> Path:
    """The cached embedded tokenizer directory, trained first if it is not there yet."""
    out = embedded_tokenizer_dir(root, vocab_size)
    if (out / "tokenizer.json").exists():
        return out
    corpus = ensure_stdlib_corpus(root, progress=progress, source=source)
    with build_lock(out):
        if (out / "tokenizer.json").exists():
            return out
        n = json.loads((corpus / "manifest.json").read_text())["documents"]["train"]
        logger.info(f"nsa_flex: training a {vocab_size}-token byte-level BPE on the embedded "
                    f"corpus ({n} documents) into {out} (once; later runs reuse it)")
        train_bpe_tokenizer(iter_texts(corpus, "train"), out, vocab_size, progress=progress, length=n)
        logger.info(f"nsa_flex: tokenizer ready at {out}")
    return out


# Llama 3's pre-tokenizer pattern and special tokens (used for tiktoken BPE files).
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
LLAMA3_SPECIAL = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>", "<|finetune_right_pad_id|>", "<|step_id|>",
    "<|start_header_id|>", "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>",
] + [f"<|reserved_special_token_{i}|>" for i in range(2, 247)]


class TiktokenTokenizer(BaseTokenizer):
    """A tiktoken BPE file (base64 token + rank per line) with Llama 3's pattern and specials."""

    MAX_CHARS = 400_000  # tiktoken's limit on one encode call, as Llama 3 splits
    MAX_SPACE_RUN = 25_000

    def __init__(self, path: str | os.PathLike):
        super().__init__()
        import tiktoken
        from tiktoken.load import load_tiktoken_bpe

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tiktoken BPE file {path} does not exist")
        try:
            ranks = load_tiktoken_bpe(str(path))
        except Exception as e:
            raise ValueError(f"{path} is not a tiktoken BPE file (base64 token and rank per "
                             f"line): {e}") from e
        n = len(ranks)
        self.special_tokens = {t: n + i for i, t in enumerate(LLAMA3_SPECIAL)}
        self.model = tiktoken.Encoding(name=path.name, pat_str=LLAMA3_PATTERN,
                                       mergeable_ranks=ranks, special_tokens=self.special_tokens)
        self.bos_id = self.special_tokens["<|begin_of_text|>"]
        self.eos_id = self.special_tokens["<|end_of_text|>"]
        self.path = str(path)

    def _chunks(self, text: str):
        for i in range(0, len(text), self.MAX_CHARS):
            piece = text[i:i + self.MAX_CHARS]
            start, run, prev_space = 0, 0, None
            for j, ch in enumerate(piece):
                is_space = ch.isspace()
                run = run + 1 if is_space == prev_space else 1
                prev_space = is_space
                if run > self.MAX_SPACE_RUN:
                    yield piece[start:j]
                    start, run = j, 1
            yield piece[start:]

    def encode(self, text: str, add_bos: bool = False, add_eos: bool = False, **_) -> list[int]:
        ids: list[int] = []
        for chunk in self._chunks(text):
            ids.extend(self.model.encode(chunk, allowed_special=set(), disallowed_special=()))
        if add_bos:
            ids.insert(0, self.bos_id)
        if add_eos:
            ids.append(self.eos_id)
        return ids

    def decode(self, token_ids, **_) -> str:
        return self.model.decode(list(token_ids))

    def get_vocab_size(self) -> int:
        return self.model.n_vocab


def resolve_tokenizer_path(hf_assets_path: str) -> tuple[str, Path]:
    """("embedded" | "hf" | "tiktoken", path) for ``model.hf_assets_path``."""
    if hf_assets_path == EMBEDDED:
        return "embedded", ensure_embedded_tokenizer()
    p = Path(hf_assets_path).expanduser()
    if p.is_file() and p.suffix == ".tiktoken":
        return "tiktoken", p
    if p.is_dir():
        if (p / "tokenizer.json").exists():
            return "hf", p
        if (p / "tokenizer.model").exists():
            return "tiktoken", p / "tokenizer.model"
        if (p / "vocab.json").exists() or (p / "vocab.txt").exists():
            return "hf", p
        raise FileNotFoundError(
            f"model.hf_assets_path={hf_assets_path!r} holds no tokenizer: expected tokenizer.json "
            f"(HF), tokenizer.model (tiktoken BPE) or vocab.json/vocab.txt; found "
            f"{sorted(x.name for x in p.iterdir())[:20]}")
    raise FileNotFoundError(
        f"model.hf_assets_path={hf_assets_path!r} does not exist. Use 'embedded' for the built-in "
        f"tokenizer, a directory with tokenizer.json, or a tiktoken BPE file ending in .tiktoken")


@functools.lru_cache(maxsize=8)
def load_tokenizer(hf_assets_path: str) -> BaseTokenizer:
    kind, path = resolve_tokenizer_path(hf_assets_path)
    if kind == "tiktoken":
        tok = TiktokenTokenizer(path)
    else:
        tok = HuggingFaceTokenizer(str(path))
    if tok.eos_id is None:
        logger.warning(f"tokenizer at {path} defines no EOS token; documents will not be separated")
    logger.info(f"nsa_flex: tokenizer {kind} from {path}, {tok.get_vocab_size()} tokens")
    return tok


def tokenizer_vocab_size(job_config) -> int:
    return load_tokenizer(job_config.model.hf_assets_path).get_vocab_size()
