"""Fine-tuning methods: optimizers, LoRA, EMA, early stopping, parameter naming rules."""
