"""The jobs built on training: reproduce, bias-variance, spectrum, benchmarks, build-model.

`drpt reproduce` (reproduce/: plan, run, report), `drpt bias-variance` (bias_variance/: measure, the
GPT-2 problem, plot, command), `drpt spectrum` (spectrum/: demo, plot), `drpt bench` (bench/: the
solver and step benchmarks) and `drpt build-model` (build_model.py).

May import: flags, core, batched, data, losses, gram, distributed, training.
"""
