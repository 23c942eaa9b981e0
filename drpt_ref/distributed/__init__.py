"""Data-parallel Dr steps over torch.distributed: the global K, b, c across ranks and the update reduced.

Each rank holds its share of the general and target units (ranks.py: which units, the process group, what is
refused: DDP-wrapped models, FSDP, tensor parallelism); the joint Gram of the union of the units is built on every
rank from what the ranks gather, exact or sketched, chosen per layer by its bytes (gram.py); the projection's
answer is broadcast from rank 0 and each rank's part of the update is summed by one all-reduce (update.py), so every
rank ends the step with the same parameters as one process on the union of the batches (theory/distributed.md).

May import: flags, losses, gram.
"""
