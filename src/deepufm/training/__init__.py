"""Training deep UFMs to collapse: fast full-batch gradient descent, probes, checkpoints, resume."""
