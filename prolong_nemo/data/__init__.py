"""ProLong data: MDS shards -> packed THD rows for Megatron (see docs/batch-contract.md)."""
