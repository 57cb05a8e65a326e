"""The non-finite guard of train.py: the last trainable state known to be good, the means to
return to it (`LastGood`), and the bookkeeping of which update is confirmed and which steps were
skipped (`Guard`).

What "exploded" means here. The weights W_n (after n updates) are good when a forward and backward
pass at W_n gives a finite loss and, unless the fp16 GradScaler handles overflowing gradients
itself, a finite gradient. An update is therefore only confirmed by the next step. A step is bad
when its loss or gradient is not finite, or when its update leaves a non-finite value in the
trainable weights or the optimizer state; on a bad step the weights, the optimizer state and the
scaler go back to those of the last good weights: the copy taken before the last update. So
`--lr 1e10`, whose first update makes finite but huge weights (about 1e8) that give NaN losses from
the second step on, returns to the initial weights, and never keeps what made the NaN. No size
threshold: what counts is whether the weights still compute, which needs no scale per model.

The cost: one copy of the trainable parameters and of the optimizer state (AdamW: two moments),
kept in host memory (pinned when training on CUDA, so that the copies run asynchronously on the
training stream) and refreshed before each update: 12 bytes of RAM per trainable parameter in fp32
(4 + 8 / processes with --zero): 20 MB for the tiny preset, about 11 GB for RetriNet on SD v1.5
with --lock none (0.92 G trainable parameters), 5 GB with --lock decoder. Host memory, not GPU
memory: a copy on the GPU would take as much as the weights, gradients and half of AdamW together
and push the sd15 recipe out of a 24 GB card. The device-to-host copy per update (about 1 s for
11 GB over PCIe) is small beside an 8-micro-batch step."""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of `tensors` is finite (one max-abs reduction per device and dtype)."""
    groups: dict = {}
    for t in tensors:
        if t.is_floating_point() and t.numel():
            groups.setdefault((t.device, t.dtype), []).append(t.detach())
    return all(bool(torch.isfinite(torch.stack(torch._foreach_norm(g, float("inf")))).all())
               for g in groups.values())


def local_optimizer(optimizer):
    """The optimizer that holds this process's state (ZeRO keeps its shard in `.optim`)."""
    return getattr(optimizer, "optim", optimizer)


def _host_copy(t: torch.Tensor) -> torch.Tensor:
    """A copy of `t` in host memory, pinned when `t` lives on CUDA. Copies into and out of it are
    ordered on the training stream, so they can be asynchronous."""
    out = torch.empty(t.shape, dtype=t.dtype, pin_memory=t.is_cuda)
    return out.copy_(t.detach(), non_blocking=t.is_cuda)


class LastGood:
    """A copy of the trainable weights, the optimizer state and the scaler state, taken by `keep`
    before an update, put back by `restore`."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer, scaler):
        self.params, self.optimizer, self.scaler = params, local_optimizer(optimizer), scaler
        self.weights: list[torch.Tensor] | None = None
        self.state: dict = {}
        self.scaler_state: dict = {}
        self.step: int | None = None  # the number of updates behind the copy
        self.devices: dict = {}       # where each optimizer state tensor lives (AdamW's step: the CPU)

    def optimizer_tensors(self) -> list[torch.Tensor]:
        return [v for s in self.optimizer.state.values() for v in s.values() if torch.is_tensor(v)]

    def is_finite(self) -> bool:
        """Whether the trainable weights and this process's optimizer state are all finite."""
        return all_finite([p.detach() for p in self.params] + self.optimizer_tensors())

    @torch.no_grad()
    def keep(self, step: int) -> None:
        """Copy the current state, the state after `step` updates."""
        if self.weights is None:
            self.weights = [_host_copy(p) for p in self.params]
        else:
            for kept, p in zip(self.weights, self.params):
                kept.copy_(p.detach(), non_blocking=True)
        for p in (p for g in self.optimizer.param_groups for p in g["params"]):
            now = self.optimizer.state.get(p)
            if not now:
                self.state[p] = None
                continue
            kept = self.state.get(p) or {}
            for k, v in now.items():
                if torch.is_tensor(v) and torch.is_tensor(kept.get(k)) and kept[k].shape == v.shape:
                    kept[k].copy_(v, non_blocking=True)
                else:
                    kept[k] = _host_copy(v) if torch.is_tensor(v) else copy.deepcopy(v)
                    if torch.is_tensor(v):
                        self.devices[(p, k)] = v.device
            self.state[p] = kept
        self.scaler_state = copy.deepcopy(self.scaler.state_dict())
        self.step = step

    @torch.no_grad()
    def restore(self) -> int:
        """Put the kept state back; returns the number of updates behind it."""
        assert self.weights is not None, "restore before keep"
        for p, kept in zip(self.params, self.weights):
            p.detach().copy_(kept, non_blocking=True)
        for p, kept in self.state.items():
            if kept is None:
                self.optimizer.state.pop(p, None)
                continue
            now = self.optimizer.state.setdefault(p, {})
            for k, v in kept.items():
                if torch.is_tensor(v) and torch.is_tensor(now.get(k)) and now[k].shape == v.shape:
                    now[k].copy_(v, non_blocking=True)
                else:
                    now[k] = v.to(self.devices[(p, k)]) if torch.is_tensor(v) else copy.deepcopy(v)
        if self.scaler_state:
            self.scaler.load_state_dict(copy.deepcopy(self.scaler_state))
        return self.step


class Guard:
    """train.py's side of the guard: an update is confirmed by the next step (its loss and gradient
    finite), undone when it is not, and undone at once when it leaves a non-finite weight or
    optimizer state. Counts the steps skipped, in all and in a row, and the updates behind the
    weights held. `agree(ok, step)` turns this process's verdict on its own state into every
    process's (ZeRO: each process holds a shard of the optimizer state)."""

    def __init__(self, params: list[torch.nn.Parameter], optimizer, scaler,
                 agree: Callable[[bool, int], bool] = lambda ok, step: ok):
        self.last_good = LastGood(params, optimizer, scaler)
        self.scaler, self.agree = scaler, agree
        self.pending = False   # the weights come from an update no step has confirmed yet
        self.weights_step = 0  # the number of updates behind the weights held now
        self.skipped = self.bad_in_row = 0

    def resume(self, step: int, skipped: int) -> None:
        self.weights_step, self.skipped = step, skipped

    def step(self, n: int, loss_ok: bool, grads_ok: bool, update: Callable[[], None]) -> tuple[bool, str | None]:
        """Step `n` (counted from 1): confirm or undo the previous update, then make this one
        (`update`: the scaler's step and update) unless the weights held do not compute. The weights
        compute when their loss is finite and so is the gradient, unless the fp16 scaler owns
        gradient overflow (it skips the update itself and lowers its scale). Returns (whether the
        weights were updated, a warning when the guard just stepped back)."""
        weights_ok = loss_ok and (grads_ok or self.scaler.is_enabled())
        undone, bad_before = None, self.bad_in_row
        if self.pending:
            self.pending = False
            if weights_ok:
                self.bad_in_row = 0  # the last update is confirmed
            else:  # the last update made weights that do not compute: back to those before it
                undone, self.weights_step = n - 1, self.last_good.restore()
        updated = False
        if weights_ok:
            if grads_ok:
                self.last_good.keep(self.weights_step)
            update()
            if grads_ok:
                if self.agree(self.last_good.is_finite(), n):
                    updated = self.pending = True
                else:
                    undone, self.weights_step = n, self.last_good.restore()
        if updated:
            self.weights_step = n
        else:
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        if undone is not None and undone != n:  # the previous step's update, undone now, counts as skipped too
            self.skipped, self.bad_in_row = self.skipped + 1, self.bad_in_row + 1
        warning = None
        if undone is not None and bad_before == 0:
            what = ("its update made non-finite weights" if undone == n else
                    f"the update of step {undone} made weights that give a non-finite loss or gradient")
            warning = f"step {n}: {what}; back to the weights after step {self.weights_step}"
        return updated, warning

    def stop_message(self, limit: int, path: Path | None, step: int, args) -> str:
        """train.py's status-3 line after `limit` bad steps in a row: what stopped the run at `step`,
        what the checkpoint `path` holds, what to change (train.py's options `args`)."""
        fixes = [f"lower --lr (now {args.lr:g})"]
        if not args.clip_grad:
            fixes.append("clip the gradient (--clip-grad 1; now 0, no clipping)")
        if args.precision != "fp32":
            fixes.append(f"train in --precision fp32 (now {args.precision})")
        initial = " (the initial weights)" if self.weights_step == 0 else ""
        return (f"{limit} steps in a row had a non-finite loss, gradient or update, or had their update "
                f"undone (see training/guard.py); stopped at step {step}. {path} holds the last finite weights, "
                f"those after step {self.weights_step}{initial}. To continue, {' or '.join(fixes)}, and add --resume")
