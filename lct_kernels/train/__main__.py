"""``python -m lct_kernels.train ...``: the same as ``lct-train`` (and what torchrun runs)."""

import sys

from .cli import train_main

if __name__ == "__main__":
    sys.exit(train_main())
