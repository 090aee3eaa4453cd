"""Run a test script that launches Triton kernels: on a CUDA machine on the GPU, elsewhere under
Triton's interpreter on the CPU. In a subprocess, since the interpreter is chosen when triton is
first imported. The script reads its device from the environment variable ``device_var`` and
prints "ok" last."""

import os
import subprocess
import sys
from pathlib import Path

import torch


def run_triton_script(script: str, device_var: str, timeout: int = 600) -> None:
    root = Path(__file__).resolve().parent.parent
    path = [str(root), str(root / "tests"), os.environ.get("PYTHONPATH", "")]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    if torch.cuda.is_available():
        env[device_var] = "cuda"
        env.pop("TRITON_INTERPRET", None)
    else:
        env.update({device_var: "cpu", "TRITON_INTERPRET": "1"})
    r = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr
