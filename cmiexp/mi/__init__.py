"""Mutual-information estimators: variational bounds on critic score matrices, critics, and
one-call estimators (:func:`estimate_mi`, :func:`ba_bound_discrete`)."""

from cmiexp.mi.bounds import (
    ESTIMATORS,
    MineEMA,
    diag_mean,
    dv_bound,
    infonce_bound,
    js_bound,
    logmeanexp_offdiag,
    mine_objective,
    nwj_bound,
    readout,
    smile_objective,
    smile_readout,
    training_objective,
)
from cmiexp.mi.critics import (
    ConcatCritic,
    SeparableCritic,
    StackedConcatCritic,
    StackedSeparableCritic,
    make_stacked_critic,
)
from cmiexp.mi.estimate import ba_bound_discrete, entropy_from_labels, estimate_mi
from cmiexp.mi.negatives import derangement, shuffled_pairs

__all__ = [
    "ESTIMATORS", "MineEMA", "diag_mean", "dv_bound", "infonce_bound", "js_bound", "logmeanexp_offdiag",
    "mine_objective", "nwj_bound", "readout", "smile_objective", "smile_readout", "training_objective",
    "ConcatCritic", "SeparableCritic", "StackedConcatCritic", "StackedSeparableCritic", "make_stacked_critic",
    "ba_bound_discrete", "entropy_from_labels", "estimate_mi", "derangement", "shuffled_pairs",
]
