"""One rank of a Megatron-Bridge ProLong training job (run under torchrun in an NGC container).

    torchrun --nproc-per-node 8 recipes/bridge_entry.py stage_64k [hydra overrides]

Bridge's own scripts/training/run_recipe.py only knows Bridge's recipe registry, so the
plugin has this entry: recipe -> ConfigContainer -> pretrain(cfg, forward_step, callbacks).
"""

import sys

from prolong_nemo.recipes.bridge import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
