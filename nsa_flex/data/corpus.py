"""The embedded default corpus: text that every machine with Python has.

At first use the installed Python standard library is gathered into a cache directory: each
module's source is one document, and the docstrings of each module (module, classes, functions,
read with ``ast``) form a second, prose-like document. About 2% of the modules, chosen by a hash
of their path, go to the validation split; each split is shuffled with a fixed seed. Nothing is
downloaded.

Cache: ``$NSA_FLEX_CACHE`` or ``~/.cache/nsa_flex``; the corpus lives in
``corpus-stdlib-py<major><minor>-v<N>/`` as ``train.jsonl``, ``validation.jsonl`` and
``manifest.json`` (written last: a directory without it, or without one of the split files,
is incomplete and is rebuilt).
"""

from __future__ import annotations

import ast
import json
import logging
import os
import random
import sys
import sysconfig
import tempfile
import warnings
import zlib
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable, Iterator

logger = logging.getLogger("nsa_flex.data")

CORPUS_VERSION = 1
SPLITS = ("train", "validation")
SHUFFLE_SEED = 0
VALIDATION_EVERY = 50  # 1 module in 50 (by path hash) goes to the validation split
SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__", "test", "tests", "idle_test"}


def cache_root() -> Path:
    """``$NSA_FLEX_CACHE`` if set, else ``~/.cache/nsa_flex``."""
    env = os.environ.get("NSA_FLEX_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "nsa_flex"


def stdlib_corpus_dir(root: Path | None = None) -> Path:
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    return (root or cache_root()) / f"corpus-stdlib-{tag}-v{CORPUS_VERSION}"


def stdlib_sources(stdlib: Path | None = None) -> list[Path]:
    """The standard library's .py files (tests and third-party packages left out), sorted."""
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise FileNotFoundError(f"the Python standard library was not found at {root}")
    files: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        files.extend(Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py"))
    if not files:
        raise FileNotFoundError(f"no .py sources under {root}")
    return sorted(files)


def docstrings(source: str) -> str:
    """The module's docstrings (module, classes, functions) as one text, '' if none or unparsable."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            tree = ast.parse(source)
        except (SyntaxError, ValueError):
            return ""
    parts = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node)
            if doc and len(doc.strip()) > 20:
                name = getattr(node, "name", None)
                parts.append(f"{name}:\n{doc.strip()}" if name else doc.strip())
    return "\n\n".join(parts)


def split_of(rel_path: str) -> str:
    return "validation" if zlib.crc32(rel_path.encode()) % VALIDATION_EVERY == 0 else "train"


def documents(files: Iterable[Path], base: Path) -> Iterator[tuple[str, str]]:
    """(split, text) for every document of ``files`` (paths relative to ``base`` pick the split)."""
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if not text.strip():
            continue
        split = split_of(path.relative_to(base).as_posix())
        yield split, text
        doc = docstrings(text)
        if doc:
            yield split, doc


@contextmanager
def build_lock(path: Path):
    """An inter-process lock so that the ranks of one job build a cache entry once."""
    from filelock import FileLock

    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        yield


def _progress(iterable, total: int, desc: str):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm ships with datasets/huggingface_hub
        return iterable
    return tqdm(iterable, total=total, desc=desc, unit="file", file=sys.stderr,
                mininterval=1.0, dynamic_ncols=True)


def build_corpus(out_dir: Path, files: list[Path], base: Path, progress: bool = True) -> dict:
    """Write ``train.jsonl``/``validation.jsonl``/``manifest.json`` for ``files`` into out_dir."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=out_dir))
    docs: dict[str, list[str]] = {s: [] for s in SPLITS}
    it = _progress(files, len(files), "nsa_flex: gathering the stdlib corpus") if progress else files
    for split, text in documents(it, base):
        docs[split].append(text)
    counts = {s: len(docs[s]) for s in SPLITS}
    nbytes = {s: sum(len(t.encode("utf-8")) for t in docs[s]) for s in SPLITS}
    for s in SPLITS:
        # a fixed shuffle: neighbouring batches should not all come from one package
        random.Random(SHUFFLE_SEED).shuffle(docs[s])
        with open(tmp / f"{s}.jsonl", "w", encoding="utf-8") as f:
            for text in docs[s]:
                f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    if counts["train"] == 0 or counts["validation"] == 0:
        raise RuntimeError(f"corpus from {base} has an empty split: {counts}")
    for s in SPLITS:
        os.replace(tmp / f"{s}.jsonl", out_dir / f"{s}.jsonl")
    tmp.rmdir()
    manifest = {
        "version": CORPUS_VERSION, "source": str(base), "python": sys.version.split()[0],
        "files": len(files), "documents": counts, "bytes": nbytes,
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return manifest


def _complete(out: Path) -> bool:
    return (out / "manifest.json").exists() and all((out / f"{s}.jsonl").exists() for s in SPLITS)


def ensure_stdlib_corpus(root: Path | None = None, progress: bool = True,
                         source: Path | None = None) -> Path:
    """The cached stdlib corpus directory, gathered first if it is not there yet.

    ``source`` replaces the standard library directory (tests use a small generated tree).
    """
    out = stdlib_corpus_dir(root)
    if _complete(out):
        return out
    with build_lock(out):
        if _complete(out):
            return out
        if (out / "manifest.json").exists():  # a split file was removed since: build it again
            missing = [f"{s}.jsonl" for s in SPLITS if not (out / f"{s}.jsonl").exists()]
            logger.warning(f"nsa_flex: the corpus cache {out} lacks {', '.join(missing)}; "
                           f"building it again")
            (out / "manifest.json").unlink()
        base = Path(source or sysconfig.get_paths()["stdlib"])
        files = stdlib_sources(base)
        logger.info(f"nsa_flex: building the embedded corpus from {len(files)} standard-library "
                    f"files under {base} into {out} (once; later runs reuse it)")
        m = build_corpus(out, files, base, progress=progress)
        logger.info(f"nsa_flex: corpus ready: {m['documents']['train']} train / "
                    f"{m['documents']['validation']} validation documents, "
                    f"{sum(m['bytes'].values()) / 1e6:.1f} MB")
    return out


def iter_texts(corpus_dir: Path, split: str = "train") -> Iterator[str]:
    with open(Path(corpus_dir) / f"{split}.jsonl", encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)["text"]
