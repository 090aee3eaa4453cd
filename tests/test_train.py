"""End to end on CPU: ``python -m nsa_flex.train --job.config_file configs/debug.toml``.

A short run (loss falls, validation runs, checkpoints are written), and the same run stopped and
resumed from its checkpoint, which must log the same losses step for step; plus the launcher's
helpers and configuration errors through the command line.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchtitan")

from nsa_flex import train as launcher  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
STEP = re.compile(r"(?<!validate )step:\s+(\d+)\s+loss:\s+([0-9.]+)")
VALIDATE = re.compile(r"validate step:\s+(\d+)\s+loss:\s+([0-9.]+)")


def run_train(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "nsa_flex.train", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def losses(log: str, pattern=STEP) -> dict[int, float]:
    return {int(s): float(v) for s, v in pattern.findall(log)}


def test_debug_config_trains_checkpoints_and_resumes_exactly(tmp_path):
    """The main job: the loss falls, validation runs, checkpoints are written. A run stopped at
    step 20 and resumed from its checkpoint logs the same losses, step for step, as a run that
    never stopped (a constant learning rate after warm-up, so both see one schedule)."""
    common = ["--job.config_file", "configs/debug.toml", "--metrics.log_freq", "1",
              "--metrics.disable_color_printing", "--checkpoint.interval", "10",
              "--validation.freq", "10", "--validation.steps", "2", "--lr_scheduler.decay_ratio", "0",
              "--debug.seed", "0"]
    whole = run_train(*common, "--job.dump_folder", str(tmp_path / "whole"), "--training.steps", "26")
    log = whole.stdout + whole.stderr
    assert whole.returncode == 0, log[-4000:]
    curve = losses(log)
    assert sorted(curve) == list(range(1, 27)), log[-3000:]
    assert curve[1] > 8.0  # about ln(8192) from a fresh model
    assert sum(curve[s] for s in range(22, 27)) / 5 < curve[1] - 0.5, curve
    val = losses(log, VALIDATE)
    assert set(val) == {1, 10, 20} and val[20] < val[1] - 0.5, val

    part = tmp_path / "stopped"
    first = run_train(*common, "--job.dump_folder", str(part), "--training.steps", "20")
    log1 = first.stdout + first.stderr
    assert first.returncode == 0, log1[-4000:]
    assert {p.name for p in (part / "checkpoint").iterdir()} >= {"step-10", "step-20"}
    second = run_train(*common, "--job.dump_folder", str(part), "--training.steps", "26")
    log2 = second.stdout + second.stderr
    assert second.returncode == 0, log2[-4000:]
    assert "Training starts at step 21" in log2
    resumed = {**losses(log1), **losses(log2)}
    assert sorted(losses(log2)) == list(range(21, 27)), log2[-3000:]
    assert resumed == curve, {s: (resumed.get(s), curve[s]) for s in curve if resumed.get(s) != curve[s]}


def test_bad_configs_stop_at_start_with_a_message(tmp_path):
    out = run_train("--job.dump_folder", str(tmp_path), "--model.flavor", "huge", timeout=300)
    assert out.returncode != 0
    assert "unknown flavor 'huge' for model 'nsa'" in out.stderr + out.stdout
    out = run_train("--job.dump_folder", str(tmp_path), "--nsa.cmp_stride", "5",
                    "--training.seq_len", "256", timeout=300)
    assert out.returncode != 0
    text = out.stderr + out.stdout
    assert "cmp_stride d=5 must divide cmp_block l=16" in text
    assert "Training starts" not in text


def test_single_process_env_defaults():
    env: dict[str, str] = {}
    launcher.single_process_env(env)
    assert (env["RANK"], env["LOCAL_RANK"], env["WORLD_SIZE"]) == ("0", "0", "1")
    assert env["MASTER_ADDR"] == "127.0.0.1" and 0 < int(env["MASTER_PORT"]) < 65536
    # a launcher's environment is kept
    env = {"RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "2", "MASTER_ADDR": "10.0.0.1",
           "MASTER_PORT": "1234"}
    launcher.single_process_env(env)
    assert env["RANK"] == "1" and env["MASTER_PORT"] == "1234"
    with pytest.raises(RuntimeError, match="partial launcher environment"):
        launcher.single_process_env({"RANK": "0"})


def test_prepare_argv_defaults():
    argv = launcher.prepare_argv(["--training.steps", "3"])
    assert argv[argv.index("--job.config_file") + 1] == str(REPO / "configs" / "debug.toml")
    assert "nsa_flex.job_config" in argv
    argv = launcher.prepare_argv(["--job.config_file=configs/100m.toml"])
    assert argv.count("--job.config_file") == 0 and "--job.config_file=configs/100m.toml" in argv


def _job_config(*args: str):
    from torchtitan.config.manager import ConfigManager

    return ConfigManager().parse_args(["--job.config_file", str(REPO / "configs/1b.toml"), *args])


def test_unchecked_checkpointing_in_a_compiled_model_is_refused_where_flex_runs():
    from nsa_flex.titan import check_compile_with_checkpointing

    shipped = _job_config()
    assert shipped.activation_checkpoint.mode == "selective"
    assert shipped.activation_checkpoint.selective_ac_option == "op"
    assert "model" in shipped.compile.components
    check_compile_with_checkpointing(shipped, flex=True)        # the 1b config as shipped runs
    for args in [("--activation_checkpoint.mode", "none"), ("--activation_checkpoint.mode", "full"),
                 ("--activation_checkpoint.selective_ac_option", "2")]:   # checked on a GPU
        check_compile_with_checkpointing(_job_config(*args), flex=True)
    args = ("--activation_checkpoint.mode", "memory_budget")
    bad = _job_config(*args)
    with pytest.raises(ValueError, match=r"activation_checkpoint.mode='memory_budget' and "
                       r"compile.components=\['model', 'loss'\].*tools/check_model.py"):
        check_compile_with_checkpointing(bad, flex=True)
    check_compile_with_checkpointing(bad, flex=False)          # the CPU dense path is not affected
    check_compile_with_checkpointing(                          # an eager model is not affected
        _job_config(*args, "--compile.components", "loss"), flex=True)
