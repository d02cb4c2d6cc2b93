"""Finished runs and what combines them: ensembles, soups, distillation teachers."""
