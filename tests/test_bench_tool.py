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


def test_first_warmup_runs_without_the_lock_later_ones_hold_it(bench):
    with bench.warmup_turn():           # before any timing: compiles overlap other runs'
        assert lock_is_free(bench.GPU_LOCK)
    with bench.timing_turn():
        assert not lock_is_free(bench.GPU_LOCK)
    assert lock_is_free(bench.GPU_LOCK)
    with bench.warmup_turn():           # the next impl's compile: under the lock
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
