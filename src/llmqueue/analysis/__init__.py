"""Closed-form analysis: Theorem 2's capacity and stability boundary, the fluid growth of the
backlog (:mod:`~llmqueue.analysis.capacity`, paper §4), the 2-D region under a request cap
(:mod:`~llmqueue.analysis.region`, paper §6, Theorem 10), and the KV-cache memory bounds
(:mod:`~llmqueue.analysis.memory`, docs/memory.md).  Networks' traffic equations are in
:mod:`llmqueue.network.analysis`."""

from llmqueue.analysis.capacity import Analysis, analyze, capacity
from llmqueue.analysis.memory import MemoryAnalysis, MemoryRate, mean_batch_time, memory_analysis, memory_rate

__all__ = ["Analysis", "MemoryAnalysis", "MemoryRate", "analyze", "capacity", "mean_batch_time", "memory_analysis",
           "memory_rate"]
