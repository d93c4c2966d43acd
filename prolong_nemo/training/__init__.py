"""Running a recipe: `prolong-nemo train` and the two backends that execute it.

`recipes/` describes a run; this package runs it. Shared by both backends, each in one file:
`run.py` (the run a recipe describes: start point, step options), `start.py` (resume /
chain / weights / fresh, decided from the checkpoint directory), `schedule.py` (a stage's LR
schedule and its restart when chaining), `progress.py` (the progress line), `data.py` (the
recipe's mixture as datasets), `forward_step.py` (the batch -> model -> loss step), `run_lock.py`
(one run per checkpoint directory). Backends: `bridge/` (Megatron-Bridge, GPUs) and `cpu/`
(megatron-core on gloo); `train.py` picks one (`BACKENDS`). `commands.py` is the CLI.
"""
