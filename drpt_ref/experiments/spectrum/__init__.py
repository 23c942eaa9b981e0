"""`drpt spectrum`: every method of the family on one synthetic problem, with its plot.

demo.py runs the command; plot.py draws the bias-variance path of each knob.

Part of the experiments layer (see drpt_ref/experiments/__init__.py for what it may import).
"""
