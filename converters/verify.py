#!/usr/bin/env python
"""Same as `prolong-nemo convert verify ...` (thin entry point)."""

import sys

from prolong_nemo.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", "verify", *sys.argv[1:]]))
