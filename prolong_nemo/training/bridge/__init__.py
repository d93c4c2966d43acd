"""The Megatron-Bridge backend: Bridge's `pretrain()` with megatron-core's DDP, distributed
optimizer and Transformer Engine, one process per GPU under torchrun.

- `sections.py`: a recipe as plain keyword arguments of the `ConfigContainer` sections (no Bridge import);
- `config.py`: the dataset provider, the model provider and the `ConfigContainer` (imports Bridge);
- `callbacks.py`: stage chaining, progress log, SIGTERM trap (Bridge 0.5), model record;
- `main.py`: one rank's entry (`recipes/bridge_entry.py` calls it);
- `torchrun.py`: `prolong-nemo train` on a GPU node starts torchrun with the job environment.
"""
