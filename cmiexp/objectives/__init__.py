from cmiexp.objectives.base import Objective, TrainContext, available_objectives, build_objective, register_objective

__all__ = ["Objective", "TrainContext", "available_objectives", "build_objective", "register_objective"]
