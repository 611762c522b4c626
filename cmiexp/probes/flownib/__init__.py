"""FlowNIB information-plane probe (Kowsher et al., "An Information Bottleneck Analysis of
Bidirectional vs. Unidirectional Language Models") on cached activations.

For a model, X (pooled embedding-layer output), Z_l (pooled hidden state of layer l) and Y (label)
are cached once; per layer two critics estimate I(X;Z_l) and I(Z_l;Y) under an alpha schedule
that moves weight from the first to the second, and each layer's Optimal Information Coordinate
(OIC) is the trajectory point maximising gamma*x + (1-gamma)*y, gamma = R_y / (R_x + R_y).

Modules: ``geometry`` (d_eff, alpha, OIC), ``activations`` (pooling, the cached forward pass),
``fit`` (critic training with validation selection and test readout), ``result`` (the result
and its self-check against MI bounds), ``reference`` (the authors' released pipeline, for
side-by-side comparison), ``outputs`` (json, csv, figures).

Deliberate differences from the public reference code (``objective.compat=reference`` restores
it; the README's FlowNIB table lists each one):
* the critics see the cached Z_l itself (the reference trains a shared encoder of X instead);
* pooling respects the attention mask (no averaging over padding);
* class ids are one-hot encoded (never ordinal floats);
* trajectory points are read on a fixed validation batch, the reported numbers on untouched
  test pairs with the best-on-validation critics (not the last training minibatch);
* every off-diagonal pair of a batch is a negative (no single permutation with fixed points).
Values are reported in raw nats; the d_eff^2 division only weights the training loss.
"""

from cmiexp.probes.flownib.activations import (
    POOLINGS,
    check_pool_inputs,
    cls_pool,
    extract_activations,
    last_token_pool,
    masked_mean_pool,
    pool,
)
from cmiexp.probes.flownib.fit import train_flownib, train_flownib_single_layer
from cmiexp.probes.flownib.geometry import (
    alpha_schedule,
    covariance_eigenvalues,
    effective_dims,
    participation_ratio,
    select_oic,
    shannon_effective_dim,
)
from cmiexp.probes.flownib.outputs import (
    compare_runs,
    plot_deff,
    plot_information_plane,
    plot_oic_by_layer,
    write_outputs,
)
from cmiexp.probes.flownib.result import FlowNIBResult, as_result_dict, check_estimates, summary_line

__all__ = [
    "FlowNIBResult", "POOLINGS", "alpha_schedule", "as_result_dict", "check_estimates", "check_pool_inputs",
    "cls_pool", "compare_runs", "covariance_eigenvalues", "effective_dims", "extract_activations",
    "last_token_pool", "masked_mean_pool", "participation_ratio", "plot_deff", "plot_information_plane",
    "plot_oic_by_layer", "pool", "select_oic", "shannon_effective_dim", "summary_line", "train_flownib",
    "train_flownib_single_layer", "write_outputs",
]
