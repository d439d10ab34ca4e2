"""Training: typed config, DeepSpeed engine set-up, the loop, checkpoints and logging."""
