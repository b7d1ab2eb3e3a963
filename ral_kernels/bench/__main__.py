"""``python -m ral_kernels.bench`` = ``ral-bench``."""

import sys

from .cli import main

if __name__ == "__main__":  # the CPU workers are spawned and import the main module again
    sys.exit(main())
