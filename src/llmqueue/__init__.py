"""llmqueue: queueing theory and simulation of LLM inference scheduling.

Implements Dai, Deng, Li, Peng, "Throughput-Optimal Scheduling Algorithms for LLM
Inference and AI Agents" (arXiv 2504.07347); see docs/ and the paper's specification.
"""

__version__ = "0.1.0"
