"""Deferred checks: conditions computed on the device and read on the host once, together with a step's record.

A check written `if bool(bad.any()): raise ValueError(...)` reads a device value on the host: on a GPU the Python
thread waits there until every queued kernel has run, so a step with twenty such checks stalls twenty times
(theory/step_cost.md, section 4). Inside a `deferred()` scope, `require(ok, message)` only *registers* the
condition (a bool tensor, still on the device) and the code runs on; the scope's owner then calls
`DeferredChecks.read(*values)`, which moves every registered flag and the values it asks for (the step's record)
to the host by one transfer, raises the ValueError of the first failed check (in registration order: the earliest
cause, not its consequences), and returns the values as Python lists. Outside a scope `require` reads at once, so
a plain call of any checked function behaves as before.

Code between a failed check and the read runs on bad values: it must not write anything that outlives the step
(the Dr step reads before the update and the optimizer). After its read a scope checks at once again, and a scope
left normally with checks never read reads them on exit, so no registered check is ever dropped. A function runs
inside its own scope with the decorator `@deferred_scope`, and reads it with `read(*values)`.

Shapes: ok: a bool tensor of any shape (every entry must hold); read(*values): each tensor flattened, in float64.

May import: nothing from drpt_ref.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Callable
from contextlib import contextmanager

import torch

_SCOPE: contextvars.ContextVar[DeferredChecks | None] = contextvars.ContextVar("drpt_deferred", default=None)


class DeferredChecks:
    """The checks registered in one scope; `read` empties it."""

    def __init__(self):
        self.checks: list[tuple[torch.Tensor, str | Callable[[], str]]] = []  # (ok () bool, message)
        self.reads = 0  # host reads made by `read` (one per call)
        self.closed = False  # True after a read: later checks are read at once

    def add(self, ok: torch.Tensor, message: str | Callable[[], str]) -> None:
        self.checks.append((ok.detach().all(), message))

    def read(self, *values: torch.Tensor) -> list[list[float]]:
        """One host read of the device's tensors (host tensors are read apart, with no wait): every registered flag
        and `values`. Raises the first failed check's ValueError.

        values: tensors of any shape, dtype and device -> one flat list of Python floats per tensor (bools as
        0.0 / 1.0; integers up to 2^53 exactly). The flags are cleared, raised or not."""
        checks, self.checks, self.closed = self.checks, [], True
        parts = [ok.reshape(1) for ok, _ in checks] + [v.detach().reshape(-1) for v in values]
        if not parts:
            return []
        by_device: dict[torch.device, list[int]] = {}  # host tensors are read apart: no device copy, no wait
        for i, p in enumerate(parts):
            by_device.setdefault(p.device, []).append(i)
        got: list[list[float]] = [[] for _ in parts]
        for device, index in by_device.items():
            wide = torch.float32 if device.type == "mps" else torch.float64  # mps has no float64
            flat = torch.cat([parts[i].to(wide) for i in index]).tolist()  # the one read of this device
            at = 0
            for i in index:
                got[i] = flat[at:at + parts[i].numel()]
                at += parts[i].numel()
        self.reads += len(by_device)
        flat = [x for g in got for x in g]
        for (_, message), ok in zip(checks, flat):
            if not ok:
                raise ValueError(message() if callable(message) else message)
        out, at = [], len(checks)
        for v in values:
            out.append(flat[at:at + v.numel()])
            at += v.numel()
        return out


@contextmanager
def deferred():
    """A scope in which `require` registers instead of reading; yields its DeferredChecks (scopes nest)."""
    scope = DeferredChecks()
    token = _SCOPE.set(scope)
    try:
        yield scope
        if scope.checks:  # never read: read now rather than drop them
            scope.read()
    finally:
        _SCOPE.reset(token)


def deferred_scope(fn):
    """Decorator: fn runs inside its own `deferred()` scope (fn reads it with `read`)."""
    @functools.wraps(fn)
    def scoped(*args, **kwargs):
        with deferred():
            return fn(*args, **kwargs)
    return scoped


def read(*values: torch.Tensor) -> list[list[float]]:
    """The current scope's `DeferredChecks.read(*values)`, or the values read at once outside a scope (one read)."""
    scope = _SCOPE.get()
    return (scope if scope is not None else DeferredChecks()).read(*values)


def in_scope() -> bool:
    """True inside a `deferred()` scope not yet read: the caller should avoid host reads of its own."""
    scope = _SCOPE.get()
    return scope is not None and not scope.closed


def require(ok: torch.Tensor, message: str | Callable[[], str]) -> None:
    """ValueError(message) unless every entry of the bool tensor ok holds: now (outside a scope, one host read)
    or at the scope's `read` (inside one). message: a string, or a callable that builds it (only on failure)."""
    scope = _SCOPE.get()
    if scope is not None and not scope.closed:
        scope.add(ok, message)
    elif not bool(ok.all()):
        raise ValueError(message() if callable(message) else message)
