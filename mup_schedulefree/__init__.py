"""Schedule-Free optimizers made correct under muP (Maximal Update Parametrization).

The core optimizers keep the published schedule-free math (Defazio et al., 2024) without its
usual traps; the ``Mu*`` factories split parameter groups by muP's infinite-width shapes and scale
learning rate and weight decay so that hyperparameters tuned at a small width transfer.
"""
from .optimizers import (
    AdamWScheduleFree,
    AdamWScheduleFreeClosure,
    AdamWScheduleFreeReference,
    RAdamScheduleFree,
    RAdamScheduleFreeClosure,
    ScheduleFreeWrapper,
    SGDScheduleFree,
    SGDScheduleFreeClosure,
    SGDScheduleFreeReference,
)

__all__ = [
    "AdamWScheduleFree",
    "AdamWScheduleFreeClosure",
    "AdamWScheduleFreeReference",
    "RAdamScheduleFree",
    "RAdamScheduleFreeClosure",
    "SGDScheduleFree",
    "SGDScheduleFreeClosure",
    "SGDScheduleFreeReference",
    "ScheduleFreeWrapper",
]
__version__ = "0.1.0"
