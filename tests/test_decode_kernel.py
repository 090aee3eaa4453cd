"""The Triton decode kernel (nsa_flex/decode_kernel.py) against the torch route of the same step
(decode._attention_step with kernel="torch", itself checked against the full forward in
test_decode.py): on a CUDA machine the kernels themselves (float32 and bfloat16), elsewhere
Triton's interpreter on the CPU (tests/triton_script.py).

Each case fills a layer's cache with random values (so that slots a query must not see hold
keys that would change its output) and runs one step for a batch of sequences at positions
chosen on the boundaries: before the first compression block completes, as it completes, at a
selection-block start, past the window, at the last slot. Outputs must agree to float32
rounding and the selected blocks must be the same sets; with ``small`` the tile sizes shrink
so that short caches walk several spans, tiles and top-n chunks."""

import textwrap

import pytest
from triton_script import run_triton_script

pytest.importorskip("triton")
pytest.importorskip("torchtitan")

SCRIPT = textwrap.dedent('''
    import os
    import torch
    from nsa_flex import decode_kernel
    from nsa_flex.config import NSAConfig
    from nsa_flex.decode import NSADecoder, _attention_step, decode_step
    from test_decode import make_model, full_forward, VOCAB

    DEV = os.environ["DECODE_KERNEL_DEVICE"]
    DEFAULT_TILES = (decode_kernel.BLOCK_ROWS, decode_kernel.MAX_SPLITS, decode_kernel.BLOCK_SEL,
                     decode_kernel.TOPN_CHUNK)

    def rel(a, b):
        return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()

    def case(kv_mode, hq, hkv, cfg, capacity, positions, seed, dtype="float32", small=False, **extra):
        tiles = (16, 2, 16, 16) if small else DEFAULT_TILES
        (decode_kernel.BLOCK_ROWS, decode_kernel.MAX_SPLITS, decode_kernel.BLOCK_SEL,
         decode_kernel.TOPN_CHUNK) = tiles
        dtype = getattr(torch, dtype)
        model = make_model(kv_mode, hq, hkv, cfg, seed=seed, **extra).to(DEV)
        model._apply(lambda x: x.to(dtype) if x.is_floating_point() else x)   # RoPE stays complex
        B = len(positions)
        dec = NSADecoder(model, B, capacity, kernel="torch")
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for buf in dec.cache.buffers():
                if buf.is_floating_point():
                    buf.copy_(torch.randn(buf.shape, generator=g))
        t = torch.tensor(positions, device=DEV)
        x = torch.randn(B, 1, model.model_args.dim, generator=g).to(DEV, dtype)
        same = total = 0
        for layer, lc in enumerate(dec.cache.layers):
            attn = model.layers[str(layer)].attention
            before = {n: b.clone() for n, b in lc.named_buffers()}
            with torch.no_grad():
                want, want_idx = _attention_step(attn, lc, x, t, model.freqs_cis, True, "torch")
                after = {n: b.clone() for n, b in lc.named_buffers()}
                for n, b in lc.named_buffers():
                    b.copy_(before[n])
                got, idx = _attention_step(attn, lc, x, t, model.freqs_cis, True, "triton")
            assert got.shape == want.shape and got.dtype == want.dtype, (got.shape, want.shape)
            assert idx.shape == want_idx.shape and idx.dtype == torch.int32
            for n, b in lc.named_buffers():   # the same cache update; φ's kernel to rounding
                if n in ("k_cmp", "v_cmp"):
                    tol = 1e-5 if dtype == torch.float32 else 1e-2
                    torch.testing.assert_close(b, after[n], rtol=tol, atol=tol, msg=n)
                    assert torch.equal(b == before[n], after[n] == before[n]), n   # the same slots
                else:
                    assert torch.equal(b, after[n]), n
            err = rel(got, want)
            assert err <= (1e-5 if dtype == torch.float32 else 2e-2), (layer, err)
            for b in range(B):
                for h in range(hkv):
                    total += 1
                    same += sorted(idx[b, h].tolist()) == sorted(want_idx[b, h].tolist())
        # float32: every selection; 16-bit scores may flip a near-tie
        assert same == total if dtype == torch.float32 else same >= 0.9 * total, (same, total)

    A = NSAConfig(cmp_block=4, cmp_stride=2, sel_block=8, sel_topn=3, n_init=1, n_local=1, window=12)
    B_ = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=8, sel_topn=4, n_init=1, n_local=2, window=9)
    EQ = NSAConfig(cmp_block=4, cmp_stride=4, sel_block=4, sel_topn=5, n_init=0, n_local=0, window=40)
    WIDE = NSAConfig(cmp_block=8, cmp_stride=4, sel_block=16, sel_topn=3, n_init=2, n_local=1, window=200)

''')

CASES = [
    # the defaults' tiles; G = 2; positions across l − 1 = 3, l' = 8, the window 12, the last slot
    'case("separate", 4, 2, A, 128, [0, 2, 3, 4, 8, 12, 13, 77, 127], 0)',
    # shared keys, G = 4, Dk 16 != Dv 12
    'case("shared", 4, 1, B_, 100, [0, 6, 7, 8, 11, 15, 16, 99], 1, head_dim=16, v_head_dim=12)',
    # l = d = l', nothing forced, G = 3, Dk = 8; small tiles: 2 spans of several tiles, top-n chunks
    'case("separate", 6, 2, EQ, 128, [0, 3, 4, 39, 40, 41, 100, 127], 2, small=True, head_dim=8)',
    # a window longer than the cache, two initial blocks forced, G = 1
    'case("shared", 2, 2, WIDE, 90, [0, 7, 8, 15, 16, 50, 89], 3, small=True)',
    'case("separate", 2, 2, WIDE, 90, [1, 30, 64, 89], 4)',
    # a cache shorter than one compression block: no compressed block at all
    'case("separate", 4, 2, B_, 7, [0, 3, 6], 5)',
]

MODEL = '''
# the whole model: cached decoding with the kernel against the full forward (ragged prompts)
decode_kernel.BLOCK_ROWS, decode_kernel.MAX_SPLITS, decode_kernel.BLOCK_SEL, decode_kernel.TOPN_CHUNK = DEFAULT_TILES
model = make_model("separate", 4, 2, A).to(DEV)
lengths, steps = [1, 11], 16
torch.manual_seed(1)
tokens = torch.randint(0, VOCAB, (2, max(lengths) + steps), device=DEV)
ref = [full_forward(model, tokens[b, :lengths[b] + steps]) for b in range(2)]
dec = NSADecoder(model, 2, capacity=max(lengths) + steps, kernel="triton")
dec.prefill(tokens[:, :max(lengths)], lengths)
for k in range(steps):
    pos = [n + k for n in lengths]
    logits, sel = decode_step(model, dec.cache, tokens[torch.arange(2), pos], True, "triton")
    for b, t in enumerate(pos):
        assert rel(logits[b], ref[b][0][t]) <= 1e-4, (b, t)
        for layer, idx in enumerate(sel):
            for h in range(2):
                assert sorted(idx[b, h].tolist()) == sorted(ref[b][1][layer][t, h].tolist()), (b, t, layer, h)
'''


@pytest.mark.parametrize("call", CASES, ids=[f"case{i}" for i in range(len(CASES))])
def test_decode_kernel_matches_the_torch_step(call):
    run_triton_script(SCRIPT + call + "\nprint('ok')\n", "DECODE_KERNEL_DEVICE")


@pytest.mark.parametrize("call", CASES[:3], ids=[f"case{i}" for i in range(3)])
def test_decode_kernel_in_bfloat16_on_cuda(call):
    import torch
    if not torch.cuda.is_available():
        pytest.skip("bfloat16 kernels: CUDA (the interpreter runs float32)")
    run_triton_script(SCRIPT + call[:-1] + ', dtype="bfloat16")' + "\nprint('ok')\n", "DECODE_KERNEL_DEVICE")


def test_cached_decoding_with_the_kernel_equals_the_full_forward():
    run_triton_script(SCRIPT + MODEL + "\nprint('ok')\n", "DECODE_KERNEL_DEVICE")
