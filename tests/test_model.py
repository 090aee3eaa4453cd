"""The nsa model: shapes, module names, initialisation, RoPE, FLOPs, and configuration errors."""

import copy
import math

import pytest
import torch

pytest.importorskip("torchtitan")

from torchtitan.config import JobConfig  # noqa: E402

from nsa_flex.job_config import NSA  # noqa: E402
from nsa_flex.model import NSAConfigError, NSAModelArgs, NSATransformer, nsa_flavors  # noqa: E402
from nsa_flex.model.args import attended_keys_per_query, replace  # noqa: E402


def tiny_args(**kw) -> NSAModelArgs:
    """NSAModelArgs of a tiny model; NSAConfig fields may be given by name."""
    base = dict(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64, multiple_of=16,
                cmp_block=8, cmp_stride=4, sel_block=8, sel_topn=3, n_init=1, n_local=1,
                window=8, cmp_hidden=16, max_seq_len=64)
    base.update(kw)
    return replace(NSAModelArgs(), **base)


def build(args: NSAModelArgs, seed: int = 0) -> NSATransformer:
    torch.manual_seed(seed)
    model = NSATransformer(args)
    with torch.no_grad():
        model.init_weights()
    return model


def job_config(**sections) -> JobConfig:
    jc = JobConfig()
    jc.nsa = NSA()
    for section, values in sections.items():
        for k, v in values.items():
            setattr(getattr(jc, section), k, v)
    return jc


@pytest.mark.parametrize("kv_mode", ["separate", "shared"])
def test_forward_shapes_and_module_names(kv_mode):
    args = tiny_args(kv_mode=kv_mode)
    model = build(args)
    tokens = torch.randint(0, 64, (2, 40))
    out = model(tokens)
    assert out.shape == (2, 40, 64)
    assert torch.isfinite(out).all()
    names = {n for n, _ in model.named_modules()}
    for n in ["tok_embeddings", "norm", "output", "layers.0", "layers.1",
              "layers.0.attention.wq", "layers.0.attention.wk", "layers.0.attention.wv",
              "layers.0.attention.wo", "layers.0.feed_forward.w1", "layers.0.feed_forward.w2",
              "layers.0.feed_forward.w3", "layers.0.attention_norm", "layers.0.ffn_norm",
              "layers.0.attention.gate", "layers.0.attention.compress_k",
              "layers.0.attention.compress_v"]:
        assert n in names, n
    separate = {"layers.0.attention.wk_cmp", "layers.0.attention.wv_cmp",
                "layers.0.attention.wk_swa", "layers.0.attention.wv_swa"}
    assert separate <= names if kv_mode == "separate" else not (separate & names)
    assert list(model.layers.keys()) == ["0", "1"]
    assert model.freqs_cis.shape == (64, 4)  # max_seq_len x head_dim/2


def test_value_head_dim_may_differ():
    args = tiny_args(head_dim=8, v_head_dim=12)
    model = build(args)
    assert model.layers["0"].attention.wv.out_features == 2 * 12
    assert model.layers["0"].attention.wo.in_features == 4 * 12
    assert model(torch.randint(0, 64, (1, 24))).shape == (1, 24, 64)


@pytest.mark.parametrize("kv_mode", ["separate", "shared"])
def test_gradients_reach_every_branch(kv_mode):
    model = build(tiny_args(kv_mode=kv_mode))
    tokens = torch.randint(0, 64, (2, 40))
    torch.nn.functional.cross_entropy(model(tokens).flatten(0, 1), tokens.flatten()).backward()
    att = model.layers["0"].attention
    mods = [att.wq, att.wk, att.wv, att.wo, att.gate, att.compress_k.fc1, att.compress_v.fc1,
            att.compress_v.fc2]
    if kv_mode == "separate":
        mods += [att.wk_cmp, att.wv_cmp, att.wk_swa, att.wv_swa]
    for m in mods:
        assert m.weight.grad is not None and m.weight.grad.abs().sum() > 0, m


def test_init_gates_start_at_gate_init():
    for g0 in (1.0 / 3.0, 0.5, 0.9):
        model = build(tiny_args(gate_init=g0))
        att = model.layers["1"].attention
        x = torch.randn(3, 5, 32)
        gates = torch.sigmoid(att.gate(x))
        assert torch.allclose(gates, torch.full_like(gates, g0), atol=1e-6)
        assert torch.all(att.gate.weight == 0)
        assert math.isclose(att.gate.bias[0].item(), math.log(g0 / (1 - g0)), rel_tol=1e-6)


def test_init_follows_llama3_scheme():
    model = build(tiny_args(dim=256, n_heads=8, n_kv_heads=2, vocab_size=512, n_layers=2,
                            cmp_hidden=64), seed=1)
    att0, att1 = model.layers["0"].attention, model.layers["1"].attention
    assert abs(att0.wq.weight.std().item() - 0.02) < 0.002
    assert abs(att0.wk_swa.weight.std().item() - 0.02) < 0.002
    # output projections are depth-scaled: 0.02 / sqrt(2 (layer_id + 1))
    assert abs(att0.wo.weight.std().item() - 0.02 / math.sqrt(2)) < 0.0015
    assert abs(att1.wo.weight.std().item() - 0.02 / math.sqrt(4)) < 0.0015
    assert abs(model.output.weight.std().item() - 256 ** -0.5) < 0.01
    assert abs(model.tok_embeddings.weight.std().item() - 1.0) < 0.02
    assert att0.compress_k.pos_emb.abs().sum() > 0 and torch.all(att0.compress_k.fc1.bias == 0)
    assert torch.all(model.norm.weight == 1)


def test_compression_reads_keys_before_rope():
    model = build(tiny_args(kv_mode="shared"))
    att = model.layers["0"].attention
    seen = {}

    def keep(name, use_input):
        def hook(module, inp, out):
            seen[name] = inp[0] if use_input else out
        return hook

    att.compress_k.register_forward_hook(keep("k", True))
    att.wk.register_forward_hook(keep("wk", False))
    model(torch.randint(0, 64, (1, 32)))
    assert torch.equal(seen["k"], seen["wk"].view(1, 32, 2, 8))


def test_llama3_pieces_are_reused_not_copied():
    """Feed-forward, block, transformer and RoPE are torchtitan's llama3 (with the same RoPE
    arguments as the llama3_dense baseline)."""
    from torchtitan.models.llama3.model import model as llama

    from nsa_flex.model import model as nsa
    m = build(tiny_args())
    assert isinstance(m, llama.Transformer) and isinstance(m.layers["0"], llama.TransformerBlock)
    assert type(m.layers["0"].feed_forward) is llama.FeedForward
    assert nsa.apply_rotary_emb is llama.apply_rotary_emb
    want = llama.precompute_freqs_cis(8, 64, 10000.0, tiny_args().rope_scaling_args)
    assert torch.equal(m.freqs_cis, want)


def test_get_attention_masks_is_a_type_error_under_causal():
    model = build(tiny_args())
    with pytest.raises(TypeError):
        model.get_attention_masks(torch.zeros(1, 8, dtype=torch.long), tokenizer=None)


class _Tok:
    eos_id = 3


def test_block_causal_packed_batch_equals_each_document_alone():
    """Logits of a packed batch (documents ending at EOS) equal the logits of each document run
    alone: the same weights, fp32 on CPU; documents shorter than a compression block, of one
    token, and longer than the window; RoPE positions restart in each document."""
    args = tiny_args(attn_mask_type="block_causal", max_seq_len=256)
    model = build(args, seed=3)
    for m in model.modules():                       # all three branches matter
        if hasattr(m, "gate") and isinstance(m.gate, torch.nn.Linear):
            torch.nn.init.normal_(m.gate.weight, std=0.3)
    g = torch.Generator().manual_seed(0)
    rows = [[5, 1, 40, 17, 30], [60, 2, 31]]
    docs = [[torch.randint(4, 64, (L,), generator=g) for L in row] for row in rows]
    for row in docs:
        for d in row:
            d[-1] = _Tok.eos_id
    tokens = torch.stack([torch.cat(row) for row in docs])
    ids = model.get_attention_masks(tokens, _Tok())
    assert ids.shape == tokens.shape
    with torch.no_grad():
        packed = model(tokens, attention_masks=ids)
        alone = torch.stack([torch.cat([model(d[None])[0] for d in row]) for row in docs])
    assert ((packed - alone).norm() / alone.norm()).item() < 1e-5
    # without the masks the documents leak into each other
    with torch.no_grad():
        leaky = model(tokens)
    assert ((leaky - alone).norm() / alone.norm()).item() > 1e-3


def test_block_causal_needs_an_eos_token():
    class NoEos:
        eos_id = None
    model = build(tiny_args(attn_mask_type="block_causal"))
    with pytest.raises(ValueError, match="needs a tokenizer with an EOS"):
        model.get_attention_masks(torch.zeros(1, 8, dtype=torch.long), NoEos())


def test_flops_formula_hand_count():
    # dim 16, 1 layer, Hq 2, Hkv 1, Dk = Dv = 8, vocab 32, shared k/v, l=4 d=2 l'=4 n=2 w=3, φ hidden 6
    args = tiny_args(dim=16, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=32, multiple_of=16,
                     kv_mode="shared", cmp_block=4, cmp_stride=2, sel_block=4, sel_topn=2,
                     n_init=1, n_local=1, window=3, cmp_hidden=6, max_seq_len=16)
    model = NSATransformer(args)
    # parameters, by hand
    emb = 32 * 16
    attn = 16 * 16 + 16 * 8 + 16 * 8 + 16 * 16          # wq, wk, wv, wo
    gate = 16 * 6 + 6
    phi = 2 * (4 * 8 + (32 * 6 + 6) + (6 * 8 + 8))      # compress_k/v: pos_emb, fc1, fc2
    ffn = 3 * 16 * 48                                     # hidden int(2*64/3)=42 -> 48
    norms = 16 + 16 + 16
    out = 16 * 32
    total = emb + attn + gate + phi + ffn + norms + out
    assert total == 4818
    nparams, flops = args.get_nparams_and_flops(model, 16)
    assert nparams == total
    tc = 7                                                # (16 - 4) // 2 + 1
    keys = tc + 2 * 4 + 3                                 # compressed + n*l' + w
    assert attended_keys_per_query(args, 16) == {"cmp": 7, "slc": 8, "swa": 3}
    expected = 6 * (total - emb - phi) + 6 * phi * tc * 1 / 16 + 6 * 1 * 2 * (8 + 8) * keys
    assert flops == int(expected) == 27361
    # at the paper's sizes and 64k tokens a query attends to T/d + n*l' + w keys, not T
    paper = attended_keys_per_query(NSAModelArgs(), 65536)
    assert paper == {"cmp": 4095, "slc": 16 * 64, "swa": 512}
    assert sum(paper.values()) < 65536 / 10


def test_flavors():
    assert set(nsa_flavors) == {"debug", "50m", "100m", "1b"}
    assert nsa_flavors["debug"].n_layers == 2
    one_b = nsa_flavors["1b"]
    assert one_b.n_heads // one_b.kv_heads == 16
    for name, args in nsa_flavors.items():
        args.validate()
    with pytest.raises(NSAConfigError, match="unknown flavor 'huge'.*debug"):
        nsa_flavors["huge"]


def test_update_from_config_applies_nsa_section_and_seq_len():
    args = copy.deepcopy(nsa_flavors["debug"])
    jc = job_config(training=dict(seq_len=512), validation=dict(enable=True, seq_len=1024))
    jc.nsa.window = 128
    jc.nsa.kv_mode = "shared"
    jc.nsa.attn_mask_type = "block_causal"
    args.update_from_config(jc, tokenizer_vocab_size=300)
    assert (args.nsa.window, args.kv_mode, args.vocab_size, args.max_seq_len) == (128, "shared", 300, 1024)
    assert args.attn_mask_type == "block_causal" and args.attn_type == "flex"
    assert nsa_flavors["debug"].nsa.window == 64            # the flavor itself is not changed
    # an explicit vocabulary smaller than the tokenizer's is refused
    args = copy.deepcopy(nsa_flavors["debug"])
    jc.nsa.vocab_size = 100
    with pytest.raises(NSAConfigError, match="smaller than the tokenizer"):
        args.update_from_config(jc, tokenizer_vocab_size=300)


@pytest.mark.parametrize("changes, sections, message", [
    (dict(n_heads=6, n_kv_heads=4), {}, "not divisible by n_kv_heads"),
    (dict(dim=30, n_heads=4), {}, "dim=30 is not divisible by n_heads=4"),
    (dict(cmp_stride=3), {}, "must divide cmp_block"),
    (dict(cmp_block=16, cmp_stride=4, sel_block=8), {}, "must not exceed sel_block"),
    (dict(sel_block=10, cmp_stride=4), {}, "must divide sel_block"),
    (dict(sel_topn=2, n_init=1, n_local=2), {}, "sel_topn n=2 must be at least n_init \\+ n_local = 3"),
    (dict(kv_mode="both"), {}, "kv_mode='both'"),
    (dict(gate_init=1.0), {}, "gate_init"),
    (dict(window=0), {}, "window=0"),
    (dict(attn_mask_type="document"), {}, "attn_mask_type='document'"),
    ({}, dict(parallelism=dict(tensor_parallel_degree=4)), "tensor_parallel_degree=4 must divide"),
    ({}, dict(parallelism=dict(context_parallel_degree=2)), "context parallelism"),
    ({}, dict(training=dict(seq_len=4)), "training.seq_len=4 is shorter than"),
    ({}, dict(validation=dict(enable=True, seq_len=4)), "validation.seq_len=4"),
])
def test_bad_configs_fail_with_clear_errors(changes, sections, message):
    nsa_fields = {"cmp_block", "cmp_stride", "sel_block", "sel_topn", "n_init", "n_local", "window"}
    jc = job_config(**({"training": dict(seq_len=64)} | sections))
    for k in list(changes):            # NSA fields arrive through the [nsa] section
        if k in nsa_fields:
            setattr(jc.nsa, k, changes.pop(k))
    args = tiny_args(**changes)
    with pytest.raises(NSAConfigError, match=message):
        args.update_from_config(jc, tokenizer_vocab_size=64)


def test_nsa_fields_are_declared_once():
    """The [nsa] section's fields are NSAConfig's and the model's NSA options, with help."""
    import dataclasses
    from nsa_flex import NSAConfig
    names = [f.name for f in dataclasses.fields(NSA)]
    assert names == [f.name for f in dataclasses.fields(NSAConfig)] + [
        "kv_mode", "cmp_hidden", "gate_init", "attn_mask_type", "vocab_size"]
    assert all(f.default is None for f in dataclasses.fields(NSA))


def test_nsa_section_override_is_checked():
    args = copy.deepcopy(nsa_flavors["debug"])
    jc = job_config(training=dict(seq_len=256))
    jc.nsa.cmp_stride = 5
    with pytest.raises(NSAConfigError, match="cmp_stride d=5 must divide cmp_block l=16"):
        args.update_from_config(jc, tokenizer_vocab_size=64)


def test_model_refuses_unset_vocab():
    with pytest.raises(ValueError, match="vocab_size is unset"):
        NSATransformer(tiny_args(vocab_size=None))


def test_llama3_dense_baseline_takes_the_flavor_dims_and_the_tokenizer_vocabulary(monkeypatch):
    from nsa_flex import baseline

    monkeypatch.setattr(baseline, "tokenizer_vocab_size", lambda jc: 1234)
    for flavor in ("debug", "50m", "100m", "1b"):
        a, d = nsa_flavors[flavor], baseline.dense_args(flavor)
        assert (d.dim, d.n_layers, d.n_heads, d.n_kv_heads, d.multiple_of, d.ffn_dim_multiplier,
                d.rope_theta, d.rope_scaling_args, d.attn_mask_type) == (
            a.dim, a.n_layers, a.n_heads, a.n_kv_heads, a.multiple_of, a.ffn_dim_multiplier,
            a.rope_theta, a.rope_scaling_args, a.attn_mask_type)
    d = baseline.dense_args("debug")
    d.update_from_config(job_config(training=dict(seq_len=256)))
    assert d.vocab_size == 1234 and d.max_seq_len == 256
    spec = baseline.get_train_spec()
    assert set(spec.model_args) == set(nsa_flavors)
