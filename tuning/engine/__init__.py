"""One run: its parts, the train step, layouts, checkpoints, run files, multi-host."""
