"""Which process this is under torchrun/accelerate (DDP, FSDP, DeepSpeed).

lorakit never runs its own distributed engine: the launcher starts one process per device and
the Trainer does the rest. The core only needs to know the local device and to let rank 0
alone write to the run folder.
"""

from __future__ import annotations

import os


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main() -> bool:
    return rank() == 0
