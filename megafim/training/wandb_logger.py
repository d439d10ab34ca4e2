"""Weights & Biases logging: the scalars of ``metrics.jsonl`` under TensorBoard's tag names.

Optional: ``logging.wandb_project`` (``--wandb-project``) turns it on, ``pip install wandb`` provides it,
and ``validate`` has already checked that wandb imports before this module opens a run. Only the
logging rank opens one. W&B's own environment variables work as usual: ``WANDB_MODE=offline`` keeps
the run on disk for ``wandb sync``, ``WANDB_API_KEY`` logs in on a cluster node.
"""

from __future__ import annotations

from pathlib import Path

from megafim.training.config import ConfigError, TrainConfig, to_dict


class WandbRun:
    """One W&B run; ``log`` takes the ``{tag: value}`` scalars of one step (``metrics.scalar_tags``)."""

    def __init__(self, run):
        self.run = run

    @classmethod
    def open(cls, cfg: TrainConfig) -> "WandbRun | None":
        """Start the run of ``cfg`` (None when ``logging.wandb_project`` is empty). The run's config is
        the effective trainer config, so W&B can compare runs by their settings."""
        lg = cfg.logging
        if not lg.wandb_project:
            return None
        import wandb

        save_dir = lg.wandb_save_dir or cfg.checkpoint.save or None  # W&B writes under <save_dir>/wandb
        if save_dir:
            Path(save_dir).mkdir(parents=True, exist_ok=True)
        try:
            run = wandb.init(project=lg.wandb_project, name=lg.wandb_exp_name or None, dir=save_dir,
                             config=to_dict(cfg))
        except wandb.errors.Error as exc:  # not logged in, an unknown project or entity, ...
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ConfigError(f"logging.wandb_project {lg.wandb_project!r}: W&B could not start the run: "
                              f"{first}") from None
        return cls(run)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        self.run.finish()
