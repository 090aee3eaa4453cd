"""Cached decoding (nsa_flex/decode.py) against the full-sequence forward.

Random debug-sized models in float32 on CPU, with random gate weights (not the zero init) so that
all three branches matter, and small l, d, l', n, w so that ~100 tokens cross many compression-
block, selection-block and window boundaries. Ragged batches of prompts are prefilled and then
decoded one token per step; at every step each sequence's logits must equal the full forward's
logits at that position to REL_TOL (max |Δ| over the vocabulary / max |logit|), and the selected
blocks of every layer and KV head must be the same sets as the operator's (return_indices).
"""

import functools

import pytest
import torch

pytest.importorskip("torchtitan")

from nsa_flex.config import NSAConfig  # noqa: E402
from nsa_flex.decode import CacheCapacityError, NSADecoder, decode_step  # noqa: E402
from nsa_flex.generate import sample  # noqa: E402
from nsa_flex.model import NSAModelArgs, NSATransformer  # noqa: E402

REL_TOL = 1e-5    # float32; measured at most 5e-7 on CPU
STATE_TOL = 1e-6  # prefilled cache vs the cache of stepping token by token (absolute)
VOCAB = 97

CFG_A = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=8, sel_topn=3, n_init=1, n_local=1, window=12)
CFG_B = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_topn=4, n_init=1, n_local=2, window=9)


pytestmark = pytest.mark.usefixtures("one_thread")   # tests/conftest.py


def make_model(kv_mode="separate", n_heads=4, n_kv_heads=2, nsa=CFG_A, seed=0, **kw) -> NSATransformer:
    args = NSAModelArgs(dim=64, n_layers=2, n_heads=n_heads, n_kv_heads=n_kv_heads,
                        vocab_size=VOCAB, multiple_of=16, cmp_hidden=32, max_seq_len=128,
                        kv_mode=kv_mode, nsa=nsa, **kw)
    torch.manual_seed(seed)
    model = NSATransformer(args)
    with torch.no_grad():
        model.init_weights()
        for block in model.layers.values():   # every branch weighs in, differently per head
            block.attention.gate.weight.normal_(std=0.3)
            block.attention.gate.bias.normal_()
    return model.eval()


def full_forward(model, tokens):
    """Logits [T, V] and each layer's selection [T, Hkv, n] of one sequence, full forward."""
    for block in model.layers.values():
        block.attention.record_selection = True
    with torch.no_grad():
        logits = model(tokens[None])[0]
    sel = [block.attention.last_selection[0] for block in model.layers.values()]
    for block in model.layers.values():
        block.attention.record_selection = False
    return logits, sel


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def same_sets(a, b) -> bool:
    return sorted(a.tolist()) == sorted(b.tolist())


CASES = [   # kv_mode, Hq, Hkv (G = Hq / Hkv), NSA config, extra model args
    ("separate", 4, 2, CFG_A, {}),
    ("shared", 2, 2, CFG_A, {}),
    ("separate", 2, 2, CFG_B, {}),
    ("shared", 4, 1, CFG_B, {"head_dim": 16, "v_head_dim": 12}),
]


@pytest.mark.parametrize("kv_mode,hq,hkv,nsa,extra", CASES,
                         ids=["separate-G2", "shared-G1", "separate-G1-l=l'", "shared-G4-Dv12"])
def test_cached_decoding_equals_full_forward(kv_mode, hq, hkv, nsa, extra):
    model = make_model(kv_mode, hq, hkv, nsa, **extra)
    lengths = [1, 13, 30]                 # ragged: one token, < l' ... past the window
    steps = 70                            # sequence 2 ends at position 99
    total = max(lengths) + steps
    torch.manual_seed(1)
    tokens = torch.randint(0, VOCAB, (len(lengths), total))
    ref = [full_forward(model, tokens[b, :lengths[b] + steps]) for b in range(len(lengths))]

    dec = NSADecoder(model, len(lengths), capacity=total)
    logits = dec.prefill(tokens[:, :max(lengths)], lengths)
    worst = max(rel_err(logits[b], ref[b][0][lengths[b] - 1]) for b in range(len(lengths)))
    chosen = set()
    for k in range(steps):
        pos = [n + k for n in lengths]
        assert dec.cache.pos.tolist() == pos
        logits, sel = decode_step(model, dec.cache, tokens[torch.arange(len(lengths)), pos],
                                  return_indices=True)
        for b, t in enumerate(pos):
            worst = max(worst, rel_err(logits[b], ref[b][0][t]))
            for layer, idx in enumerate(sel):
                for h in range(hkv):
                    assert same_sets(idx[b, h], ref[b][1][layer][t, h]), (b, t, layer, h)
                    chosen.add(tuple(sorted(idx[b, h].tolist())))
    assert worst <= REL_TOL, worst
    assert len(chosen) > 10   # the selection really varies along the run


@pytest.mark.parametrize("kv_mode", ["separate", "shared"])
def test_prefill_leaves_the_state_of_stepping_from_scratch(kv_mode):
    model = make_model(kv_mode)
    lengths = [3, 17, 26]
    torch.manual_seed(2)
    tokens = torch.randint(0, VOCAB, (3, 26))
    pre = NSADecoder(model, 3, capacity=40)
    pre.prefill(tokens, lengths)
    for b, n in enumerate(lengths):
        one = NSADecoder(model, 1, capacity=40)
        for t in range(n):
            decode_step(model, one.cache, tokens[b:b + 1, t])
        for (name, x), (_, y) in zip(pre.cache.named_buffers(), one.cache.named_buffers()):
            assert torch.equal(x[b:b + 1] == 0, y == 0), (b, name)   # the same entries written
            torch.testing.assert_close(x[b:b + 1], y, rtol=0, atol=STATE_TOL, msg=f"{b} {name}")


def test_a_cache_shorter_than_one_compression_block():
    model = make_model(nsa=CFG_B)            # l = 8: no compressed block ever completes
    tokens = torch.randint(0, VOCAB, (1, 7))
    ref, _ = full_forward(model, tokens[0])
    dec = NSADecoder(model, 1, capacity=7)
    assert dec.cache.layers[0].k_cmp.shape[2] == 0
    logits = [dec.prefill(tokens[:, :2], [2])[0]]
    logits += [dec.step(tokens[:, t])[0] for t in range(2, 7)]
    assert max(rel_err(a, ref[t + 1]) for t, a in enumerate(logits)) <= REL_TOL


def test_the_step_compiles_whole_without_host_syncs():
    """fullgraph=True fails on a graph break: .item(), data-dependent Python control flow."""
    model = make_model("separate")
    tokens = torch.randint(0, VOCAB, (2, 40))
    eager, comp = NSADecoder(model, 2, 48), NSADecoder(model, 2, 48)
    step = torch.compile(functools.partial(decode_step, model, comp.cache), fullgraph=True,
                         dynamic=False, backend="aot_eager")
    for d in (eager, comp):
        d.prefill(tokens[:, :9], [9, 4])
    for t in range(9, 14):
        torch.testing.assert_close(step(tokens[:, t]), eager.step(tokens[:, t]), rtol=0, atol=1e-6)
    assert comp.cache.pos.tolist() == eager.cache.pos.tolist() == [14, 9]
    for (name, x), (_, y) in zip(eager.cache.named_buffers(), comp.cache.named_buffers()):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6, msg=name)


def test_requests_beyond_the_capacity_stop_before_compute():
    model = make_model()
    dec = NSADecoder(model, 2, capacity=32)
    with pytest.raises(CacheCapacityError, match=r"longest prompt \(30 tokens\) \+ 5 new tokens = 35 "
                       r"positions exceed the cache capacity of 32.*>= 35.*at most 2"):
        dec.check_request([30, 4], 5)
    dec.check_request([30, 4], 2)
    with pytest.raises(CacheCapacityError, match="padded to 40 tokens exceed the cache capacity 32"):
        dec.prefill(torch.zeros(2, 40, dtype=torch.long), [40, 3])
    with pytest.raises(CacheCapacityError, match=r"prompt lengths \[0\]"):
        dec.prefill(torch.zeros(2, 8, dtype=torch.long), [8, 0])
    with pytest.raises(CacheCapacityError, match="exceeds the model's RoPE table of 128 positions; "
                       "build the model with max_seq_len >= 200"):
        NSADecoder(model, 1, capacity=200)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 0.0, 0.0, 4.9]])
    gen = torch.Generator().manual_seed(0)
    assert sample(logits, 0.0, 0, 1.0, gen).tolist() == [1, 0]            # greedy
    assert sample(logits, 1.0, 1, 1.0, gen).tolist() == [1, 0]            # top-k 1
    assert sample(logits, 1.0, 0, 0.01, gen).tolist() == [1, 0]           # tiny nucleus
    draws = torch.stack([sample(logits, 2.0, 2, 1.0, gen) for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 3} and set(draws[:, 1].tolist()) == {0, 3}
    again = torch.Generator().manual_seed(5)
    first = [sample(logits, 1.0, 0, 0.9, again).tolist() for _ in range(5)]
    again.manual_seed(5)
    assert first == [sample(logits, 1.0, 0, 0.9, again).tolist() for _ in range(5)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("mode", [None, "reduce-overhead"])
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_the_compiled_step_on_cuda_matches_the_forward(mode, kernel):
    """Inductor (and with reduce-overhead a CUDA graph) against the forward, float32 on CUDA
    (reductions in other orders than on CPU: 1e-4), with either attention over the cache."""
    from nsa_flex.kernels import KernelConfig

    model = make_model("separate").cuda()
    for block in model.layers.values():
        block.attention.kernel = KernelConfig("dense")
    lengths, steps = [5, 20], 40
    tokens = torch.randint(0, VOCAB, (2, max(lengths) + steps), device="cuda")
    ref = [full_forward(model, tokens[b, :lengths[b] + steps])[0] for b in range(2)]
    dec = NSADecoder(model, 2, capacity=64, compile=True, mode=mode, kernel=kernel)
    logits = dec.prefill(tokens[:, :max(lengths)], lengths)
    worst = max(rel_err(logits[b], ref[b][lengths[b] - 1]) for b in range(2))
    for k in range(steps):
        pos = [n + k for n in lengths]
        logits = dec.step(tokens[torch.arange(2, device="cuda"), torch.tensor(pos, device="cuda")])
        worst = max(worst, max(rel_err(logits[b], ref[b][t]) for b, t in enumerate(pos)))
    assert worst <= 1e-4, worst


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_bf16_decoding_on_cuda_follows_the_compiled_forward_without_recompiles(kernel):
    """bf16 on CUDA: the full forward through the compiled flex operator against 100 cached steps
    (CUDA graphs), ragged prompts; logits within bf16's usual tolerance, at least 90% of the
    selections the same sets (bf16 may flip near-ties), and 0 recompiles over the 100 steps."""
    model = make_model("separate").cuda()
    model._apply(lambda x: x.to(torch.bfloat16) if x.is_floating_point() else x)   # RoPE stays complex
    lengths, steps = [7, 20], 100                  # capacity 120 <= the model's 128 positions
    tokens = torch.randint(0, VOCAB, (2, max(lengths) + steps), device="cuda")
    refs = [full_forward(model, tokens[b, :lengths[b] + steps]) for b in range(2)]
    dec = NSADecoder(model, 2, capacity=max(lengths) + steps, compile=True, mode="reduce-overhead",
                     kernel=kernel)
    dec.prefill(tokens[:, :max(lengths)], lengths)
    rows = torch.arange(2, device="cuda")
    worst, same, total = 0.0, 0, 0
    for k in range(steps):
        pos = [n + k for n in lengths]
        new = tokens[rows, torch.tensor(pos, device="cuda")]
        if k % 25 == 24:   # now and then a step run eagerly, with its selections
            logits, sels = decode_step(model, dec.cache, new, return_indices=True, kernel=kernel)
            for layer, idx in enumerate(sels):
                for b, t in enumerate(pos):
                    want = refs[b][1][layer][t]
                    for h in range(idx.shape[1]):
                        total += 1
                        same += same_sets(idx[b, h][idx[b, h] >= 0].cpu(), want[h][want[h] >= 0].cpu())
        else:
            # the first two compiled steps compile and record the graph; then no recompile
            torch._dynamo.config.error_on_recompile = k >= 2
            try:
                logits = dec.step(new)
            finally:
                torch._dynamo.config.error_on_recompile = False
        worst = max(worst, max(rel_err(logits[b].float(), refs[b][0][t].float())
                               for b, t in enumerate(pos)))
    assert worst <= 3e-2, worst
    assert same >= 0.9 * total, (same, total)


def test_a_decode_kernel_that_cannot_run_is_refused(monkeypatch):
    model = make_model()
    with pytest.raises(ValueError, match=r"decode kernel 'cuda' is not one of \('torch', 'triton'\)"):
        NSADecoder(model, 1, 16, kernel="cuda")
    if not torch.cuda.is_available():
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        with pytest.raises(ValueError, match="'triton' needs a CUDA device.*kernel='torch'"):
            NSADecoder(model, 1, 16, kernel="triton")
    assert NSADecoder(model, 1, 16).kernel == ("triton" if next(model.parameters()).is_cuda else "torch")
