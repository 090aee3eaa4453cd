"""Do FSDP, TP and PP train like one process? Losses of the same run under each, compared.

Every run starts from one seed checkpoint (torchtitan's ``--checkpoint.create_seed_checkpoint``)
and reads the same token stream: the dataset is one text repeated, so the per-rank shards that
data parallelism gives each rank hold the same tokens as the single process's stream. A data-
parallel step then averages identical halves, and its loss is the single process's loss up to
rounding. Prints the loss of each run and the largest difference against the single process,
writes JSON, and exits 1 when a difference exceeds ``--tol``.

    python tools/check_parallel.py --out parallel.json            # 2 GPUs or CPU
    python tools/check_parallel.py --config configs/100m.toml --steps 20 --concurrent ...

With ``--concurrent`` the runs share the machine at once (wall time only; losses do not depend
on it). On a machine without GPUs the runs use the CPU and gloo, as ``nsa_flex.train`` does.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODES = {
    "fsdp": ["--parallelism.data_parallel_shard_degree", "{n}"],
    "tp": ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.tensor_parallel_degree", "{n}"],
    "pp": ["--parallelism.data_parallel_shard_degree", "1", "--parallelism.pipeline_parallel_degree", "{n}"],
}
STEP_RE = re.compile(r"step:\s*(\d+)\s+loss:\s*([0-9.]+)")


def repeated_dataset(folder: Path, chars: int = 300_000, copies: int = 64) -> None:
    """train.jsonl holding one text (the embedded corpus's first documents) ``copies`` times."""
    from nsa_flex.data.corpus import ensure_stdlib_corpus, iter_texts

    text = ""
    for doc in iter_texts(ensure_stdlib_corpus(), "train"):
        text += doc + "\n"
        if len(text) >= chars:
            break
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "train.jsonl", "w") as f:
        for _ in range(copies):
            f.write(json.dumps({"text": text[:chars]}) + "\n")


def losses(log: Path) -> dict[int, float]:
    out = {}
    for line in log.read_text(errors="replace").splitlines():
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = STEP_RE.search(line)
        if m and "validate" not in line:
            out[int(m.group(1))] = float(m.group(2))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=str(ROOT / "configs" / "debug.toml"))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--nproc", type=int, default=2, help="ranks of each parallel run")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    ap.add_argument("--concurrent", action="store_true", help="start all runs at once")
    ap.add_argument("--tol", type=float, default=0.05, help="largest loss difference accepted")
    ap.add_argument("--work", default=None, help="folder for data, checkpoints and logs (default: a temp dir)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per run")
    ap.add_argument("--out", required=True, help="JSON file to write")
    a, extra = ap.parse_known_args()

    work = Path(a.work or tempfile.mkdtemp(prefix="nsa_parallel_"))
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    common = ["--job.config_file", a.config, "--training.steps", str(a.steps), "--metrics.log_freq", "1",
              "--checkpoint.enable", "--checkpoint.interval", str(10 * a.steps + 1000),
              "--validation.no-enable", "--training.dataset_path", str(work / "data"), *extra]
    t0 = time.time()
    print(f"[parallel] work folder {work}", flush=True)
    repeated_dataset(work / "data")

    print("[parallel] seed checkpoint", flush=True)
    seed = work / "seed"
    shutil.rmtree(seed, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "nsa_flex.train", *common, "--job.dump_folder", str(seed),
                    "--checkpoint.create_seed_checkpoint", "--parallelism.data_parallel_shard_degree", "1",
                    "--training.steps", "1"], env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=open(work / "seed.log", "w"), timeout=a.timeout)

    runs = {"single": [sys.executable, "-m", "nsa_flex.train"]}
    for i, m in enumerate(a.modes):
        runs[m] = ["torchrun", f"--nproc_per_node={a.nproc}", f"--master_port={29600 + i}",
                   "-m", "torchtitan.train", *[s.format(n=a.nproc) for s in MODES[m]]]
    procs = {}
    for name, cmd in runs.items():
        folder = work / name
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(seed / "checkpoint", folder / "checkpoint")
        run_env = dict(env, CUDA_VISIBLE_DEVICES="0") if name == "single" and "CUDA_VISIBLE_DEVICES" not in env else env
        cmd = cmd + common + ["--job.dump_folder", str(folder)]
        print(f"[parallel] {name}: {' '.join(cmd)}", flush=True)
        log = open(work / f"{name}.log", "w")
        procs[name] = (subprocess.Popen(cmd, env=run_env, stdout=log, stderr=subprocess.STDOUT), time.time())
        if not a.concurrent:
            procs[name][0].wait(timeout=a.timeout)
    result = {"config": a.config, "steps": a.steps, "nproc": a.nproc, "extra_args": extra, "runs": {}}
    for name, (p, started) in procs.items():
        rc = p.wait(timeout=a.timeout)
        result["runs"][name] = {"rc": rc, "losses": losses(work / f"{name}.log")}
        print(f"[parallel] {name}: exit {rc}", flush=True)
    ref = result["runs"]["single"]["losses"]
    ok = bool(ref) and len(ref) == a.steps and result["runs"]["single"]["rc"] == 0
    print(f"\n{'run':<8}{'first loss':>12}{'last loss':>12}{'steps':>7}{'max |diff|':>12}")
    for name, r in result["runs"].items():
        l = r["losses"]
        common_steps = sorted(set(l) & set(ref))
        r["max_abs_diff_vs_single"] = max((abs(l[s] - ref[s]) for s in common_steps), default=None)
        good = r["rc"] == 0 and len(l) == a.steps and (r["max_abs_diff_vs_single"] or 0.0) <= a.tol
        ok &= good
        first, last = (l[min(l)], l[max(l)]) if l else (float("nan"), float("nan"))
        d = r["max_abs_diff_vs_single"]
        print(f"{name:<8}{first:>12.5f}{last:>12.5f}{len(l):>7}{(d if d is not None else float('nan')):>12.2e}"
              + ("" if good else "   <-- FAILED (see " + str(work / f"{name}.log") + ")"))
    result["ok"], result["tol"], result["wall_s"] = ok, a.tol, round(time.time() - t0, 1)
    try:
        import torch
        result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        result["torch"] = torch.__version__
    except Exception:  # pragma: no cover - the runs themselves need torch
        pass
    Path(a.out).write_text(json.dumps(result, indent=1))
    print(f"\n[parallel] {'all runs match' if ok else 'MISMATCH or failure'} (tol {a.tol}); wrote {a.out}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
