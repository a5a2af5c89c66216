"""The one question the models and the loop ask torch.distributed: is there a process group?"""

from __future__ import annotations

import torch.distributed as dist


def is_distributed() -> bool:
    """True under DDP (Ray Train workers with a process group); False in one process (a tune trial, a test)."""
    return dist.is_available() and dist.is_initialized()
