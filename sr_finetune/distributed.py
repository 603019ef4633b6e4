"""Process-group helpers shared by the sharded stages."""

from __future__ import annotations

import logging
import os

logger = logging.getLogger(__name__)

CPU_LAUNCH_HINT = (
    "accelerate's --cpu launcher starts a single process (several CPU processes need mpirun); "
    "for N CPU processes over gloo use: accelerate launch --multi_gpu --num_processes N <recipe> device=cpu"
)


def warn_if_single_cpu_launch() -> bool:
    """Warn when ``accelerate launch --cpu --num_processes N>1`` silently ran one process."""
    launched_for_many = "MASTER_ADDR" in os.environ and "WORLD_SIZE" not in os.environ
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() == "true" and launched_for_many:
        logger.warning(CPU_LAUNCH_HINT)
        return True
    return False
