#!/usr/bin/env python
"""Same as `prolong-nemo convert megatron-to-hf ...` (thin entry point)."""

import sys

from prolong_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "megatron-to-hf", *sys.argv[1:]]))
