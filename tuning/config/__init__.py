"""Experiment configs: the defaults, loading with overrides, checks, durations."""
