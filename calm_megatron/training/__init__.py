"""The training side: optimizer and schedule, the DeepSpeed-driven loop, logging and checkpoints."""
