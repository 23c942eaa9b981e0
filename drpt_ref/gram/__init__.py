"""The Gram quantities K, b, c of a model's per-unit gradients: exact, ghost and sketched engines.

Which layers are covered (layers.py); the engines: per-unit autograd (exact.py), ghost inner products
from captured layer inputs and output gradients (ghost.py), random sketches of those (sketch.py);
one interface `compute_gram` / `gram_from_capture` (compute.py); and the update G w assembled from
the same capture (update.py); mixed precision (precision.py: captures in the model's dtype, K, b, c and the update
accumulated in float32 or wider) and gradient checkpointing under the capture (checkpointing.py).

May import: flags, deferred, losses.
"""
