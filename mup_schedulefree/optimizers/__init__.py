"""Schedule-free optimizers: primal (train/eval), closure, reference and wrapper forms."""
from .adamc_plus import AdamCScheduleFreePlus, AdamCScheduleFreePlusPaper
from .adamw import AdamWScheduleFree, AdamWScheduleFreeClosure
from .adamw_paper import AdamWScheduleFreePaper
from .composite import ComposedOptimizer
from .radam import RAdamScheduleFree, RAdamScheduleFreeClosure
from .reference import (AdamWScheduleFreePaperReference, AdamWScheduleFreeReference, RAdamScheduleFreeReference,
                        ScheduleFreeWrapperReference, SGDScheduleFreeReference)
from .sgd import SGDScheduleFree, SGDScheduleFreeClosure
from .wrapper import ScheduleFreeWrapper

__all__ = [
    "AdamCScheduleFreePlus",
    "AdamCScheduleFreePlusPaper",
    "AdamWScheduleFree",
    "AdamWScheduleFreeClosure",
    "AdamWScheduleFreePaper",
    "AdamWScheduleFreePaperReference",
    "AdamWScheduleFreeReference",
    "ComposedOptimizer",
    "RAdamScheduleFree",
    "RAdamScheduleFreeClosure",
    "RAdamScheduleFreeReference",
    "SGDScheduleFree",
    "SGDScheduleFreeClosure",
    "SGDScheduleFreeReference",
    "ScheduleFreeWrapper",
    "ScheduleFreeWrapperReference",
]
