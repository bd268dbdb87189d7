"""Bit-width search (docs/method.md §7): cost tables, the ILP and its exact solver, policies, sweeps.

Import the submodules directly (`orchestrator.search.ilp`, `.costs`, `.policy`, `.sweep`); this package
imports nothing heavy so that `limpq search` starts fast.
"""
