"""Weights & Biases logging: the scalars of ``metrics.jsonl`` under TensorBoard's tag names.

Optional: ``logging.wandb_project`` (``--wandb-project``) turns it on, ``pip install wandb`` provides it,
and ``validate`` has already checked that wandb imports before this module opens a run. Only the
logging rank opens one. W&B's own environment variables work as usual: ``WANDB_MODE=offline`` keeps
the run on disk for ``wandb sync``, ``WANDB_API_KEY`` logs in on a cluster node.

A resumed run goes on logging into the W&B run it started: the first start writes the run's id to
``<checkpoint.save>/wandb_run_id`` (beside ``metrics.jsonl``), and a later start that resumes from a
checkpoint with the same ``checkpoint.save`` passes that id back to ``wandb.init`` (``resume="allow"``).
A start from step 0 is a new run and replaces the file; deleting the file makes the next resume a new run.
"""

from __future__ import annotations

from pathlib import Path

from megafim.checkpoint.files import write_text_atomic
from megafim.training.config import ConfigError, TrainConfig, to_dict

RUN_ID_FILE = "wandb_run_id"


def saved_run_id(save: str) -> str | None:
    """The W&B run id that an earlier start with this ``checkpoint.save`` recorded, or None."""
    path = Path(save) / RUN_ID_FILE if save else None
    if path is None or not path.is_file():
        return None
    return path.read_text(encoding="utf-8").strip() or None


class WandbRun:
    """One W&B run; ``log`` takes the ``{tag: value}`` scalars of one step (``metrics.scalar_tags``)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg: TrainConfig, resuming: bool = False) -> "WandbRun | None":
        """Start the run of ``cfg`` (None when ``logging.wandb_project`` is empty). The run's config is
        the effective trainer config, so W&B can compare runs by their settings. ``resuming``: the
        trainer goes on from a checkpoint; then the run ``checkpoint.save`` recorded (if any) continues."""
        lg = cfg.logging
        if not lg.wandb_project:
            return None
        import wandb

        save_dir = lg.wandb_save_dir or cfg.checkpoint.save or None  # W&B writes under <save_dir>/wandb
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        run_id = saved_run_id(cfg.checkpoint.save) if resuming else None
        try:
            run = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name or None, dir=save_dir,
                             config=to_dict(cfg), id=run_id, resume="allow" if run_id else None)
        except wandb.errors.Error as exc:  # not logged in, an unknown project or entity, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"logging.wandb_project {lg.wandb_project!r}: W&B could not start the run: "
                              f"{first}") from None
        if cfg.checkpoint.save and run.id != run_id:
            Path(cfg.checkpoint.save).mkdir(parents=True, exist_ok=True)
            write_text_atomic(Path(cfg.checkpoint.save) / RUN_ID_FILE, run.id + "\n")
        return cls(run)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self, exit_code: int = 0) -> None:
        """Finish the run; a non-zero ``exit_code`` (the trainer's, 1 when it raised) marks it failed."""
        self.run.finish(exit_code=exit_code)
