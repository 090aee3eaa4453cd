"""Parallelism pieces on CPU: the TP plan (2 gloo ranks) and the pipeline loss scaling."""

import copy
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("torchtitan")

from nsa_flex.infra.pipeline import GradScaledLoss  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tp_worker(rank: int, world: int, port: int, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor

        from nsa_flex.infra.parallelize import apply_tp
        from nsa_flex.model import NSATransformer, nsa_flavors

        for kv_mode in ("separate", "shared"):
            args = copy.deepcopy(nsa_flavors["debug"])
            args.vocab_size, args.max_seq_len, args.kv_mode = 256, 128, kv_mode
            torch.manual_seed(0)
            ref = NSATransformer(args)
            with torch.no_grad():
                ref.init_weights()
            tp = copy.deepcopy(ref)
            apply_tp(tp, init_device_mesh("cpu", (world,)), loss_parallel=False,
                     enable_float8_tensorwise_tp=False)
            tokens = torch.randint(0, 256, (2, 128), generator=torch.Generator().manual_seed(1))
            ref_loss = ref(tokens).float().pow(2).mean()
            tp_loss = tp(tokens).float().pow(2).mean()
            ref_loss.backward()
            tp_loss.backward()
            worst, checked = 0.0, 0
            for (name, p), (name2, p2) in zip(ref.named_parameters(), tp.named_parameters()):
                assert name == name2
                g = p2.grad.full_tensor() if isinstance(p2.grad, DTensor) else p2.grad
                scale = p.grad.abs().max().item()
                if scale < 1e-9:  # e.g. φ_k's output bias: a shift of all compressed keys, no gradient
                    continue
                checked += 1
                worst = max(worst, (g - p.grad).abs().max().item() / scale)
            replicated = [n for n, p in tp.named_parameters()
                       if isinstance(p, DTensor) and "compress" in n]
            queue.put((kv_mode, rank, abs(ref_loss.item() - tp_loss.item()), worst, checked,
                       len(replicated)))
    finally:
        dist.destroy_process_group()


def test_tensor_parallel_matches_single_process():
    """TP=2 (with φ replicated and the gates/branch projections sharded) gives the same loss
    and the same gradients, φ's included, as the unsharded model."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_tp_worker, args=(r, 2, port, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=300) for _ in range(2 * len(procs))]
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    assert sorted((r[0], r[1]) for r in results) == [
        ("separate", 0), ("separate", 1), ("shared", 0), ("shared", 1)]
    for kv_mode, rank, dloss, worst, checked, n_phi in results:
        assert dloss < 1e-5, (kv_mode, rank, dloss)
        assert worst < 1e-4, (kv_mode, rank, worst)
        assert checked > 20
        assert n_phi == 2 * 2 * 5  # layers x (φ_k, φ_v) x (pos_emb, fc1 w/b, fc2 w/b), replicated


def test_grad_scaled_loss_keeps_value_and_scales_gradient():
    pred = torch.randn(2, 5, 7, requires_grad=True)
    labels = torch.randint(0, 7, (2, 5))

    def loss_fn(p, y):
        return torch.nn.functional.cross_entropy(p.flatten(0, 1), y.flatten(), reduction="sum")

    plain = loss_fn(pred, labels)
    (g_plain,) = torch.autograd.grad(plain, pred)
    scaled = GradScaledLoss(loss_fn, 0.1)(pred, labels)
    (g_scaled,) = torch.autograd.grad(scaled, pred)
    assert torch.allclose(scaled, plain)
    assert torch.allclose(g_scaled, 0.1 * g_plain)


@pytest.mark.parametrize("mask", ["causal", "block_causal"])
def test_fsdp_and_pipeline_train_like_one_process(tmp_path, mask):
    """FSDP over 2 ranks and a 2-stage pipeline (CPU, gloo, torchrun) start from one seed
    checkpoint, read the same tokens, and log the single process's losses step for step
    (tools/check_parallel.py: 5 printed decimals, tolerance 1e-4), with and without documents."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "parallel.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "tools/check_parallel.py", "--steps", "3", "--modes", "fsdp",
                        "pp", "--tol", "1e-4", "--work", str(tmp_path / "work"), "--out", str(out),
                        "--training.seq_len", "128", "--training.local_batch_size", "4",
                        "--nsa.attn_mask_type", mask],
                       cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["ok"] and set(result["runs"]) == {"single", "fsdp", "pp"}
    for name, run in result["runs"].items():
        assert sorted(int(s) for s in run["losses"]) == [1, 2, 3], name
        assert run["max_abs_diff_vs_single"] <= 1e-4, name
