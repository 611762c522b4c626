"""Probes that read information-theoretic quantities off trained models (FlowNIB).

The FlowNIB API (``cmiexp.probes.flownib``) is handed on lazily, so that importing
``cmiexp.probes.inputs`` (the probe job's file-only checks) does not import torch."""

from importlib import import_module


def __getattr__(name):
    flownib = import_module("cmiexp.probes.flownib")
    if name in flownib.__all__:
        return getattr(flownib, name)
    raise AttributeError(f"module 'cmiexp.probes' has no attribute {name!r}")
