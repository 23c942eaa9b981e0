"""`drpt bias-variance`: measured bias and variance of each method's direction.

measure.py (the estimator and the linear problem), gpt2.py (the GPT-2 problem), plot.py, command.py.

Part of the experiments layer (see drpt_ref/experiments/__init__.py for what it may import).
"""
