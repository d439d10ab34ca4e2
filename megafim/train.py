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
        # Every rank finds the same error; under torchrun only rank 0 prints it, and every rank exits 2.
        if os.environ.get("RANK", "0") == "0":
            print(f"megafim.train: error: {exc}", file=sys.stderr)
        return 2


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
