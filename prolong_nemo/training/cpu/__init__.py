"""The CPU backend: megatron-core's model and schedules on gloo, for tests and the demo.

- `config.py`: a recipe -> the runner's `TrainConfig` and dataset;
- `runner.py`: the loop (megatron-core forward/backward, plain-PyTorch DDP and AdamW stand-ins);
- `main.py`: a recipe's start point applied to the runner's state, and the run.
"""
