"""``objective=kd``: knowledge distillation from a frozen teacher.

* ``objective``    the loss (``kd_loss``) and the objective the trainer builds
* ``teacher``      finding, checking, provisioning (train on demand or reuse) and loading teachers
* ``logit_cache``  the teacher's training-set logits, computed once and kept with the teacher
"""

from cmiexp.objectives.kd.objective import KnowledgeDistillation, kd_loss

__all__ = ["KnowledgeDistillation", "kd_loss"]
