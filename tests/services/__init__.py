"""Real services started by test fixtures (a single-host Slurm cluster, ...)."""
