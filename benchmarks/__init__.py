"""Benchmarks of each stage, run from the repository root as modules: ``python -m benchmarks.<name>``.

Not part of the installed package (the wheel holds ``raychat`` only); they import ``raychat`` from
the checkout or an installed copy.
"""
