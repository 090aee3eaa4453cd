"""tools/bench.py's turn-taking: runs sharing one card may compile at once, but once a run has
timed anything, its further compiles and autotuning wait for the card's lock like a timing."""

import fcntl
import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def bench(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("nsa_bench_tool", ROOT / "tools" / "bench.py")
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "nsa_bench_tool", mod)
    spec.loader.exec_module(mod)
    mod.GPU_LOCK = str(tmp_path / "gpu.lock")
    return mod


def lock_is_free(path) -> bool:
    """Whether another open file description can take the lock right now."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        fcntl.flock(f, fcntl.LOCK_UN)
        return True


def test_first_warmup_runs_without_the_lock_later_ones_hold_it(bench, tmp_path):
    folder = tmp_path / "bar"
    folder.mkdir()
    bench.BARRIER = f"{folder}:1"       # every run's first compile done before anyone times
    with bench.warmup_turn():           # before any timing: compiles overlap other runs'
        assert lock_is_free(bench.GPU_LOCK)
    with bench.timing_turn():
        assert not lock_is_free(bench.GPU_LOCK)
    assert lock_is_free(bench.GPU_LOCK)
    with bench.warmup_turn():           # the next impl's compile: under the lock
        assert not lock_is_free(bench.GPU_LOCK)
    assert lock_is_free(bench.GPU_LOCK)


def test_without_a_barrier_even_the_first_warmup_holds_the_lock(bench):
    """Runs given only --gpu-lock: nothing holds another run's timing back while this one
    compiles and autotunes, so its first compile takes the lock too."""
    assert bench.BARRIER is None
    with bench.warmup_turn():
        assert not lock_is_free(bench.GPU_LOCK)
    assert lock_is_free(bench.GPU_LOCK)


def test_barrier_is_waited_for_before_the_first_turn_only(bench, tmp_path):
    folder = tmp_path / "bar"
    folder.mkdir()
    (folder / "ready.other").touch()
    bench.BARRIER = f"{folder}:2"
    with bench.timing_turn():           # this run's own ready file completes the count
        pass
    assert bench.BARRIER is None and len(list(folder.glob("ready.*"))) == 2


def test_timings_and_peak_hold_no_earlier_forward(bench, monkeypatch):
    """fwd_and_fwdbwd's peak memory is one fwd+bwd's: the warm-up forward's autograd graph (all
    its saved activations) is freed before the timings and the peak measurement start."""
    import weakref

    import torch

    saved = []                                    # weak refs to each call's saved activation

    def run():
        h = x * 2.0
        saved.append(weakref.ref(h))              # kept alive only by the graph (mul saves it)
        return (h * x).sum(-1)

    x = torch.randn(4, 8, requires_grad=True)
    alive_at_timing = []

    def measure(fn, *a, **k):
        alive_at_timing.append([r() is not None for r in saved[:1]])   # the warm-up forward's
        fn()
        return 0.0

    monkeypatch.setattr(bench, "bench_ms", measure)
    monkeypatch.setattr(bench, "peak_mib", measure)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)
    row = bench.fwd_and_fwdbwd(run, [x])
    assert row["finite"] and alive_at_timing == [[False]] * 3


@pytest.mark.parametrize("docs", [False, True])
def test_selected_blockmask_mib_is_what_the_operator_builds(bench, docs):
    """The reported size of the selected BlockMask equals the lists the operator's builder
    returns on CUDA (narrow KV lists, query splits), with and without documents."""
    import torch

    from nsa_flex import NSAConfig
    from nsa_flex.backends import effective_splits
    from nsa_flex.kernels import flex_kernel
    cfg = NSAConfig(cmp_block=32, cmp_stride=16, sel_block=64, sel_topn=16, window=512)
    T, Hq, Hkv = 4096, 32, 2
    G, Ts = Hq // Hkv, cfg.num_sel_blocks(T)
    kernel = flex_kernel(torch.bfloat16, 128, 128, cfg)
    idx = torch.randint(0, Ts, (1, Hkv, T, cfg.sel_topn), generator=torch.Generator().manual_seed(0))
    idx = torch.where(idx * cfg.sel_block <= torch.arange(T)[:, None], idx, -1)
    idx = torch.sort(idx, -1).values
    idx[..., 1:] = torch.where(idx[..., 1:] == idx[..., :-1], -1, idx[..., 1:])
    d = bench.op.Documents.of(torch.arange(T)[None] * 3 // T, cfg) if docs else None
    S = effective_splits(kernel.slc.q_splits, T * G, kernel.slc.q_block)
    bm = bench.op.selected_block_mask_of(idx, bench.op.causal_mask(G), cfg, G, kernel.slc, d)(S)
    lists = [bm.kv_num_blocks, bm.kv_indices, bm.q_num_blocks, bm.q_indices]
    built = sum(t.numel() * t.element_size() for t in lists) / 2**20
    assert abs(bench.selected_blockmask_mib(T, Hq, Hkv, cfg, kernel, docs) - built) < 0.06, built


def test_kernel_overrides_replace_fields(bench):
    import torch

    from nsa_flex import NSAConfig
    from nsa_flex.kernels import flex_kernel
    k = flex_kernel(torch.bfloat16, 128, 128, NSAConfig())
    got = bench.apply_overrides(k, ["cmp.bwd=64,64,64,64,4,3", "slc.q_splits=16", "topn_tile=4096"])
    assert got.cmp.bwd == (64, 64, 64, 64, 4, 3) and got.slc.q_splits == 16 and got.topn_tile == 4096
    assert got.swa == k.swa
    with pytest.raises(SystemExit, match="slc.fwd"):
        bench.apply_overrides(k, ["slc.fwd=16,256,2,3"])     # refused by the tile check


def test_each_variant_compiles_in_its_own_inductor_cache(bench, tmp_path, monkeypatch):
    """--variants: one child per variant, each with its own TORCHINDUCTOR_CACHE_DIR (a knob that
    changes only Inductor's choices once got the other variant's cached kernels), rows merged."""
    import json
    import subprocess
    import types

    started = []

    class Child:                        # a child that wrote its rows and exited
        def __init__(self, cmd, stdout=None, stderr=None, env=None):
            out = cmd[cmd.index("--out") + 1]
            row = {"impl": "nsa_flex", "T": 8, "fwd_ms": 1.0, "fwdbwd_ms": 2.0, "peak_mem_mib": 3.0}
            json.dump({"meta": {"kernel_overrides": []}, "rows": [row]}, open(out, "w"))
            started.append((cmd, env))
            self.pid = 10_000 + len(started)

        def poll(self):
            return 0

        def wait(self):
            return 0

    monkeypatch.setattr(subprocess, "Popen", Child)
    variants = ["", "cmp.q_splits=16"]
    out = str(tmp_path / "v.json")
    monkeypatch.setattr(sys, "argv", ["bench.py", "--seq", "8", "--variants", *variants, "--out", out])
    bench.run_variants(types.SimpleNamespace(variants=variants, gpu_lock=None, out=out))
    caches = [env["TORCHINDUCTOR_CACHE_DIR"] for _, env in started]
    assert len(caches) == 2 and caches[0] != caches[1]
    assert "--kernel" not in started[0][0] and started[1][0][-2:] == ["--kernel", "cmp.q_splits=16"]
    assert [r["variant"] for r in json.load(open(out))["rows"]] == variants
