"""Schedule-free optimizers: primal (train/eval), closure, reference and wrapper forms."""
from .adamw import AdamWScheduleFree, AdamWScheduleFreeClosure
from .radam import RAdamScheduleFree, RAdamScheduleFreeClosure
from .reference import AdamWScheduleFreeReference, SGDScheduleFreeReference
from .sgd import SGDScheduleFree, SGDScheduleFreeClosure
from .wrapper import ScheduleFreeWrapper

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
