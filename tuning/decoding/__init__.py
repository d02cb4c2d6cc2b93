"""Decoding with a trained model: sampling with the KV cache, beam search, batched translation."""
