"""Pruning and elastic optimization of ElasticDenser (paper §4.1-4.2, §4.4)."""
