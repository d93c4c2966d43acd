"""One rank of a Megatron-Bridge ProLong training job (run under torchrun in an NGC container).

    torchrun --nproc-per-node 8 recipes/bridge_entry.py stage_64k [hydra overrides]

Bridge's own scripts/training/run_recipe.py only knows Bridge's recipe registry, so the
plugin has this entry: recipe -> ConfigContainer -> pretrain(cfg, forward_step, callbacks).
"""

import sys

if __name__ == "__main__":
    # Imported here, not at the top: megatron's checkpoint writer starts helper processes with
    # the "spawn" method, which re-imports this file, and Bridge takes tens of seconds to import.
    from prolong_nemo.training.bridge.main import main

    sys.exit(main(sys.argv[1:]))
