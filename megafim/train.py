"""Entry point: ``python -m megafim.train --config FILE [overrides]`` (under torchrun for many ranks).

See ``docs/training.md`` and ``python -m megafim.train --help``."""

from __future__ import annotations

import faulthandler
import os
import sys


def main(argv: list[str] | None = None) -> int:
    faulthandler.enable()  # a crash in native code (gloo, a C++ extension) still prints a Python stack
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _has_cuda() else "cuda")
    from megafim.training.cli import config_from_args, dump_yaml
    from megafim.training.config import ConfigError

    try:
        cfg, args = config_from_args(argv)
        if args.help_config:
            from megafim.training.cli import config_reference

            print(config_reference(markdown=args.markdown), end="")
            return 0
        if args.print_config:
            print(dump_yaml(cfg), end="")
            return 0
        from megafim.training.loop import train

        return train(cfg)
    except ConfigError as exc:
        _report_config_error(exc)
        return 2


def _report_config_error(exc: Exception, grace_s: float = 15.0) -> None:
    """Print a config error once per job rather than once per rank.

    Every rank checks the same config, so rank 0 prints and exits at once. The other ranks wait: if
    rank 0 failed too, torchrun stops them within a second and the job shows one line. Exiting at once
    instead raced rank 0, whose line was lost when torchrun killed it first. A rank that is still alive
    after the grace period hit an error of its own (a file missing on its node) and prints it."""
    import time

    if os.environ.get("RANK", "0") != "0" and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        time.sleep(grace_s)
    print(f"megafim.train: error: {exc}", file=sys.stderr, flush=True)


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _exit_without_teardown(code: int) -> None:
    """Leave the process once the run is finished: its checkpoints are written, its logs closed and its
    process groups destroyed. The interpreter's own teardown is skipped on purpose: a gloo worker
    thread that is still releasing a collective's tensors then needs the GIL of an interpreter that is
    finalizing, and the process aborted (``terminate called without an active exception``, rarely: one
    ZeRO-3 run in CI, none in 51 here; docs/platform_notes.md)."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    _exit_without_teardown(main())  # an exception still goes through the normal exit, with its traceback
