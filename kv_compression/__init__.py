"""KV-cache compression: scoring policies, budgets and a cache that evicts during generation.

Built on `forward_influence` (model loading, signals, eviction masks). The package is empty until
the policies land; see the project's issue tracker.
"""
