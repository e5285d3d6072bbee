"""Neuron groups and their placement: groups of a transformer layer, their importance and the
low-rank predictor (``partition``); the PLR-aware balancer, its exact oracle, the loss monitor
and the cluster simulator (``balancer``, over the C++ of ``include/halo/sched``).
"""

from . import partition
from .balancer import Device, Monitor, Plan, SimResult, balance, evaluate, oracle, simulate

__all__ = ["Device", "Monitor", "Plan", "SimResult", "balance", "evaluate", "oracle", "partition", "simulate"]
