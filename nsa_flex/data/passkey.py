"""Passkey / needle-in-a-haystack prompts, built offline from the embedded corpus; one builder
(:func:`build_prompt`) for the evaluation (``nsa_flex.eval``) and for the training mixture
(``stdlib_passkey``).

A prompt of exactly ``length`` tokens, here with one needle (the evaluation's)::

    BOS  haystack[:a]  NEEDLE  haystack[a:]  QUESTION  ANSWER  EOS
         "\nThe secret pass key of Maria is 48213. Remember it.\n"
              "\nWhat is the secret pass key of Maria? The secret pass key of Maria is"
                                                                          " 48213."

The haystack is a stretch of H filler tokens (corpus text, or a repeated sentence block) cut
at ``round(depth · H)``, so the needle sits at the requested depth (0: right after BOS, 1: right
before the question). A training document may hold several needles (distinct names and keys,
each at its own depth) and asks for every one at the end, in a random order: one row then
trains several retrievals. The token ids are those of ``tok.encode(text, add_bos=True,
add_eos=True)`` for the prompt's ``text``: exactly what a torchtitan text dataset makes of that
text, so training rows and evaluation prompts are tokenised alike. Because byte-level BPE may
tokenise a decoded window differently from the stream it was cut from, the builder re-encodes
and adjusts H until the prompt has exactly ``length`` tokens (a few tries; it stops with an
error if it cannot).

A key is a random number of ``digits`` digits; its tokens are those of ``" " + key`` and appear
exactly twice in a prompt, in its needle and in its answer (keys that also occur elsewhere are
drawn again). The answer positions of a key are the positions whose next-token prediction is
one of its tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

NEEDLE = "\nThe secret pass key of {name} is {key}. Remember it.\n"
QUESTION = "\nWhat is the secret pass key of {name}? The secret pass key of {name} is"
ANSWER = " {key}."
# the names the keys belong to (a training document may hold several needles; the evaluation's
# prompts hold one)
NAMES = ("Alice", "Bob", "Carol", "David", "Emma", "Frank", "Grace", "Henry", "Irene", "Jack",
         "Karen", "Louis", "Maria", "Nathan", "Olga", "Peter", "Quinn", "Rosa", "Simon", "Tara",
         "Victor", "Wendy", "Xavier", "Yusuf", "Zoe", "Anton", "Bella", "Carlos", "Diana", "Elena",
         "Felix", "Hugo")
# the classic passkey haystack (Mohtashami & Jaggi, 2023), repeated
REPEAT_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. "
                 "There and back again. ")
DOC_SEPARATOR = "\n\n"   # between corpus documents in a filler stream
FIT_TRIES = 48           # re-encodings tried per prompt before the haystack start moves
SHIFT_TRIES = 16         # haystack starts tried before giving up


class PasskeyError(ValueError):
    """A prompt that cannot be built; the message says what to change."""


class KeyCollision(Exception):
    """The key's tokens also occur in the haystack: draw another key."""


# ---------------------------------------------------------------------------------------------
# filler streams


class CyclicFiller:
    """A fixed token list read cyclically: ``window(o, n)`` = ids[o], ids[o+1], ... (wrapping).
    The evaluation's haystacks (any offset, any length)."""

    def __init__(self, ids: list[int], name: str):
        if not ids:
            raise PasskeyError(f"filler {name!r} holds no tokens")
        self.ids = list(ids)
        self.name = name

    def __len__(self) -> int:
        return len(self.ids)

    def window(self, start: int, n: int) -> list[int]:
        if n <= 0:
            return []
        L = len(self.ids)
        start %= L
        out = self.ids[start:start + n]
        while len(out) < n:
            out.extend(self.ids[:n - len(out)])
        return out


class CorpusStream:
    """The documents of a corpus split as one token stream (documents joined by
    ``DOC_SEPARATOR``), encoded lazily; offsets are absolute. ``cycle``: start the split again
    when it runs out (training), else :class:`StopIteration` at its end (one pass)."""

    def __init__(self, tok, corpus_dir: Path, split: str, cycle: bool, first: int = 0,
                 last: int | None = None):
        from .corpus import iter_texts

        self._iter_texts = iter_texts
        self.tok = tok
        self.corpus_dir = Path(corpus_dir)
        self.split = split
        self.cycle = cycle
        # one pass: documents [first, last); cycling: from document first on, then all
        self.first, self.last = first, last
        self.epoch = 0
        self.sep = tok.encode(DOC_SEPARATOR)
        self.base = 0           # absolute offset of buf[0]
        self.buf: list[int] = []
        self._docs = self._texts()

    def _texts(self) -> Iterator[str]:
        first = self.first
        while True:
            n = 0
            for i, text in enumerate(self._iter_texts(self.corpus_dir, self.split)):
                if i < first:
                    continue
                if not self.cycle and self.last is not None and i >= self.last:
                    break
                n += 1
                yield text
            if n == 0 and first == 0:
                raise PasskeyError(f"corpus split {self.corpus_dir / (self.split + '.jsonl')} is empty")
            if not self.cycle:
                return
            first = 0
            self.epoch += 1

    def window(self, start: int, n: int) -> list[int]:
        if start < self.base:
            raise ValueError(f"offset {start} was released (stream starts at {self.base})")
        while start + n > self.base + len(self.buf):
            text = next(self._docs)   # StopIteration: a one-pass stream ran out
            self.buf.extend(self.tok.encode(text))
            self.buf.extend(self.sep)
        return self.buf[start - self.base:start - self.base + n]

    def release(self, upto: int) -> None:
        """Forget the tokens before absolute offset ``upto``."""
        drop = upto - self.base
        if drop > 0:
            del self.buf[:drop]
            self.base = upto


def corpus_filler(tok, split: str = "validation", corpus_dir: Path | None = None) -> CyclicFiller:
    """The whole split of the embedded corpus (or ``corpus_dir``) as a cyclic filler."""
    from .corpus import ensure_stdlib_corpus, iter_texts

    corpus = Path(corpus_dir) if corpus_dir else ensure_stdlib_corpus()
    sep = tok.encode(DOC_SEPARATOR)
    ids: list[int] = []
    for text in iter_texts(corpus, split):
        ids.extend(tok.encode(text))
        ids.extend(sep)
    return CyclicFiller(ids, f"corpus {split}")


def repeat_filler(tok, n_tokens: int = 4096) -> CyclicFiller:
    """The repeated sentence block (the classic passkey haystack) as a cyclic filler."""
    block = tok.encode(REPEAT_FILLER)
    reps = max(1, -(-n_tokens // len(block)))
    return CyclicFiller(tok.encode(REPEAT_FILLER * reps), "repeated sentences")


# ---------------------------------------------------------------------------------------------
# the prompt


@dataclass
class Needle:
    name: str
    key: str
    key_tokens: list[int]   # ids of " <key>"
    depth: float
    needle_at: int = -1     # position of the needle's first key token
    answer_at: int = -1     # position of the answer's first key token

    @property
    def answer_positions(self) -> list[int]:
        """Positions whose next-token prediction is one of this key's tokens."""
        return list(range(self.answer_at - 1, self.answer_at - 1 + len(self.key_tokens)))

    def key_blocks(self, block: int) -> tuple[int, int]:
        """Selection blocks (of ``block`` tokens) holding the needle's first and last key token."""
        return self.needle_at // block, (self.needle_at + len(self.key_tokens) - 1) // block


@dataclass
class PasskeyPrompt:
    tokens: list[int]       # exactly `length` ids: BOS, haystack + needles, questions + answers, EOS
    text: str               # the text between BOS and EOS (what a dataset encodes)
    needles: list[Needle]   # in the order they are asked for
    haystack: int           # filler tokens consumed from the stream

    # the evaluation's prompts hold one needle: its fields, directly
    @property
    def needle(self) -> Needle:
        if len(self.needles) != 1:
            raise ValueError(f"this prompt holds {len(self.needles)} needles; use .needles")
        return self.needles[0]

    key = property(lambda self: self.needle.key)
    key_tokens = property(lambda self: self.needle.key_tokens)
    depth = property(lambda self: self.needle.depth)
    needle_at = property(lambda self: self.needle.needle_at)
    answer_at = property(lambda self: self.needle.answer_at)
    answer_positions = property(lambda self: self.needle.answer_positions)
    targets = property(lambda self: list(self.needle.key_tokens))

    def key_blocks(self, block: int) -> tuple[int, int]:
        return self.needle.key_blocks(block)


def random_key(rng: random.Random, digits: int) -> str:
    if not 1 <= digits <= 18:
        raise PasskeyError(f"digits={digits}: a key has 1 to 18 digits")
    return str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits))


def qa_text(name: str, key: str) -> str:
    return QUESTION.format(name=name) + ANSWER.format(key=key)


def fixed_tokens(tok, key: str, name: str = "Alice") -> int:
    """Tokens a one-needle prompt spends outside the haystack: BOS, needle, question + answer, EOS."""
    return len(tok.encode(NEEDLE.format(name=name, key=key))) + len(tok.encode(qa_text(name, key))) + 2


def _find_all(seq: list[int], sub: list[int]) -> list[int]:
    k, first = len(sub), sub[0]
    return [i for i in range(len(seq) - k + 1) if seq[i] == first and seq[i:i + k] == sub]


def _fit(make, n0: int, lo: int, target: int):
    """The first n >= lo (from n0, stepping by the length error) with len(make(n)) == target,
    as (n, ids); None after FIT_TRIES re-encodings."""
    tried: dict[int, int] = {}
    n = max(lo, n0)
    for _ in range(FIT_TRIES):
        ids = make(n)
        m = len(ids)
        if m == target:
            return n, ids
        tried[n] = m
        nxt = max(lo, n + (target - m))
        if nxt in tried:  # oscillating: walk one token at a time towards the target
            step = 1 if m < target else -1
            nxt = n + step
            while nxt in tried:
                nxt += step
            if nxt < lo:
                return None
        n = nxt
    return None


def build_prompt(tok, length: int, needles: list[tuple[str, str, float]], filler,
                 offset: int) -> PasskeyPrompt:
    """The passkey prompt of exactly ``length`` tokens: for each (name, key, depth) of
    ``needles`` a needle at that depth (0..1) of a haystack read from ``filler``
    (:class:`CyclicFiller` or :class:`CorpusStream`) at ``offset``, and at the end a question
    and its answer for each, in the order given. Raises :class:`KeyCollision` when a key's tokens
    occur anywhere else than in its needle and its answer."""
    if not needles:
        raise PasskeyError("a passkey prompt needs at least one needle")
    for _, _, d in needles:
        if not 0.0 <= d <= 1.0:
            raise PasskeyError(f"depth={d}: must lie in [0, 1]")
    if len({n for n, _, _ in needles}) != len(needles):
        raise PasskeyError(f"needle names must differ: {[n for n, _, _ in needles]}")
    placed = sorted(range(len(needles)), key=lambda i: needles[i][2])   # haystack order
    texts = {i: NEEDLE.format(name=needles[i][0], key=needles[i][1]) for i in placed}
    tail = "".join(qa_text(n, k) for n, k, _ in needles)
    fixed = (sum(len(tok.encode(t)) for t in texts.values()) + len(tok.encode(tail)) + 2)
    H = length - fixed
    if H < 2:
        raise PasskeyError(f"length={length} is too short for this passkey prompt: its needles, "
                           f"questions and answers take {fixed} tokens; use at least {fixed + 2}")

    def assemble(start: int, n: int) -> str:
        parts, at = [], 0
        for i in placed:
            cut = int(round(needles[i][2] * n))
            parts.append(tok.decode(filler.window(start + at, cut - at)))
            parts.append(texts[i])
            at = cut
        parts.append(tok.decode(filler.window(start + at, n - at)))
        return "".join(parts) + tail

    for shift in range(SHIFT_TRIES):
        start = offset + shift
        fit = _fit(lambda n, _s=start: tok.encode(assemble(_s, n), add_bos=True, add_eos=True),
                   H, 0, length)
        if fit is None:
            continue
        n, ids = fit
        out = []
        for name, key, depth in needles:
            kt = tok.encode(" " + key)
            hits = _find_all(ids, kt)
            if len(hits) != 2:
                raise KeyCollision(key)
            out.append(Needle(name, key, kt, depth, needle_at=hits[0], answer_at=hits[1]))
        return PasskeyPrompt(tokens=ids, text=assemble(start, n), needles=out, haystack=shift + n)
    raise PasskeyError(f"could not fit a passkey prompt to exactly {length} tokens (filler "
                       f"{getattr(filler, 'name', filler)!r}, offset {offset}, needles {needles}): "
                       f"the tokenizer re-encodes decoded text too differently. Try another seed")


def draw_prompt(tok, length: int, rng: random.Random, digits: int, filler, offset: int,
                depth: float | None = None, needles: int = 1) -> PasskeyPrompt:
    """:func:`build_prompt` with ``needles`` distinct names and keys drawn from ``rng`` (keys
    drawn again on a collision) at ``depth``, or each at a uniform random depth if None; the
    questions come in a random order."""
    if not 1 <= needles <= len(NAMES):
        raise PasskeyError(f"needles={needles}: must lie in 1..{len(NAMES)}")
    names = rng.sample(NAMES, needles)
    depths = [rng.random() if depth is None else depth for _ in range(needles)]
    for _ in range(100):
        keys: list[str] = []
        while len(keys) < needles:
            k = random_key(rng, digits)
            if k not in keys:
                keys.append(k)
        try:
            return build_prompt(tok, length, list(zip(names, keys, depths)), filler, offset)
        except KeyCollision:
            continue
    raise PasskeyError(f"every set of {digits}-digit keys drawn collided with the haystack; "
                       f"use more digits")


# ---------------------------------------------------------------------------------------------
# training rows


def exact_text(tok, stream, start: int, n: int) -> tuple[str, int]:
    """(text, tokens consumed): a window of ``stream`` from ``start`` whose text encodes, with
    BOS and EOS, to exactly n + 2 tokens."""
    for shift in range(SHIFT_TRIES):
        s = start + shift

        def make(m, _s=s):
            return tok.encode(tok.decode(stream.window(_s, m)), add_bos=True, add_eos=True)

        fit = _fit(make, n, 1, n + 2)
        if fit is not None:
            return tok.decode(stream.window(s, fit[0])), shift + fit[0]
    raise PasskeyError(f"could not cut a corpus window of exactly {n} tokens at offset {start}")


def mixture_rows(tok, stream: CorpusStream, seq_len: int, share: float, seed: int,
                 digits: int, needles: int = 1) -> Iterator[dict]:
    """Training samples, each exactly one row of a packed batch: its text encodes (with BOS and
    EOS, as torchtitan's text dataset does) to seq_len + 1 tokens, so that rows stay aligned with
    samples. A share ``share`` of them (drawn per row with ``seed``) are passkey documents over
    corpus filler with 1 to ``needles`` needles (uniformly), each at a uniform random depth; the
    rest are consecutive corpus text. Ends when a one-pass stream runs out."""
    rng = random.Random(seed)
    pos = 0
    try:
        while True:
            if rng.random() < share:
                p = draw_prompt(tok, seq_len + 1, rng, digits, stream, pos,
                                needles=rng.randint(1, needles))
                pos += p.haystack
                yield {"text": p.text, "passkeys": len(p.needles)}
            else:
                text, used = exact_text(tok, stream, pos, seq_len - 1)
                pos += used
                yield {"text": text, "passkeys": 0}
            stream.release(pos)
    except StopIteration:
        return


__all__ = ["NEEDLE", "QUESTION", "ANSWER", "NAMES", "REPEAT_FILLER", "PasskeyError",
           "KeyCollision", "CyclicFiller", "CorpusStream", "corpus_filler", "repeat_filler",
           "Needle", "PasskeyPrompt", "random_key", "qa_text", "fixed_tokens", "build_prompt",
           "draw_prompt", "exact_text", "mixture_rows"]
