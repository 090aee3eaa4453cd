"""Does the compiled model with activation checkpointing compute the eager model's gradients?

Builds a small ``nsa`` model (the 1b flavor's block sizes and 16 query heads per KV head, fewer
and narrower layers), takes one loss gradient eagerly without checkpointing (the reference), then
again for each ``--ac`` mode with torchtitan's own ``apply_ac`` and per-block ``apply_compile``,
and prints each run's grad norm and the worst relative error over the parameters. Exits 1 when
an error exceeds ``--tol``. Every run uses the FlexAttention path of the operator.

    python tools/check_model.py --out model.json                    # CUDA: Inductor
    python tools/check_model.py --backend aot_eager                 # graph capture only

On GPU (H100, torch 2.11) this found why compiling the model together with checkpointing gave
wrong gradients: the BlockMask lists, recomputed inside the compiled graph, got a layout from
Inductor that FlexAttention's kernels misread (``nsa_flex.backends.fixed_layout`` pins them).
Since then it passes on an H100 with no, full, per-op selective and every-2nd-block selective
checkpointing (``--ac full selective --selective-option 2``); memory-budget checkpointing, which
it does not exercise, stays refused on GPU (``nsa_flex.titan.check_compile_with_checkpointing``).
``--docs N`` runs the model with ``attn_mask_type="block_causal"`` on N packed documents. On CPU
the FlexAttention backward exists only as eager math, which torch refuses by a device check
before it runs; the tool lifts that check (CPU only) so the graph capture, the partitioning into
forward and backward and the recompute can be checked there with ``aot_eager`` (Inductor has no
CPU FlexAttention backward).
"""

from __future__ import annotations

import argparse
import copy
import json
import sys

import torch


def build(args):
    import torchtitan  # noqa: F401  (the model imports its protocols)
    from nsa_flex.model import NSATransformer, nsa_flavors
    from nsa_flex.model.args import replace

    a = replace(nsa_flavors["1b"], dim=args.dim, n_layers=args.layers, n_heads=args.heads,
                n_kv_heads=args.kv_heads, vocab_size=512, max_seq_len=max(1024, args.seq),
                cmp_hidden=64, attn_mask_type="block_causal" if args.docs > 1 else "causal")
    torch.manual_seed(args.seed)
    m = NSATransformer(a)
    with torch.no_grad():
        m.init_weights()
    return m


def use_flex_on_cpu() -> None:
    """On CPU the model calls the operator's flex backend (its default there is the dense one),
    and torch's CPU check on the FlexAttention backward is lifted. On CUDA nothing changes: the
    model calls ``nsa_attention`` as in training."""
    from nsa_flex import operator as op
    from nsa_flex.kernels import flex_kernel
    import nsa_flex.model.model as mm

    def flex_nsa(q, k, v, k_cmp, v_cmp, gates, config, k_swa=None, v_swa=None,
                 return_indices=False, doc_ids=None, kernel=None):
        op._check_inputs(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, doc_ids)
        kernel = flex_kernel(q.dtype, q.shape[-1], v.shape[-1], config)
        return op._nsa(q, k, v, k_cmp, v_cmp, gates, config, k_swa, v_swa, return_indices,
                       kernel, doc_ids)

    mm.nsa_attention = flex_nsa
    import torch.nn.attention.flex_attention as fa

    fa._validate_device = lambda *a, **k: None


def gradients(model, x, y, doc_ids=None) -> dict[str, torch.Tensor]:
    out = model(x, doc_ids)
    loss = torch.nn.functional.cross_entropy(out.flatten(0, 1).float(), y.flatten())
    loss.backward()
    strip = lambda n: n.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")
    return {strip(n): p.grad.detach().float().clone() for n, p in model.named_parameters()}


def grad_norm(grads: dict) -> torch.Tensor:
    """The norm of the whole gradient (all parameters as one vector)."""
    return torch.sqrt(sum(g.pow(2).sum() for g in grads.values()))


def compare(ref: dict, got: dict, floor: float = 1e-3) -> tuple[float, str]:
    """Worst relative error over the parameters, each against max(its gradient's norm, ``floor``
    x the whole gradient's norm). The floor matters where a gradient is zero in exact arithmetic
    and both runs hold rounding noise: compress_k's fc2 bias shifts every compressed key of a
    query by the same q·b, which the softmax ignores. It also shrinks a real error on a tensor
    whose gradient is far below the floor, so the tool prints the unfloored worst too."""
    total = grad_norm(ref)
    worst, where = 0.0, ""
    for n, g in ref.items():
        e = ((got[n] - g).norm() / torch.maximum(g.norm(), floor * total).clamp_min(1e-30)).item()
        if e > worst or e != e:
            worst, where = e, n
    return worst, where


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=1)
    ap.add_argument("--ac", nargs="+", default=["none", "selective", "full"],
                    choices=["none", "selective", "full"])
    ap.add_argument("--selective-option", default="op",
                    help="selective_ac_option of the 'selective' mode: 'op' (per-op, the default) or "
                         "N (every N-th block fully)")
    ap.add_argument("--backend", default=None, help="torch.compile backend (default: inductor on "
                    "CUDA, aot_eager on CPU)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--tol", type=float, default=None,
                    help="largest relative gradient error accepted (default 1e-4 fp32, 3e-2 bf16)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--docs", type=int, default=1, help="packed documents per sequence (1: one)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.seq % 64 or args.seq < 128:
        ap.error(f"--seq {args.seq}: use a multiple of 64, at least 128")
    if args.selective_option != "op" and not args.selective_option.isdigit():
        ap.error(f"--selective-option {args.selective_option}: use 'op' or a positive integer")
    if args.heads % args.kv_heads:
        ap.error(f"--heads {args.heads} must be a multiple of --kv-heads {args.kv_heads}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    backend = args.backend or ("inductor" if device.type == "cuda" else "aot_eager")
    if device.type == "cpu" and backend == "inductor":
        ap.error("--backend inductor needs CUDA: Inductor has no CPU FlexAttention backward")
    dtype = getattr(torch, args.dtype)
    tol = args.tol if args.tol is not None else (1e-4 if dtype == torch.float32 else 3e-2)
    torch.backends.cuda.matmul.allow_tf32 = False

    from torchtitan.config.job_config import ActivationCheckpoint, Compile
    from torchtitan.distributed.activation_checkpoint import apply_ac
    from torchtitan.models.llama3.infra.parallelize import _op_sac_save_list, apply_compile

    if device.type == "cpu":
        use_flex_on_cpu()
    else:
        from nsa_flex import patches
        patches.install()
    base = build(args).to(device=device, dtype=dtype)
    gen = torch.Generator().manual_seed(args.seed + 1)
    x, y = (torch.randint(0, 512, (1, args.seq), generator=gen).to(device) for _ in range(2))
    ids = None
    if args.docs > 1:   # documents of random lengths
        cuts = torch.randperm(args.seq - 1, generator=gen)[:args.docs - 1] + 1
        ids = (torch.arange(args.seq)[:, None] >= cuts[None, :]).sum(-1)[None].to(device)
    ref = gradients(copy.deepcopy(base), x, y, ids)
    ref_norm = grad_norm(ref).item()
    print(f"eager, no checkpointing: grad norm {ref_norm:.6g}", flush=True)
    rows, ok = [], True
    for ac in args.ac:
        m = copy.deepcopy(base)
        if ac != "none":
            apply_ac(m, ActivationCheckpoint(mode=ac, selective_ac_option=args.selective_option),
                     model_compile_enabled=True, op_sac_save_list=_op_sac_save_list)
        apply_compile(m, Compile(enable=True, components=["model"], backend=backend))
        got = gradients(m, x, y, ids)
        norm = grad_norm(got).item()
        worst, where = compare(ref, got)
        raw, raw_where = compare(ref, got, floor=0.0)   # shown, not judged: see compare()
        good = worst <= tol
        ok &= good
        rows.append(dict(ac=ac, selective_option=args.selective_option if ac == "selective" else None,
                         backend=backend, grad_norm=norm, worst_rel_err=worst, worst_param=where,
                         worst_rel_err_unfloored=raw, worst_param_unfloored=raw_where, ok=good))
        print(f"compiled ({backend}), AC {ac}: grad norm {norm:.6g}, worst relative error "
              f"{worst:.3g} ({where}) {'ok' if good else 'WRONG'}; without the floor {raw:.3g} "
              f"({raw_where})", flush=True)
    if args.out:
        meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                    torch=torch.__version__, dtype=args.dtype, seq=args.seq, layers=args.layers,
                    dim=args.dim, heads=args.heads, kv_heads=args.kv_heads, tol=tol, docs=args.docs,
                    reference_grad_norm=ref_norm)
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
