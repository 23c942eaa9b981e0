"""The Dr step inside TRL's trainers: DrSFTTrainer and DrDPOTrainer (optional extra `trl`).

`DrSFTTrainer` and `DrDPOTrainer` subclass TRL's `SFTTrainer` and `DPOTrainer`: TRL's config, data
handling, optimizer, scheduler, clipping, logging and saving are kept; the update of each step is the
Dr step of training/dr_step.py on per-unit losses read from TRL's batch (theory/trl.md). trl is
imported only when one of them is asked for, so `import drpt_ref` and `import drpt_ref.integrations`
work without it; `pip install drpt_ref[trl]` installs it.

    from drpt_ref.integrations import DrSFTConfig, DrSFTTrainer, DrDPOConfig, DrDPOTrainer

trl_common.py (the Dr settings, the step inside Trainer.training_step, its logs), trl_sft.py, trl_dpo.py.

May import: flags, core, batched, data, losses, gram, training.

Shapes: see trl_common.py (units n general, m target per step).
"""

from __future__ import annotations

import importlib

_WHERE = {"DrSFTConfig": "trl_sft", "DrSFTTrainer": "trl_sft", "DrDPOConfig": "trl_dpo", "DrDPOTrainer": "trl_dpo",
          "DrArguments": "trl_common"}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    """Import the TRL-facing classes on first use (trl is an optional dependency)."""
    if name not in _WHERE:
        raise AttributeError(f"module 'drpt_ref.integrations' has no attribute {name!r}")
    try:
        module = importlib.import_module(f"drpt_ref.integrations.{_WHERE[name]}")
    except ImportError as err:
        if (err.name or "").split(".")[0] == "trl":
            raise ImportError(f"drpt_ref.integrations.{name} needs TRL: pip install drpt_ref[trl]") from err
        raise
    return getattr(module, name)
