"""Training: config schema and loading, DeepSpeed setup, the loop, LR schedules, checkpoints and metrics."""
