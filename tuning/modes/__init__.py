"""What main.py runs: the train and eval modes, and experiments of stages."""
