"""tools/check_model.py: compiled model + activation checkpointing against the eager model.

On CPU the tool checks the graph capture, partitioning and recompute with ``aot_eager`` (the
operator's flex backend, whose CPU backward torch runs as eager math once its device check is
lifted); the GPU failure it was written for needs Inductor."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("torchtitan")
ROOT = Path(__file__).resolve().parent.parent


def load_tool():
    spec = importlib.util.spec_from_file_location("nsa_check_model_tool", ROOT / "tools" / "check_model.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_compare_names_the_worst_parameter():
    tool = load_tool()
    ref = {"a": torch.ones(4), "b": torch.ones(4)}
    assert tool.compare(ref, {"a": torch.ones(4), "b": torch.ones(4)}) == (0.0, "")
    err, where = tool.compare(ref, {"a": torch.ones(4) * 1.01, "b": torch.tensor([1.0, 1, 1, 3])})
    assert where == "b" and err == pytest.approx(1.0)
    err, where = tool.compare(ref, {"a": torch.full((4,), float("nan")), "b": torch.ones(4)})
    assert where == "a" and err != err


def test_compare_floors_a_gradient_that_is_zero_in_exact_arithmetic():
    tool = load_tool()
    ref = {"w": torch.ones(100), "bias": torch.full((4,), 1e-9)}      # whole norm 10
    err, where = tool.compare(ref, {"w": torch.ones(100), "bias": torch.full((4,), -1e-9)})
    assert err == pytest.approx(4e-9 / 1e-2) and where == "bias"      # noise against 1e-3 x 10
    err, where = tool.compare(ref, {"w": torch.ones(100), "bias": torch.full((4,), 0.1)})
    assert err > 1 and where == "bias"                                # a real error still shows


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU route (aot_eager)")
@pytest.mark.parametrize("docs", [1, 4])
def test_checkpointed_compiled_model_matches_eager_on_cpu(tmp_path, docs):
    out = tmp_path / "m.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "tools/check_model.py", "--seq", "256", "--layers", "1",
                        "--ac", "selective", "full", "--docs", str(docs), "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [(x["ac"], x["backend"], x["ok"]) for x in rows] == [("selective", "aot_eager", True),
                                                                 ("full", "aot_eager", True)]
    ref = json.loads(out.read_text())["meta"]["reference_grad_norm"]
    assert all(abs(x["grad_norm"] - ref) <= 1e-4 * ref for x in rows) and ref > 0
    if docs > 1:
        return
    bad = subprocess.run([sys.executable, "tools/check_model.py", "--seq", "100"], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--seq 100: use a multiple of 64" in bad.stderr
    bad = subprocess.run([sys.executable, "tools/check_model.py", "--selective-option", "two"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "--selective-option two: use 'op'" in bad.stderr


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Inductor's FlexAttention needs CUDA")
@pytest.mark.parametrize("kv_heads", [1, 2])
def test_checkpointed_compiled_model_matches_eager_on_gpu(tmp_path, kv_heads):
    """The fault backends.fixed_layout fixes: with checkpointing, the BlockMask lists are
    recomputed inside the compiled graph, and before the fix Inductor's layout of them made the
    kernels read past the lists (one KV head) or give wrong gradients (two)."""
    out = tmp_path / "m.json"
    path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, PYTHONPATH=path)
    r = subprocess.run([sys.executable, "tools/check_model.py", "--kv-heads", str(kv_heads),
                        "--ac", "selective", "--out", str(out)],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert [(x["ac"], x["backend"], x["ok"]) for x in json.loads(out.read_text())["rows"]] == [
        ("selective", "inductor", True)]
