"""prolong-nemo: the ProLong long-context recipe for Llama-3 on Megatron-Core / NeMo Framework."""

__version__ = "0.1.0"
