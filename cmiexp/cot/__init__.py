"""Chain-of-thought distillation building blocks (Distilling Step-by-Step, MI-CoT).

- ``safe_eval`` / ``svamp_correct`` (``cmiexp.cot.safe_eval``): bounded arithmetic evaluator for
  SVAMP equations, replacing DSS's Python ``eval``.
- ``mi_loss_reference`` / ``mi_loss_masked`` (``cmiexp.cot.mi_term``): the MI-CoT term as
  published, and a masked ablation.
- ``expected_calibration_error`` (``cmiexp.cot.calibration``): equal-width-bin ECE.

The data loader lives in ``cmiexp.data.cot``. Names are imported lazily so that the evaluator
can be used without importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "safe_eval": "cmiexp.cot.safe_eval",
    "svamp_correct": "cmiexp.cot.safe_eval",
    "mi_loss_reference": "cmiexp.cot.mi_term",
    "mi_loss_masked": "cmiexp.cot.mi_term",
    "expected_calibration_error": "cmiexp.cot.calibration",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'cmiexp.cot' has no attribute {name!r}")
