"""Closed-form analysis: Theorem 2's capacity and stability boundary, the fluid growth of the
backlog (:mod:`~llmqueue.analysis.capacity`, paper §4), and the 2-D region under a request cap
(:mod:`~llmqueue.analysis.region`, paper §6, Theorem 10).  Networks' traffic equations are in
:mod:`llmqueue.network.analysis`."""

from llmqueue.analysis.capacity import Analysis, analyze, capacity

__all__ = ["Analysis", "analyze", "capacity"]
