"""Checkpoint formats from elsewhere: Hugging Face safetensors, GGUF, their tokenizers."""
