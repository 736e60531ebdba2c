"""Where a training step's time goes, by part of the network (issue 13, item 3): ``torch.profiler`` over
``trainer.train_step``, every operator attributed to the part that ran it, forward and backward.

Parts are the network's direct submodules (a ``ModuleList`` counts as one part: STD-Net's
``phase_fusions``), the trainer's ``loss`` module, ``optimizer`` (``Optimizer.step`` and ``zero_grad``)
and ``other`` (everything else: the network's glue between its parts, the case-level losses computed in
the trainer, the grad scaler). Forward hooks on every module of a part open a ``record_function`` range
per call; an operator inside a range belongs to the innermost one. A backward operator belongs to the
part whose outputs' autograd graph held its node when the part returned (``PartTracker.claim``): the
profiler's backward events carry the node's sequence number. Time per
operator is its self time: on CUDA the time of the kernels it launched, on the CPU its own CPU time, so
the parts add up to the profiled step without counting anything twice.

FLOPs per part (``torch.utils.flop_counter``, forward and backward of one train step, 2 per multiply-add;
norms and element-wise operations not counted) give each part's achieved FLOP/s: a part far below the
network's convolutions is where time goes beyond the method's arithmetic.

Used by ``benchmarks/performance.py profile``; the profiled step is eager (a compiled graph is one
opaque call per part boundary it crosses).
"""
from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Dict, Iterator, List, Tuple

import torch
from torch import nn
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile, record_function
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import flop_registry

from nnunet_liver_ext.networks.contract import unwrap_network
import perf_common  # noqa: F401  (FLOP formulas older torch lacks; benchmarks/ is on sys.path)

PART_PREFIX = "part::"
BACKWARD_PREFIX = "autograd::engine::evaluate_function"
OPTIMIZER_PREFIXES = ("Optimizer.step#", "Optimizer.zero_grad#")


def network_parts(network: nn.Module) -> Dict[str, List[nn.Module]]:
    """``{part name: modules}``: every module of the network under the direct submodule through which
    ``named_modules`` first reaches it (a ModuleList's items are one part). All of them are hooked, not just
    the part itself: a network may call a part's pieces directly (the Mamba U-Net runs its encoder's
    stages one by one); a module two parts hold (the decoder's reference to the encoder) stays with the
    part registered first."""
    parts: Dict[str, List[nn.Module]] = defaultdict(list)
    for name, module in unwrap_network(network).named_modules():
        if name:
            parts[name.split(".")[0]].append(module)
    return dict(parts)


def step_parts(trainer) -> Dict[str, List[nn.Module]]:
    """The network's parts and the trainer's ``loss`` module."""
    parts = network_parts(trainer.network)
    if isinstance(getattr(trainer, "loss", None), nn.Module):
        parts["loss"] = [trainer.loss]
    return parts


def _tensors(value) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # NetworkOutput
        for field in dataclasses.fields(value):
            yield from _tensors(getattr(value, field.name))


class PartTracker:
    """Forward hooks on the parts. While a part runs, its name is on ``stack`` (and, with ``ranges``, a
    ``record_function`` range ``part::<name>`` is open); when it returns, the autograd nodes behind its
    outputs that no earlier part claimed become its own: ``part_of_sequence`` maps their sequence numbers,
    which the profiler's backward events and ``torch._C._current_autograd_node()`` carry, to the part."""

    def __init__(self, parts: Dict[str, List[nn.Module]], ranges: bool = True):
        self.parts, self.ranges = parts, ranges
        self.stack: List[str] = []
        self.part_of_sequence: Dict[int, str] = {}
        self._open: List[record_function] = []
        self._handles = []

    def _enter(self, name):
        def hook(module, args):
            self.stack.append(name)
            if self.ranges:
                rf = record_function(PART_PREFIX + name)
                rf.__enter__()
                self._open.append(rf)
        return hook

    def _leave(self, name):
        def hook(module, args, output):
            self.stack.pop()
            if self.ranges:
                self._open.pop().__exit__(None, None, None)
            self.claim(name, output)
        return hook

    def claim(self, name: str, output) -> None:
        todo = [t.grad_fn for t in _tensors(output) if t.grad_fn is not None]
        while todo:
            node = todo.pop()
            if node is None or type(node).__name__ == "AccumulateGrad":  # leaves; one sequence number for all
                continue
            sequence = node._sequence_nr()
            if sequence in self.part_of_sequence:  # an earlier part's, and so is everything behind it
                continue
            self.part_of_sequence[sequence] = name
            todo.extend(next_node for next_node, _ in node.next_functions)

    def __enter__(self):
        for name, modules in self.parts.items():
            for module in modules:
                self._handles.append(module.register_forward_pre_hook(self._enter(name)))
                self._handles.append(module.register_forward_hook(self._leave(name)))
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class PartFlops(TorchDispatchMode):
    """FLOPs per part and pass: ``torch.utils.flop_counter``'s formulas, each operator attributed to the
    innermost running part (forward) or to the part of the autograd node being evaluated (backward)."""

    def __init__(self, tracker: PartTracker):
        super().__init__()
        self.tracker = tracker
        self.flops: Dict[Tuple[str, str], int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            node = torch._C._current_autograd_node()
            if node is not None:
                key = (self.tracker.part_of_sequence.get(node._sequence_nr(), "other"), "backward")
            else:
                key = (self.tracker.stack[-1] if self.tracker.stack else "other", "forward")
            self.flops[key] += int(formula(*args, **kwargs, out_val=out))
        return out

    def by_part(self) -> Dict[str, Dict[str, int]]:
        """``{part: {"forward": FLOPs, "backward": FLOPs}}``."""
        out: Dict[str, Dict[str, int]] = defaultdict(lambda: {"forward": 0, "backward": 0})
        for (part, kind), flops in self.flops.items():
            out[part][kind] += flops
        return dict(out)


def _ancestor(event, predicate):
    while event is not None:
        if predicate(event.name):
            return event
        event = event.cpu_parent
    return None


def attribute(events, device_type: str, part_of_sequence: Dict[int, str]) -> Dict[str, Dict[str, float]]:
    """``{part: {"forward_ms", "backward_ms"}}`` from the profiler's events (see the module docstring)."""
    cuda = device_type == "cuda"
    totals: Dict[str, Dict[str, float]] = defaultdict(lambda: {"forward_ms": 0.0, "backward_ms": 0.0})
    for e in events:
        if e.device_type != DeviceType.CPU:  # kernels: counted through the operator that launched them
            continue
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if not us or e.name.startswith(PART_PREFIX):
            continue
        if _ancestor(e, lambda n: n.startswith(OPTIMIZER_PREFIXES)) is not None:
            totals["optimizer"]["forward_ms"] += us / 1e3
            continue
        node = _ancestor(e, lambda n: n.startswith(BACKWARD_PREFIX))
        if node is not None:
            totals[part_of_sequence.get(node.sequence_nr, "other")]["backward_ms"] += us / 1e3
            continue
        marker = _ancestor(e, lambda n: n.startswith(PART_PREFIX))
        totals[marker.name[len(PART_PREFIX):] if marker else "other"]["forward_ms"] += us / 1e3
    return dict(totals)


def part_flops(trainer, batch: dict, parts: Dict[str, List[nn.Module]]) -> Dict[str, Dict[str, int]]:
    """``{part: {"forward": FLOPs, "backward": FLOPs}}`` of one train step."""
    with PartTracker(parts, ranges=False) as tracker, PartFlops(tracker) as counter:
        trainer.train_step(batch)
    return counter.by_part()


def profile_train_step(trainer, batch: dict, warmup: int = 1) -> dict:
    """Per-part forward and backward milliseconds of one ``trainer.train_step(batch)``, FLOPs and FLOP/s."""
    device = trainer.device
    parts = step_parts(trainer)
    trainer.network.train()
    for _ in range(warmup):  # cuDNN autotuning, allocator, lazy initialisations
        trainer.train_step(batch)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with PartTracker(parts) as tracker, profile(activities=activities) as prof:
        trainer.train_step(batch)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    times = attribute(prof.events(), device.type, tracker.part_of_sequence)
    flops = part_flops(trainer, batch, parts)
    rows = {}
    for name in [*parts, "optimizer", "other"]:
        t = times.get(name, {"forward_ms": 0.0, "backward_ms": 0.0})
        f = flops.get(name, {"forward": 0, "backward": 0})
        ms, total_flops = t["forward_ms"] + t["backward_ms"], f["forward"] + f["backward"]
        if ms == 0 and total_flops == 0:
            continue
        rows[name] = {**t, "total_ms": ms, "forward_gflops": f["forward"] / 1e9, "backward_gflops": f["backward"] / 1e9,
                      "gflop_per_s": total_flops / ms / 1e6 if total_flops and ms else None}
    step_ms = sum(r["total_ms"] for r in rows.values())
    step_flops = sum(f["forward"] + f["backward"] for f in flops.values())
    for row in rows.values():
        row["share"] = row["total_ms"] / step_ms if step_ms else None
    return {"time_basis": "kernel time (CUDA)" if device.type == "cuda" else "CPU self time",
            "step_ms": step_ms, "step_gflops": step_flops / 1e9,
            "step_gflop_per_s": step_flops / step_ms / 1e6 if step_ms else None, "parts": rows}


def network_part_flops(network: nn.Module, input_shape, device, heads: bool) -> Dict[str, Dict[str, int]]:
    """``{part: {"forward": FLOPs, "backward": FLOPs}}`` of one training forward (``heads=True`` for the
    package's networks) and the backward of a loss on all its outputs, without a trainer: on ``meta``
    tensors nothing is computed, so a GPU-size breakdown costs nothing on the CPU."""
    parts = network_parts(network)
    network.train()
    x = torch.randn(*input_shape, device=device)
    with PartTracker(parts, ranges=False) as tracker, PartFlops(tracker) as counter:
        output = network(x, heads=True) if heads else network(x)
        sum(t.float().mean() for t in _tensors(output) if t.requires_grad).backward()
    network.zero_grad(set_to_none=True)
    return counter.by_part()
