"""Kernel tests run on CUDA when present, else in Triton's interpreter on CPU.

TRITON_INTERPRET must be set before Triton is first imported (kernels/_common does the same).
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
