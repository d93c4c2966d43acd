#!/usr/bin/env python
"""Same as `prolong-nemo convert hf-to-megatron ...` (thin entry point)."""

import sys

from prolong_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "hf-to-megatron", *sys.argv[1:]]))
