"""Tasks: what is learnt and how it is measured (see base.py, registry.py)."""
