"""`drpt bench`: the batched solvers and the Dr step, timed against their baselines.

command.py dispatches; solvers.py and step.py are the two benchmarks.

Part of the experiments layer (see drpt_ref/experiments/__init__.py for what it may import).
"""
