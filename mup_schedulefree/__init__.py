"""Schedule-Free optimizers made correct under muP (Maximal Update Parametrization).

The core optimizers keep the published schedule-free math (Defazio et al., 2024) without its
usual traps; the ``Mu*`` factories split parameter groups by muP's infinite-width shapes and scale
learning rate and weight decay so that hyperparameters tuned at a small width transfer.
"""
from .optimizers import (
    AdamCScheduleFreePlus,
    AdamCScheduleFreePlusPaper,
    AdamWScheduleFree,
    AdamWScheduleFreeClosure,
    AdamWScheduleFreePaper,
    AdamWScheduleFreePaperReference,
    AdamWScheduleFreeReference,
    ComposedOptimizer,
    RAdamScheduleFree,
    RAdamScheduleFreeClosure,
    RAdamScheduleFreeReference,
    ScheduleFreeWrapper,
    ScheduleFreeWrapperReference,
    SGDScheduleFree,
    SGDScheduleFreeClosure,
    SGDScheduleFreeReference,
)

from .depth import scale_residual_branches
from .factories import (
    MuAdamC_ScheduleFreePlus,
    MuAdamW_ScheduleFree,
    MuAdamW_ScheduleFreeClosure,
    MuAdamW_ScheduleFreePaper,
    MuAdamW_ScheduleFreePaperReference,
    MuAdamW_ScheduleFreeReference,
    MuMuon_ScheduleFree,
    MuRAdam_ScheduleFree,
    MuRAdam_ScheduleFreeClosure,
    MuRAdam_ScheduleFreeReference,
    MuScheduleFreeWrapper,
    MuScheduleFreeWrapperReference,
    MuSGD_ScheduleFree,
    MuSGD_ScheduleFreeClosure,
    MuSGD_ScheduleFreeReference,
    mu_optimizer,
)
from .scaling import mu_param_groups
from .training import eval_mode, load_checkpoint, recalibrate_batchnorm, save_checkpoint, state_dict_at_x

__all__ = [
    "MuAdamC_ScheduleFreePlus",
    "MuAdamW_ScheduleFree",
    "MuAdamW_ScheduleFreeClosure",
    "MuAdamW_ScheduleFreePaper",
    "MuAdamW_ScheduleFreePaperReference",
    "MuAdamW_ScheduleFreeReference",
    "MuMuon_ScheduleFree",
    "MuRAdam_ScheduleFree",
    "MuRAdam_ScheduleFreeClosure",
    "MuRAdam_ScheduleFreeReference",
    "MuSGD_ScheduleFree",
    "MuSGD_ScheduleFreeClosure",
    "MuSGD_ScheduleFreeReference",
    "MuScheduleFreeWrapper",
    "MuScheduleFreeWrapperReference",
    "mu_optimizer",
    "mu_param_groups",
    "scale_residual_branches",
    "eval_mode",
    "save_checkpoint",
    "load_checkpoint",
    "state_dict_at_x",
    "recalibrate_batchnorm",
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
__version__ = "0.2.0"
