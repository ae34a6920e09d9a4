"""pytest-benchmark configuration: the device and dtype under test.

    pytest benchmarks/ --benchmark-only                  # CPU, float32
    LCT_BENCH_DEVICE=cuda pytest benchmarks/ ...          # GPU, bfloat16
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(__file__))

DEVICE = os.environ.get("LCT_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}[DEVICE]
ROUNDS = int(os.environ.get("LCT_BENCH_ROUNDS", "30"))
