"""The mutual-information term of MI-CoT distillation (Chen et al., 2024), and a masked ablation.

Both functions take the decoder logits of the two DSS branches of one batch (same inputs, one
with the ``"predict: "`` prefix and one with ``"explain: "``): ``predict_logits [B, Tp, V]``
and ``explain_logits [B, Te, V]``. Tp and Te differ (label vs rationale lengths); the vocabulary
V must match. Each returns a scalar to be added as ``beta * term`` to the DSS loss.

``mi_loss_reference`` reproduces the authors' public code term for term, including its quirks,
so that results are comparable with the paper; ``mi_loss_masked`` is the cleaned-up variant
for ablations. Pure functions: no model, no training loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_shapes(predict_logits: torch.Tensor, explain_logits: torch.Tensor) -> None:
    if predict_logits.dim() != 3 or explain_logits.dim() != 3:
        raise ValueError(
            "mi term expects logits shaped [batch, positions, vocab]; got "
            f"{tuple(predict_logits.shape)} and {tuple(explain_logits.shape)}"
        )
    if predict_logits.shape[0] != explain_logits.shape[0]:
        raise ValueError(
            f"batch sizes differ: predict {predict_logits.shape[0]} vs explain {explain_logits.shape[0]}"
        )
    if predict_logits.shape[2] != explain_logits.shape[2]:
        raise ValueError(
            f"vocab sizes differ: predict {predict_logits.shape[2]} vs explain {explain_logits.shape[2]}"
        )


def mi_loss_reference(predict_logits: torch.Tensor, explain_logits: torch.Tensor) -> torch.Tensor:
    """The MI-CoT term exactly as in the public code.

    With ``s_b = max_t softmax(predict_logits[b, t])`` (element-wise max over positions, detached)
    and ``e_b = max_t softmax(explain_logits[b, t])``, both over ALL positions (padding included,
    since the public code pools the raw decoder outputs of the padded batch)::

        L = mean_b [ - sum_v s_b[v] * log_softmax(e_b)[v] ]

    i.e. ``F.cross_entropy(e, s)`` with soft targets. Quirks kept on purpose: ``e_b`` is already
    a vector of probabilities and cross-entropy applies a second softmax to it; neither pooled
    vector sums to 1; padded positions take part in the max. Gradient flows only into
    ``explain_logits``.
    """
    _check_shapes(predict_logits, explain_logits)
    pred_vec = predict_logits.detach().softmax(dim=-1).amax(dim=-2)  # [B, V]
    expl_vec = explain_logits.softmax(dim=-1).amax(dim=-2)  # [B, V]
    return F.cross_entropy(expl_vec, pred_vec)


def _masked_log_max_pool(logits: torch.Tensor, mask: torch.Tensor, name: str) -> torch.Tensor:
    """log of max over unmasked positions of softmax(logits): [B, T, V] -> [B, V].

    Computed in log space (log is monotone, so max and log commute) to stay finite where a
    probability underflows in float32.
    """
    if mask.shape != logits.shape[:2]:
        raise ValueError(f"{name} mask shape {tuple(mask.shape)} != logits [B, T] {tuple(logits.shape[:2])}")
    keep = mask.to(torch.bool)
    if not bool(keep.any(dim=1).all()):
        raise ValueError(f"{name} mask has a row with no unmasked position")
    logp = logits.log_softmax(dim=-1)
    logp = logp.masked_fill(~keep.unsqueeze(-1), float("-inf"))
    return logp.amax(dim=-2)


def mi_loss_masked(
    predict_logits: torch.Tensor,
    explain_logits: torch.Tensor,
    predict_mask: torch.Tensor,
    explain_mask: torch.Tensor,
) -> torch.Tensor:
    """Ablation of the MI term: padding masked, proper distributions, a single softmax.

    Masks are ``[B, Tp]`` / ``[B, Te]`` (bool or 0/1; 1 = real target token). For each branch
    the per-position vocabulary distributions are max-pooled over the unmasked positions only,
    ``m_b[v] = max_{t: mask[b,t]} softmax(logits[b, t])[v]``, and renormalised into a
    distribution ``q_b = m_b / sum_v m_b[v]``. With ``p_b`` the predict-side ``q_b`` (detached)
    and ``r_b`` the explain-side one::

        L = mean_b [ - sum_v p_b[v] * log r_b[v] ]

    the cross-entropy H(p, r) between the two pooled distributions (no second softmax).
    Gradient flows only into ``explain_logits``. Values at masked positions have no effect.
    """
    _check_shapes(predict_logits, explain_logits)
    log_m_pred = _masked_log_max_pool(predict_logits.detach(), predict_mask, "predict")
    log_m_expl = _masked_log_max_pool(explain_logits, explain_mask, "explain")
    p = (log_m_pred - torch.logsumexp(log_m_pred, dim=-1, keepdim=True)).exp()
    log_r = log_m_expl - torch.logsumexp(log_m_expl, dim=-1, keepdim=True)
    return -(p * log_r).sum(dim=-1).mean()
