"""Train NSA, the dense llama3 baseline and the sliding-window control on the passkey mixture
(configs/quality.toml), evaluate their retrieval, and plot it: one command, one time limit.

    python tools/quality.py OUT [--time-s 580] [--work outputs/quality-work]

Stages and their share of ``--time-s`` (default 580 s):

1. prepare (20 s): the embedded corpus and tokenizer, built once into $NSA_FLEX_CACHE.
2. train (what remains after the other stages): the three runs of configs/quality.toml, the
   config's steps each (``--steps`` overrides), all at once, spread over the visible GPUs
   (several runs share a GPU when there are fewer GPUs than runs; ``--runs-per-gpu 1`` runs
   them in waves instead). A run still going at the end of its share is stopped; its latest
   checkpoint (every quarter of the run) is evaluated and the summary says where it stopped.
3. evaluate (``--eval-s``, default 140 s): ``python -m nsa_flex.eval`` on each checkpoint, all
   at once, lengths 2k-16k (1/2x to 4x the training length), 20 prompts a cell
   (``--time-limit`` keeps what was measured when time runs out).
4. plot and summarise (10 s): OUT/quality.png (every model's heatmaps), OUT/loss.png (training
   and validation loss of the three), OUT/summary.json and OUT/summary.md (steps reached,
   losses, tokens/s, accuracy per length).

OUT/<model>/ holds each run's train.log, eval.log, eval/retrieval.json and eval/retrieval.png:
small files only. The checkpoints (~0.2 GB a model, more while training) go to
``--work``/<model>/checkpoint. ``--skip-train`` evaluates the checkpoints already there.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))   # nsa_flex from this checkout, installed or not
CONFIG = REPO / "configs" / "quality.toml"
MODELS = ("nsa", "llama3_dense", "nsa_window")
STEP = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+).*?tps:\s+([0-9,]+)")
VALIDATE = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+)")
PREPARE_S = 20          # the corpus and tokenizer (once per machine)
PLOT_S = 10             # plots and summary
STOP_GRACE_S = 15       # SIGTERM, then SIGKILL after this


def log(msg: str) -> None:
    print(f"[quality {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def launch(cmd: list[str], logfile: Path, gpu: int | None, threads: int) -> subprocess.Popen:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    # processes at once share the CPU cores for Inductor's compile workers and their threads
    env.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(threads))
    env.setdefault("OMP_NUM_THREADS", str(threads))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    logfile.parent.mkdir(parents=True, exist_ok=True)
    f = open(logfile, "w")
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT,
                            preexec_fn=os.setsid)   # its own process group, stopped as one


def wait_all(procs: dict[str, subprocess.Popen], deadline: float) -> dict[str, str]:
    """Wait for every process until ``deadline``; stop those still running. -> name: outcome."""
    out = {}
    while procs and time.time() < deadline:
        for name, p in list(procs.items()):
            if p.poll() is not None:
                out[name] = "finished" if p.returncode == 0 else f"failed (exit {p.returncode})"
                log(f"{name}: {out[name]}")
                del procs[name]
        time.sleep(2)
    for name, p in procs.items():
        log(f"{name}: out of time, stopping it")
        os.killpg(p.pid, signal.SIGTERM)
        try:
            p.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
        out[name] = "stopped at the time limit"
    return out


def train_log_summary(path: Path) -> dict:
    text = path.read_text(errors="replace") if path.exists() else ""
    steps = [(int(s), float(l), int(t.replace(",", ""))) for s, l, t in STEP.findall(text)]
    val = [(int(s), float(l)) for s, l in VALIDATE.findall(text)]
    tps = [t for s, _, t in steps if s > 20]   # past compile and warm-up
    return {
        "last_step": steps[-1][0] if steps else 0,
        "last_loss": steps[-1][1] if steps else None,
        "validation": [{"step": s, "loss": l} for s, l in val],
        "tokens_per_s_median": statistics.median(tps) if tps else None,
        "curve": [{"step": s, "loss": l} for s, l, _ in steps],
    }


def loss_plot(summary: dict, path: Path) -> None:
    """Training loss (thin) and validation loss (markers) of every model, one plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for i, (m, s) in enumerate(summary["models"].items()):
        t, color = s["train"], f"C{i}"
        if t["curve"]:
            ax.plot([c["step"] for c in t["curve"]], [c["loss"] for c in t["curve"]], color=color,
                    lw=1, alpha=0.8, label=f"{m} train")
        if t["validation"]:
            ax.plot([v["step"] for v in t["validation"]], [v["loss"] for v in t["validation"]],
                    color=color, marker="o", ls="--", label=f"{m} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(f"training (passkey mixture) and validation (held-out corpus) loss, "
                 f"{summary['steps']} steps")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_steps() -> int:
    import tomllib

    return int(tomllib.loads(CONFIG.read_text())["training"]["steps"])


def latest_checkpoint(folder: Path) -> Path | None:
    steps = [(int(m.group(1)), d) for d in (folder / "checkpoint").glob("step-*")
             if (m := re.fullmatch(r"step-(\d+)", d.name)) and (d / ".metadata").exists()]
    return max(steps)[1] if steps else None


def summary_md(summary: dict) -> str:
    lines = ["| model | steps | final train loss | last validation loss | tokens/s |",
             "|---|---|---|---|---|"]
    for m, s in summary["models"].items():
        t = s["train"]
        val = t["validation"][-1]["loss"] if t["validation"] else None
        lines.append(f"| {m} | {t['last_step']} ({s['train_outcome']}) | {t['last_loss']} | {val} | "
                     f"{t['tokens_per_s_median']} |")
    for task in ("needle", "passkey"):
        rows = {}
        lengths = set()
        for m, s in summary["models"].items():
            for c in s.get("cells", []):
                if c["task"] == task:
                    rows.setdefault(m, {}).setdefault(c["length"], []).append(c)
                    lengths.add(c["length"])
        if not rows:
            continue
        lengths = sorted(lengths)
        lines += ["", f"{task}: key accuracy (mean over depths); selection recall for nsa", "",
                  "| model | " + " | ".join(str(L) for L in lengths) + " |",
                  "|---|" + "---|" * len(lengths)]
        for m, by_len in rows.items():
            def fmt(cs):
                if not cs:
                    return "–"
                acc = sum(c["accuracy"] for c in cs) / len(cs)
                rec = [c["selection_recall"] for c in cs if c["selection_recall"] is not None]
                return f"{acc:.2f}" + (f" (recall {sum(rec) / len(rec):.2f})" if rec else "")
            lines.append(f"| {m} | " + " | ".join(fmt(by_len.get(L, [])) for L in lengths) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", help="results folder (created): logs, JSONs, plots, summary")
    p.add_argument("--work", default=str(REPO / "outputs" / "quality-work"),
                   help="training dump folders and checkpoints (default outputs/quality-work)")
    p.add_argument("--time-s", type=float, default=580, help="all stages together (default 580)")
    p.add_argument("--eval-s", type=float, default=140, help="the evaluation stage (default 140)")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the config's [training] steps)")
    p.add_argument("--runs-per-gpu", type=int, default=None,
                   help="training runs sharing one GPU at once (default: all runs at once)")
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 4096, 8192, 16384])
    p.add_argument("--depths", nargs="+", type=float, default=[0.0, 0.25, 0.5, 0.75, 1.0])
    p.add_argument("--samples", type=int, default=20)
    p.add_argument("--skip-train", action="store_true", help="evaluate the checkpoints in --work")
    p.add_argument("--train-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every training run, e.g. --train-arg=--training.steps=50")
    p.add_argument("--eval-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for every evaluation, e.g. --eval-arg=--flavor=debug")
    p.add_argument("--allow-cpu", action="store_true",
                   help="without a GPU, run everything on the CPU one after the other (a smoke "
                        "test of this tool with a small --train-arg=--model.flavor=debug)")
    a = p.parse_args(argv)
    t0 = time.time()
    out = Path(a.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(a.work).resolve()
    gpus = gpu_count()
    if gpus == 0 and not a.allow_cpu:
        print("error: no CUDA GPU visible; this tool trains on GPUs (see configs/quality.toml for "
              "the single commands, or pass --allow-cpu for a smoke test)", file=sys.stderr)
        return 2
    if a.runs_per_gpu is not None and a.runs_per_gpu < 1:
        print(f"error: --runs-per-gpu {a.runs_per_gpu} must be >= 1", file=sys.stderr)
        return 2
    per_gpu = a.runs_per_gpu or -(-len(a.models) // max(gpus, 1))
    slots = max(gpus, 1) * per_gpu if gpus else 1
    threads = max(1, (os.cpu_count() or 1) // min(slots, len(a.models)))
    steps = a.steps or config_steps()
    interval = max(50, steps // 4)      # checkpoints: something to evaluate if a run is stopped
    val_freq = max(1, steps // 2)       # validation at step 1, half way and at the end
    train_s = a.time_s - PREPARE_S - a.eval_s - PLOT_S
    if not a.skip_train and train_s < 120:
        print(f"error: --time-s {a.time_s} leaves {train_s:.0f}s for training; give at least "
              f"{PREPARE_S + a.eval_s + PLOT_S + 120:.0f}", file=sys.stderr)
        return 2
    if not a.skip_train:
        stale = [m for m in a.models if latest_checkpoint(work / m)]
        if stale:
            print(f"error: {work} holds checkpoints of an earlier run of {', '.join(stale)} (the "
                  f"trainer would resume from them): remove them or pass another --work",
                  file=sys.stderr)
            return 2
    log(f"{gpus} GPU(s); models {', '.join(a.models)}; {steps} steps each; limit {a.time_s:.0f}s "
        f"(train {train_s:.0f}s, eval {a.eval_s:.0f}s)")

    # 1. prepare
    from nsa_flex.data.tokenizer import ensure_embedded_tokenizer

    ensure_embedded_tokenizer(progress=False)
    log(f"corpus and tokenizer ready ({time.time() - t0:.0f}s)")

    # 2. train
    outcomes = {m: "skipped (--skip-train)" for m in a.models}
    if not a.skip_train:
        waves = [a.models[i:i + slots] for i in range(0, len(a.models), slots)]
        train_end = t0 + PREPARE_S + train_s
        for wi, wave in enumerate(waves):
            deadline = time.time() + (train_end - time.time()) / (len(waves) - wi)
            procs = {}
            for gi, m in enumerate(wave):
                cmd = [sys.executable, "-m", "nsa_flex.train", "--job.config_file", str(CONFIG),
                       "--model.name", m, "--job.dump_folder", str(work / m),
                       "--training.steps", str(steps), "--checkpoint.interval", str(interval),
                       "--validation.freq", str(val_freq), "--metrics.disable_color_printing",
                       *a.train_arg]
                procs[m] = launch(cmd, out / m / "train.log", gi % gpus if gpus else None, threads)
                where = f"GPU {gi % gpus}" if gpus else "the CPU"
                log(f"training {m} on {where} until +{deadline - t0:.0f}s: {' '.join(cmd[1:])}")
            outcomes.update(wait_all(procs, deadline))

    # 3. evaluate
    ckpts = {m: latest_checkpoint(work / m) for m in a.models}
    eval_end = time.time() + a.eval_s
    procs = {}
    for gi, m in enumerate(m for m in a.models if ckpts[m]):
        cmd = [sys.executable, "-m", "nsa_flex.eval", "--config", str(CONFIG), "--model", m,
               "--checkpoint", str(ckpts[m]), "--lengths", *map(str, a.lengths),
               "--depths", *map(str, a.depths), "--samples", str(a.samples),
               "--time-limit", str(max(10.0, a.eval_s - 50)), "--out", str(out / m / "eval"),
               *a.eval_arg]
        procs[m] = launch(cmd, out / m / "eval.log", gi % gpus if gpus else None,
                          max(1, (os.cpu_count() or 1) // len(a.models)))
        log(f"evaluating {m} ({ckpts[m].name})" + (f" on GPU {gi % gpus}" if gpus else " on the CPU"))
    for m in a.models:
        if not ckpts[m]:
            log(f"{m}: no checkpoint to evaluate")
    eval_outcomes = wait_all(procs, eval_end)

    # 4. plot and summarise
    results, summary = [], {"time_s": a.time_s, "gpus": gpus, "steps": steps, "models": {}}
    for m in a.models:
        entry = {"train_outcome": outcomes.get(m), "train": train_log_summary(out / m / "train.log"),
                 "checkpoint": str(ckpts[m]) if ckpts[m] else None,
                 "eval_outcome": eval_outcomes.get(m)}
        rj = out / m / "eval" / "retrieval.json"
        if rj.exists():
            data = json.loads(rj.read_text())
            results.append(data)
            entry["cells"] = data["cells"]
        summary["models"][m] = entry
    summary["seconds"] = time.time() - t0
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "summary.md").write_text(summary_md(summary))
    if any(s["train"]["curve"] for s in summary["models"].values()):
        loss_plot(summary, out / "loss.png")
    if results:
        from nsa_flex.eval.plot import heatmaps

        heatmaps(results, out / "quality.png")
    png = f", {out / 'quality.png'}" if results else ""
    log(f"wrote {out / 'summary.md'}, {out / 'summary.json'}{png} in {time.time() - t0:.0f}s")
    print((out / "summary.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
