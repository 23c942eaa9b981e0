"""The deep checks of a checkpoint that matches its manifest: its tensors against the model and the optimizer.

`check_tensors` refuses, naming the file, tensors of another model (names, shapes, dtypes), optimizer state
of another optimizer class, a missing or misshapen optimizer tensor (every slot one step of this optimizer
creates, found by stepping a fresh optimizer on a probe), non-tensor optimizer values of the wrong type or for
keys the optimizer does not keep (a string momentum_buffer would fail only at the next step), and an AdamW
step count that disagrees with the checkpoint's step. Used by training/checkpoint.py before anything is restored.

Shapes: parameters and optimizer buffers keep their own shapes; the probe is (2, 3).
"""

from __future__ import annotations

import inspect

import torch


def _optimizer_slots(optimizer: torch.optim.Optimizer, group: dict, param: torch.Tensor) -> dict:
    """What one step of this optimizer stores for `param`: key -> (shape, dtype) of a tensor, or None for a
    non-tensor. Found by stepping a fresh optimizer of the same class and options on a (2, 3) probe."""
    accepted = inspect.signature(type(optimizer).__init__).parameters
    options = {k: v for k, v in group.items() if k != "params" and k in accepted}
    probe = torch.zeros(2, 3, dtype=param.dtype, requires_grad=True)
    probe.grad = torch.zeros_like(probe)
    opt = type(optimizer)([probe], **options)
    opt.step()
    slots = {}
    for key, value in opt.state[probe].items():
        if torch.is_tensor(value):
            slots[key] = (tuple(param.shape) if tuple(value.shape) == (2, 3) else tuple(value.shape), value.dtype)
        else:
            slots[key] = type(value)  # a non-tensor value: its type (NoneType, int, float, bool)
    return slots


def _scalar_fits(value, kind: type) -> bool:
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return type(value) is kind


def _shape_dtype(t: torch.Tensor) -> str:
    return f"shape {tuple(t.shape)} {str(t.dtype).removeprefix('torch.')}"


def check_tensors(path: str, tensors: dict, state_path: str, state: dict, model, optimizer) -> dict:
    """The model's state (name -> tensor) from `tensors`, after every name, shape and dtype is checked."""
    expected, seen = {}, set()
    for k, v in model.state_dict().items():
        if v.data_ptr() not in seen:
            seen.add(v.data_ptr())
            expected[k] = v
    stored = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    missing, unexpected = sorted(set(expected) - set(stored)), sorted(set(stored) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{path} holds the tensors of another model: missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]} ({len(missing)} and {len(unexpected)} in all); resume with the "
                         "--model the run started from.")
    for k, v in stored.items():
        if v.shape != expected[k].shape or v.dtype != expected[k].dtype:
            raise ValueError(f"{path}: 'model.{k}' has {_shape_dtype(v)}, the model's has "
                             f"{_shape_dtype(expected[k])}; resume with the run's --model and --dtype.")
    opt = state["optimizer"]
    if opt.get("class") != type(optimizer).__name__ or not isinstance(opt.get("scalars"), dict):
        raise ValueError(f"{state_path}: the optimizer state is of {opt.get('class')!r}, this run uses "
                         f"{type(optimizer).__name__}; resume with the run's --optimizer.")
    names = {id(p): n for n, p in model.named_parameters()}
    wanted, scalars = set(), opt["scalars"]
    bad = [n for n, v in scalars.items() if n not in names.values() or not isinstance(v, dict)]
    if bad:
        raise ValueError(f"{state_path}: optimizer values for {bad[:3]}, which are not parameters of this model "
                         "(or not objects).")
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            slots = _optimizer_slots(optimizer, group, p)
            stray = sorted(set(scalars.get(name, {})) - {k for k, v in slots.items() if isinstance(v, type)})
            if stray:
                raise ValueError(f"{state_path}: optimizer values {stray} for {name!r}, which "
                                 f"{type(optimizer).__name__} does not keep as non-tensors.")
            for key, slot in slots.items():
                if isinstance(slot, type):
                    if key not in scalars.get(name, {}):
                        raise ValueError(f"{state_path}: no optimizer value {key!r} for {name!r}.")
                    if not _scalar_fits(scalars[name][key], slot):
                        raise ValueError(f"{state_path}: the optimizer value {key!r} of {name!r} is "
                                         f"{scalars[name][key]!r}, not a {slot.__name__}.")
                    continue
                tname = f"optim.{name}.{key}"
                wanted.add(tname)
                if tname not in tensors:
                    raise ValueError(f"{path}: the optimizer tensor {tname!r} is missing (a resume would start a "
                                     "fresh optimizer state and end elsewhere than the uninterrupted run).")
                if (tuple(tensors[tname].shape), tensors[tname].dtype) != slot:
                    raise ValueError(f"{path}: {tname!r} has {_shape_dtype(tensors[tname])}, expected shape "
                                     f"{slot[0]} {str(slot[1]).removeprefix('torch.')}.")
                if key == "step" and float(tensors[tname]) != state["step"]:  # one optimizer step per training step
                    raise ValueError(f"{path}: the optimizer has taken {float(tensors[tname]):g} steps but the "
                                     f"checkpoint says step {state['step']} ({state_path}).")
    unknown = sorted(set(tensors) - wanted - {f"model.{k}" for k in stored})
    if unknown:
        raise ValueError(f"{path}: tensors this model and optimizer do not have: {unknown[:3]}.")
    return stored
