"""The retrieval evaluation (nsa_flex.eval), the passkey prompt builder and the passkey training
mixture (nsa_flex.data.passkey, ``stdlib_passkey``), and the sliding-window control
(nsa_flex.window_only), on CPU at short lengths.

Scoring against a model that copies (every key retrieved) and one with random logits (chance,
with a binomial bound); selection recall against a stub whose selections are known; prompts at
their depth, of their exact length, reproducible and offline; the mixture's rows aligned,
seeded and at their share; the window-only model deaf to the other two branches; the command
line end to end on a random debug model, and on llama3_dense / nsa_window checkpoints; the
comparison's config and tool.
"""

import json
import math
import os
import re
import socket
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

pytest.importorskip("torchtitan")
pytest.importorskip("matplotlib")

from nsa_flex.data.passkey import (NEEDLE, PasskeyError, build_prompt, corpus_filler,  # noqa: E402
                                   fixed_tokens, qa_text, repeat_filler)
from nsa_flex.eval import retrieval as R  # noqa: E402
from nsa_flex.eval.cli import main as eval_main  # noqa: E402
from nsa_flex.eval.cli import run as eval_run  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
SEL_BLOCK = 64   # the paper's selection block: "at the requested depth" means within one


@pytest.fixture(scope="module")
def tok():
    from nsa_flex.data.tokenizer import load_tokenizer

    return load_tokenizer("embedded")


@pytest.fixture(scope="module")
def filler(tok):
    return corpus_filler(tok, "validation")


# ---------------------------------------------------------------------------------------------
# stub models


class Oracle(nn.Module):
    """Logits that put the next token of the prompt first everywhere (it has read the answer)."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab = vocab

    def forward(self, tokens):
        logits = torch.zeros(*tokens.shape, self.vocab)
        logits[:, :-1].scatter_(-1, tokens[:, 1:, None], 1.0)
        return logits


class RandomLogits(nn.Module):
    def __init__(self, vocab: int, seed: int = 0):
        super().__init__()
        self.vocab = vocab
        self.g = torch.Generator().manual_seed(seed)

    def forward(self, tokens):
        return torch.randn(*tokens.shape, self.vocab, generator=self.g)


class RecordingLayer(nn.Module):
    """Looks like NSAAttention to the evaluation: records a selection it is told."""

    def __init__(self, sel_block: int):
        super().__init__()
        self.record_selection = False
        self.last_selection = None
        self.nsa_config = SimpleNamespace(sel_block=sel_block)


class SelectionStub(nn.Module):
    """An oracle whose layers record the selections ``choose(layer, tokens)`` returns."""

    def __init__(self, vocab: int, choose, layers: int = 2, sel_block: int = 32):
        super().__init__()
        self.oracle = Oracle(vocab)
        self.layers = nn.ModuleList(RecordingLayer(sel_block) for _ in range(layers))
        self.choose = choose

    def forward(self, tokens):
        for i, layer in enumerate(self.layers):
            if layer.record_selection:
                layer.last_selection = self.choose(i, tokens).to(torch.int32)
        return self.oracle(tokens)


def _evaluate(model, tok, **kw):
    args = dict(tasks=["needle"], lengths=[128, 192], depths=[0.0, 0.5, 1.0], samples=4, seed=0,
                digits=5, batch_tokens=1024, device=torch.device("cpu"), record_selection=False)
    args.update(kw)
    return R.evaluate(model, tok, **args)["cells"]


# ---------------------------------------------------------------------------------------------
# scoring


def test_a_copying_model_retrieves_every_key(tok):
    cells = _evaluate(Oracle(tok.get_vocab_size()), tok, tasks=["needle", "passkey"])
    assert len(cells) == 2 * 2 * 3
    for c in cells:
        assert c["accuracy"] == 1.0 and c["token_accuracy"] == 1.0 and c["n"] == 4, c
        assert c["selection_recall"] is None


def test_random_logits_score_at_chance(tok, filler):
    V = tok.get_vocab_size()
    model = RandomLogits(V)
    prompts = [p for _, _, p in R.grid_prompts(tok, "needle", 128, [0.0, 0.25, 0.5, 0.75, 1.0],
                                                12, 0, 5, filler)]
    results = []
    for i in range(0, len(prompts), 10):
        results += R.run_batch(model, prompts[i:i + 10], torch.device("cpu"), [])
    n_tokens = sum(r.key_tokens for r in results)
    hits = sum(r.token_hits for r in results)
    # chance is 1/V per token: the smallest k with P(Binomial(n_tokens, 1/V) >= k) < 1e-6
    p, tail, k = 1.0 / V, 1.0, 0
    while tail >= 1e-6:
        tail -= math.comb(n_tokens, k) * p ** k * (1 - p) ** (n_tokens - k)
        k += 1
    assert len(results) == 60 and n_tokens >= 180 and hits < k, (hits, k)
    # a whole key by chance has probability ~ 60 / V^3
    assert not any(r.retrieved for r in results)


def test_score_needs_every_key_token_and_ignores_padding():
    V = 10
    logits = torch.zeros(2, 3, V)
    targets = torch.tensor([[1, 2, 3], [4, 5, -1]])
    mask = targets >= 0
    for b, row in enumerate(targets.tolist()):
        for k, t in enumerate(row):
            if t >= 0:
                logits[b, k, t] = 1.0
    ok, correct = R.score(logits, targets, mask)
    assert ok.tolist() == [True, True] and correct.sum().item() == 5
    logits[0, 2] = 0.0
    logits[0, 2, 7] = 1.0                 # one wrong token of three: the key is not retrieved
    ok, correct = R.score(logits, targets, mask)
    assert ok.tolist() == [False, True] and correct[0].tolist() == [True, True, False]


def test_wilson_interval():
    lo, hi = R.wilson(10, 10)
    assert hi == 1.0 and 0.6 < lo < 0.75
    lo, hi = R.wilson(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2


# ---------------------------------------------------------------------------------------------
# selection recall


def test_selection_recall_of_known_selections(tok, filler):
    prompts = [p for _, _, p in R.grid_prompts(tok, "needle", 256, [0.0, 0.5], 3, 0, 5, filler)]
    sel_block = 32
    key_block = torch.tensor([p.key_blocks(sel_block)[0] for p in prompts])
    far = (key_block + 3) % (256 // sel_block)

    def choose(layer, tokens):
        B, T = tokens.shape
        sel = torch.full((B, T, 2, 4), -1)
        # layer 0: KV head 0 selects the key's block, head 1 a block far from it -> recall 1/2
        # layer 1: both heads select the key's block among others -> recall 1
        sel[:, :, 0, 0] = key_block[:, None]
        sel[:, :, 1, 0] = far[:, None]
        if layer == 1:
            sel[:, :, 1, 2] = key_block[:, None]
        return sel

    stub = SelectionStub(tok.get_vocab_size(), choose, layers=2, sel_block=sel_block)
    modules = R.selection_modules(stub)
    assert len(modules) == 2
    results = R.run_batch(stub, prompts, torch.device("cpu"), modules)
    for r in results:
        assert r.retrieved and r.recall == [0.5, 1.0]
    assert all(not m.record_selection and m.last_selection is None for m in modules)
    c = R.cell("needle", 256, 0.0, results)
    assert c["selection_recall"] == 0.75 and c["selection_recall_by_layer"] == [0.5, 1.0]


def test_selection_hits_counts_either_key_block_and_no_padding():
    # one prompt, 3 answer positions (the last one padding), 2 KV heads, n = 3
    sel = torch.full((1, 8, 2, 3), -1, dtype=torch.int32)
    sel[0, 5, 0] = torch.tensor([0, 4, 7])        # holds the second key block (4)
    sel[0, 5, 1] = torch.tensor([0, 2, -1])       # holds neither
    sel[0, 6, :] = torch.tensor([3, -1, -1])      # both heads hold the first key block (3)
    sel[0, 7, :] = torch.tensor([3, 4, 5])        # padding position: not counted
    pos = torch.tensor([[5, 6, 7]])
    mask = torch.tensor([[True, True, False]])
    rec = R.selection_hits(sel, pos, mask, torch.tensor([[3, 4]]))
    assert rec.tolist() == [0.75]
    # -1 (unused) never matches, even against a key block of -1
    rec = R.selection_hits(sel, pos, mask, torch.tensor([[9, 9]]))
    assert rec.tolist() == [0.0]


# ---------------------------------------------------------------------------------------------
# the prompt builder


def one(tok, length, depth, key, filler, offset=1234, name="Maria"):
    return build_prompt(tok, length, [(name, key, depth)], filler, offset)


@pytest.mark.parametrize("length", [97, 256, 1000])
def test_prompt_exact_length_and_depth(tok, filler, length):
    key = "48213"
    H = length - fixed_tokens(tok, key, "Maria")
    for depth in (0.0, 0.1, 0.25, 0.5, 0.75, 0.9, 1.0):
        p = one(tok, length, depth, key, filler)
        assert len(p.tokens) == length
        assert p.tokens[0] == tok.bos_id and p.tokens[-1] == tok.eos_id
        assert tok.encode(p.text, add_bos=True, add_eos=True) == p.tokens   # as a dataset reads it
        # the needle's key sits at the requested depth of the haystack, within one selection block
        needle_key_offset = len(tok.encode(NEEDLE.split("{key}")[0].format(name="Maria")))
        assert abs(p.needle_at - (1 + depth * H + needle_key_offset)) <= SEL_BLOCK, (depth, p.needle_at)
        # the key twice: in the needle and as the answer, right before ". EOS"
        k = len(p.key_tokens)
        assert p.tokens[p.needle_at:p.needle_at + k] == p.key_tokens == tok.encode(" " + key)
        assert p.tokens[p.answer_at:p.answer_at + k] == p.key_tokens
        assert p.answer_at + k == length - 2
        assert tok.decode(p.tokens[p.answer_at - 6:p.answer_at + k]).endswith(f" of Maria is {key}")
        assert p.answer_positions == list(range(p.answer_at - 1, p.answer_at + k - 1))
        assert NEEDLE.format(name="Maria", key=key) in p.text
        assert p.text.endswith(qa_text("Maria", key))
    depths = [one(tok, length, d, key, filler).needle_at for d in (0, 0.5, 1)]
    assert depths == sorted(depths) and depths[0] < 16 and depths[2] > length - 64


def test_prompt_with_several_needles(tok, filler):
    needles = [("Bob", "11111", 0.8), ("Zoe", "52525", 0.1), ("Hugo", "90817", 0.45)]
    p = build_prompt(tok, 600, needles, filler, 99)
    assert len(p.tokens) == 600 and [n.name for n in p.needles] == ["Bob", "Zoe", "Hugo"]
    # needles in the haystack by depth, answers at the end in the order given
    at = {n.name: n.needle_at for n in p.needles}
    assert at["Zoe"] < at["Hugo"] < at["Bob"]
    answers = [n.answer_at for n in p.needles]
    assert answers == sorted(answers) and answers[0] > at["Bob"]
    for n in p.needles:
        k = len(n.key_tokens)
        assert p.tokens[n.needle_at:n.needle_at + k] == p.tokens[n.answer_at:n.answer_at + k]
    assert p.text.endswith("".join(qa_text(n, k) for n, k, _ in needles))
    with pytest.raises(ValueError, match="holds 3 needles"):
        p.key_tokens


def test_prompts_reproducible_seeded_and_offline(tok, monkeypatch):
    def no_network(*a, **k):
        raise AssertionError("the prompt builder tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    f1 = R.make_filler(tok, "needle")
    a = R.grid_prompts(tok, "needle", 300, [0.0, 0.5, 1.0], 4, seed=7, digits=6, filler=f1)
    b = R.grid_prompts(tok, "needle", 300, [0.0, 0.5, 1.0], 4, seed=7, digits=6,
                       filler=R.make_filler(tok, "needle"))
    c = R.grid_prompts(tok, "needle", 300, [0.0, 0.5, 1.0], 4, seed=8, digits=6, filler=f1)
    assert [p.tokens for _, _, p in a] == [p.tokens for _, _, p in b]
    assert [p.key for _, _, p in a] != [p.key for _, _, p in c]
    assert all(len(p.key) == 6 for _, _, p in a)
    # sample i has one name and key at every depth
    for i in range(4):
        assert len({(p.needle.name, p.key) for _, s, p in a if s == i}) == 1
    # the repeated-sentence haystack of the passkey task
    p = one(tok, 200, 0.5, "12345", repeat_filler(tok), 0)
    assert len(p.tokens) == 200 and "The grass is green." in p.text


def test_prompt_errors_are_clear(tok, filler):
    with pytest.raises(PasskeyError, match="too short for this passkey prompt.*use at least"):
        one(tok, 20, 0.5, "12345", filler)
    with pytest.raises(PasskeyError, match=r"depth=1.5: must lie in \[0, 1\]"):
        one(tok, 200, 1.5, "12345", filler)
    with pytest.raises(PasskeyError, match="names must differ"):
        build_prompt(tok, 300, [("Bob", "11111", 0.2), ("Bob", "22222", 0.5)], filler, 0)


# ---------------------------------------------------------------------------------------------
# the training mixture


def _rows(tok, path: str, seq_len: int, n: int):
    from torchtitan.hf_datasets.text_datasets import HuggingFaceTextDataset

    from nsa_flex.data.datasets import register_datasets

    register_datasets()
    ds = HuggingFaceTextDataset("stdlib_passkey", path, tok, seq_len=seq_len)
    out = []
    for _, (x, y) in zip(range(n), ds):
        out.append(torch.cat([x["input"], y[-1:]]).tolist())
    return out


QA = re.compile(r"\nWhat is the secret pass key of (\w+)\? The secret pass key of \1 is (\d+)\.")


def test_mixture_rows_hold_keys_and_answers_seeded_at_their_share(tok):
    seq_len, share = 512, 0.3
    path = f"embedded?share={share}&seq_len={seq_len}&seed=1&shards=2&needles=3"
    rows = _rows(tok, path, seq_len, 240)
    passkey, counts = 0, set()
    for ids in rows:
        # every sample is exactly one row: BOS first, EOS last (rows stay aligned with documents)
        assert len(ids) == seq_len + 1 and ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        text = tok.decode(ids[1:-1])
        qas = QA.findall(text)
        if qas:
            passkey += 1
            counts.add(len(qas))
            tail = "".join(qa_text(n, k) for n, k in qas)
            assert text.endswith(tail)     # the questions and answers end the document
            for name, key in qas:
                assert len(key) == 5 and NEEDLE.format(name=name, key=key) in text[:-len(tail)]
            k = tok.encode(" " + qas[-1][1])
            assert ids[-2 - len(k):-2] == k   # the last answer's key right before ". EOS"
    assert counts == {1, 2, 3}
    # Binomial(240, 0.3): sd 0.03; 0.1 is more than three of them
    assert abs(passkey / len(rows) - share) < 0.1, passkey
    assert _rows(tok, path, seq_len, 30) == rows[:30]
    assert _rows(tok, path.replace("seed=1", "seed=2"), seq_len, 30) != rows[:30]


def test_mixture_options_are_checked():
    from nsa_flex.data.datasets import parse_passkey_path

    corpus, opts = parse_passkey_path("embedded?share=0.5&seq_len=4096")
    assert corpus == "embedded" and opts["share"] == 0.5 and opts["seq_len"] == 4096
    assert parse_passkey_path("")[1]["share"] == 0.25
    for path, message in [("embedded?foo=1", "unknown passkey option 'foo'"),
                          ("embedded?share=1.5", r"share=1.5 must lie in \[0, 1\]"),
                          ("embedded?seq_len=x", "seq_len='x' is not a int"),
                          ("embedded?share", "must be key=value pairs"),
                          ("embedded?needles=0", "needles=0 must lie in 1..32"),
                          ("embedded?needles=4&seq_len=256", "use needles <= 1")]:
        with pytest.raises(ValueError, match=message):
            parse_passkey_path(path)


# ---------------------------------------------------------------------------------------------
# the sliding-window control


def test_window_only_model_ignores_the_other_branches():
    from nsa_flex.checkpoint import build_named_model, named_model_args

    torch.manual_seed(0)
    tokens = torch.randint(0, 300, (1, 160))
    cpu = torch.device("cpu")
    outs = {}
    for name in ("nsa", "nsa_window"):
        args = named_model_args(name, "debug", {}, 160, vocab_size=300)
        model = build_named_model(name, args, cpu, torch.float32, seed=3)
        with torch.no_grad():
            before = model(tokens)
            for layer in model.layers.values():   # the compressed and selected branches' inputs
                for lin in (layer.attention.wk, layer.attention.wv, layer.attention.wk_cmp,
                            layer.attention.wv_cmp):
                    lin.weight.normal_()
            outs[name] = (before, model(tokens))
        gate = model.layers["0"].attention.gate
        gates = torch.sigmoid(gate(torch.randn(2, 5, 128)).view(2, 5, -1, 3))
    assert not torch.allclose(*outs["nsa"])
    torch.testing.assert_close(*outs["nsa_window"])
    assert (gates[..., :2] == 0).all() and (gates[..., 2] > 0).all()


# ---------------------------------------------------------------------------------------------
# the command line and checkpoints


def test_cli_writes_json_and_png_on_a_random_debug_model(tmp_path):
    out = tmp_path / "ev"
    proc = subprocess.run([sys.executable, "-m", "nsa_flex.eval", "--flavor", "debug",
                           "--lengths", "128", "256", "--depths", "0", "0.5", "1", "--samples", "2",
                           "--out", str(out)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[eval] needle  length    256 depth 0.50" in proc.stderr     # progress, a line per cell
    data = json.loads((out / "retrieval.json").read_text())
    assert data["model"] == "nsa" and data["random_weights"] and not data["stopped_early"]
    assert len(data["cells"]) == 2 * 2 * 3
    for c in data["cells"]:
        assert {"task", "length", "depth", "accuracy", "n", "selection_recall"} <= set(c)
        assert c["n"] == 2 and 0.0 <= c["selection_recall"] <= 1.0
        assert len(c["selection_recall_by_layer"]) == 2
    # at 128 tokens the debug flavor selects 4 of 4 blocks: every selection holds the key
    assert all(c["selection_recall"] == 1.0 for c in data["cells"] if c["length"] == 128)
    from matplotlib.image import imread

    assert imread(out / "retrieval.png").shape[1] > 400


def test_dense_and_window_models_from_checkpoints(tmp_path):
    import warnings

    import torch.distributed.checkpoint as dcp

    from nsa_flex.checkpoint import build_named_model, checkpoint_model_keys, named_model_args

    cpu = torch.device("cpu")
    for name in ("llama3_dense", "nsa_window"):
        args = named_model_args(name, "debug", {}, 256, vocab_size=8192)
        trained = build_named_model(name, args, cpu, torch.float32, seed=5)
        ckpt = tmp_path / name / "checkpoint" / "step-7"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dcp.save(trained.state_dict(), checkpoint_id=str(ckpt))
        data = eval_run(["--model", name, "--flavor", "debug", "--checkpoint", str(tmp_path / name),
                         "--lengths", "128", "--depths", "0.5", "--samples", "1", "--tasks",
                         "passkey", "--out", str(tmp_path / f"ev-{name}")])
        assert data["step"] == 7 and not data["random_weights"] and len(data["cells"]) == 1
        assert data["cells"][0]["selection_recall"] is None
        assert "not reported" in data["selection_recall"]
        # the weights loaded are the ones saved (RoPE extended to the longest length)
        loaded = build_named_model(name, named_model_args(name, "debug", {}, 4096, vocab_size=8192),
                                   cpu, torch.float32, seed=0, checkpoint=ckpt,
                                   ckpt_layout=checkpoint_model_keys(ckpt))
        x = torch.randint(0, 8192, (1, 96))
        with torch.no_grad():
            torch.testing.assert_close(loaded(x), trained(x))


@pytest.mark.parametrize("argv, message", [
    (["--depths", "1.5"], r"--depths \[1.5\]: depths must lie in \[0, 1\]"),
    (["--lengths", "20"], "a passkey prompt needs at least"),
    (["--lengths", "8"], "--lengths=8 is shorter than the compression block"),
    (["--model", "llama3_dense", "--nsa", "window=32"], "NSA options do not apply to llama3_dense"),
    (["--flavor", "huge"], "unknown flavor 'huge'"),
    (["--checkpoint", "/nonexistent/ckpt"], "no such file or directory"),
    (["--samples", "0"], "--samples 0: must be >= 1"),
])
def test_clear_errors(argv, message, capsys, tmp_path):
    assert eval_main(argv + ["--out", str(tmp_path)]) == 2
    assert re.search(message, capsys.readouterr().err)



# ---------------------------------------------------------------------------------------------
# the comparison's config and tool


def test_quality_config_matches_its_mixture():
    from torchtitan.config.manager import ConfigManager
    from torchtitan.protocols import train_spec

    from nsa_flex.data.datasets import parse_passkey_path
    from nsa_flex.titan import register

    register()
    for name in ("nsa", "llama3_dense", "nsa_window"):
        assert train_spec.get_train_spec(name).model_args["50m"] is not None
    cfg = ConfigManager().parse_args(["--job.config_file", str(REPO / "configs/quality.toml")])
    assert cfg.training.dataset == "stdlib_passkey" and cfg.validation.enable
    _, opts = parse_passkey_path(cfg.training.dataset_path)
    # the loader cuts rows by token count: they must be the trainer's rows, by its tokenizer
    assert opts["seq_len"] == cfg.training.seq_len and opts["tokenizer"] == cfg.model.hf_assets_path
    assert opts["shards"] % max(1, cfg.training.dataloader.num_workers) == 0


def test_quality_tool_reads_logs_and_summarises(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality_tool", REPO / "tools" / "quality.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    log = tmp_path / "train.log"
    log.write_text("\n".join(
        [f"[titan] - step: {s}  loss:  {9 - s / 100:.4f}  grad_norm:  0.5  memory: 1GiB  "
         f"tps: 1{s:03d},000" for s in range(1, 41)]
        + ["[titan] - validate step: 40  loss:  7.5000  memory: 1GiB  tps: 9,000"]))
    t = tool.train_log_summary(log)
    assert t["last_step"] == 40 and t["last_loss"] == 8.6
    assert t["validation"] == [{"step": 40, "loss": 7.5}]
    assert t["tokens_per_s_median"] == statistics.median([int(f"1{s:03d}000") for s in range(21, 41)])
    cells = [{"task": "needle", "length": L, "depth": d, "accuracy": a, "selection_recall": r}
             for L, d, a, r in [(1024, 0.0, 1.0, 1.0), (1024, 1.0, 0.5, 0.5), (2048, 0.0, 0.0, None)]]
    md = tool.summary_md({"models": {"nsa": {"train_outcome": "finished", "train": t, "cells": cells}}})
    assert "| nsa | 40 (finished) | 8.6 | 7.5 |" in md
    assert "| nsa | 0.75 (recall 0.75) | 0.00 |" in md
    assert [c["step"] for c in t["curve"]] == list(range(1, 41)) and t["curve"][-1]["loss"] == 8.6
    tool.loss_plot({"steps": 40, "models": {"nsa": {"train": t}}}, tmp_path / "loss.png")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
