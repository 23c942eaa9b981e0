"""Per-unit losses: the unit batch, SFT, DPO, GRPO and the unified policy-gradient estimator.

A unit is what the projection weights: one SFT example, one DPO pair, one GRPO prompt group. Rows
grouped into units (unit_batch.py), and one small pure loss per paradigm (sft.py, dpo.py, grpo.py),
each returning one scalar per unit; the unified policy-gradient estimator of HPT (unified_pg.py).

May import: flags, deferred, data.
"""
