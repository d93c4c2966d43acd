"""Llama-3 on Megatron-Core: architecture, attention over packed sequences, loss."""
