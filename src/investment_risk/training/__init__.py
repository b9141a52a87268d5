"""Training: the config, the two tasks, the recipe, checkpoints, metadata, reports and the dry run."""
