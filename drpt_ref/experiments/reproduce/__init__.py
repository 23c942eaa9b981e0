"""`drpt reproduce`: every method on every paradigm over seeds, with its report.

plan.py (config and the list of runs), run.py (runs them, resumable), report.py (tables, plots).

Part of the experiments layer (see drpt_ref/experiments/__init__.py for what it may import).
"""
