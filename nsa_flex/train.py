"""``python -m nsa_flex.train [torchtitan flags]``: torchtitan's trainer with the ``nsa`` model.

Runs as one process without torchrun (it sets RANK/LOCAL_RANK/WORLD_SIZE/MASTER_ADDR/
MASTER_PORT when they are missing, on a free port), registers the ``nsa`` TrainSpec, uses
device cpu with gloo when torch sees no accelerator, and calls torchtitan's ``main``. Under
torchrun the launcher's environment is kept. Without ``--job.config_file`` it uses the
repository's ``configs/debug.toml`` (the embedded, offline default) when it can find it.
"""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "debug.toml"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def single_process_env(environ=os.environ) -> None:
    """Fill in the variables torchrun would set, for a world of one process."""
    if "RANK" in environ or "LOCAL_RANK" in environ or "WORLD_SIZE" in environ:
        missing = [k for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE") if k not in environ]
        if missing:
            raise RuntimeError(f"partial launcher environment: {', '.join(missing)} unset "
                               f"(run under torchrun, or unset RANK/LOCAL_RANK/WORLD_SIZE)")
        environ.setdefault("MASTER_ADDR", "127.0.0.1")
        environ.setdefault("MASTER_PORT", str(free_port()))
        return
    environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                   GROUP_RANK="0", ROLE_RANK="0", ROLE_WORLD_SIZE="1")
    environ.setdefault("MASTER_ADDR", "127.0.0.1")
    environ.setdefault("MASTER_PORT", str(free_port()))


def _has_flag(argv: list[str], *names: str) -> bool:
    return any(a == n or a.startswith(n + "=") for a in argv for n in names)


def prepare_argv(argv: list[str]) -> list[str]:
    argv = list(argv)
    if not _has_flag(argv, "--job.config_file", "--job.config-file"):
        if not DEFAULT_CONFIG.exists():
            raise SystemExit("nsa_flex.train: no --job.config_file given and the default "
                             f"{DEFAULT_CONFIG} is not there; pass a config, e.g. "
                             "--job.config_file configs/debug.toml from the repository")
        argv = ["--job.config_file", str(DEFAULT_CONFIG)] + argv
    if not _has_flag(argv, "--job.custom_config_module", "--job.custom-config-module"):
        # the [nsa] section / --nsa.* flags; harmless when the TOML names it too
        argv = ["--job.custom_config_module", "nsa_flex.job_config"] + argv
    return argv


def main(argv: list[str] | None = None) -> None:
    argv = prepare_argv(sys.argv[1:] if argv is None else argv)
    single_process_env()
    sys.argv = [sys.argv[0]] + argv  # torchtitan's ConfigManager reads sys.argv

    from torchtitan.config.manager import ConfigManager

    # parse_args's default (sys.argv[1:]) was bound when torchtitan was imported
    ConfigManager.parse_args.__defaults__ = (argv,)
    import torchtitan.train as titan_train

    from nsa_flex.titan import register

    register()
    titan_train.main(titan_train.Trainer)


if __name__ == "__main__":
    main()
