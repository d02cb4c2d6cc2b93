"""Hyperparameter sweeps: the search space, the trial runner, the report."""
