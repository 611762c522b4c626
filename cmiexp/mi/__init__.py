"""Mutual-information estimators: variational bounds on critic score matrices, critics, closed
forms (Gaussian, Gaussian copula), KSG, and the one-call estimators (:func:`estimate_mi`, whose
default ``auto`` chooses among them on validation data, and :func:`ba_bound_discrete`)."""

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
from cmiexp.mi.closed_form import GaussianCritic, copula_normalize, gaussian_mi
from cmiexp.mi.estimate import MIEstimate, ba_bound_discrete, entropy_from_labels, estimate_mi
from cmiexp.mi.knn import ksg_mi
from cmiexp.mi.negatives import derangement, shuffled_pairs

__all__ = [
    "ESTIMATORS", "MineEMA", "diag_mean", "dv_bound", "infonce_bound", "js_bound", "logmeanexp_offdiag",
    "mine_objective", "nwj_bound", "readout", "smile_objective", "smile_readout", "training_objective",
    "ConcatCritic", "SeparableCritic", "StackedConcatCritic", "StackedSeparableCritic", "make_stacked_critic",
    "ba_bound_discrete", "entropy_from_labels", "estimate_mi", "derangement", "shuffled_pairs",
    "GaussianCritic", "MIEstimate", "copula_normalize", "gaussian_mi", "ksg_mi",
]
