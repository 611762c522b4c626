"""Probes that read information-theoretic quantities off trained models (FlowNIB)."""

from cmiexp.probes.flownib import *  # noqa: F401,F403 - the public API of the FlowNIB probe
from cmiexp.probes.flownib import __all__  # noqa: F401
