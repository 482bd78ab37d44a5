"""The training loop, checkpoints and metric logs."""
