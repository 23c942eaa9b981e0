"""The Dr step and the training loop: weight rules, selection baselines, ADAPT, HPT, run state.

One Dr step (dr_step.py): Gram -> projection -> weighted update. The rules that choose the weights
(rules.py) include the Dr family, the selection baselines (baselines.py) and ADAPT (adapt.py), with
representation features (rep_features.py); HPT's hybrid batches (hpt.py); the data of a run
(train_data.py); the run folder and metrics (run_state.py), atomic verified checkpoints
(checkpoint.py), safetensors-only model loading (model_folder.py); held-out evaluation (evaluate.py); and the
loop behind `drpt train` and `drpt eval` (train.py, evaluate.py).

May import: flags, deferred, core, batched, data, losses, gram, distributed.
"""
