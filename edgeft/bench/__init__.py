"""``edgeft bench``: latency, memory and accuracy of every artifact, with readable reports."""

from edgeft.bench.harness import BenchSettings, Budgets, bench

__all__ = ["BenchSettings", "Budgets", "bench"]
