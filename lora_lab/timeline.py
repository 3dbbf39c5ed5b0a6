"""Memory inside one training step: every allocation and free, in order, with its category and module.

`lora_lab.memory` counts a step's tensors once, by category (`MemoryBreakdown`); this module records *when*
each of them appears and disappears, so the step becomes a curve (PyTorch's memory snapshot, CUDA's
``_record_memory_history``, is the model). A step's story, told by its events:

    forward     saved activations pile up (autograd's saved-tensor hooks), module by module; a QLoRA layer
                dequantizes its weight and frees it again (temporaries)
    backward    saved activations drain as each node runs; gradients appear (``.grad`` after accumulation)
    optimizer   AdamW's two moments appear at the first step (optimizer step hooks), then stay

Two views of the same step:

- **The kit's view (any device, the CPU's only one).** Built from what the kit observes: module forward hooks
  (which module runs), the `SavedTensors` counting of `lora_lab.memory`, gradient-accumulation hooks and the
  optimizer's step hooks. Each category holds exactly the tensors `measure` counts, so the categories' maxima
  over the step are `measure`'s breakdown. It does not see memory that no hook reports: an operator's
  intermediate results (softmax inside attention, the logits), AdamW's own scratch tensors, what
  `torch.utils.checkpoint` recomputes in backward, and the allocator's rounding and cache.
- **The allocator's view (CUDA).** ``torch.cuda.memory._record_memory_history`` logs every ``malloc`` and
  ``free`` of PyTorch's CUDA allocator; `allocator_timeline` replays that log, naming each block by the
  kit's view (the block behind a saved activation, a gradient, a state tensor) and calling every other block
  a temporary. Its peak is ``torch.cuda.max_memory_allocated`` over the step.

`TimelineRecorder` records the steps of any training loop run while it is open (``finetune`` included);
`record_step` records one step of `lora_lab.train.measure`.
"""

from __future__ import annotations

import bisect
import dataclasses
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn.modules.module import register_module_forward_hook, register_module_forward_pre_hook
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from .memory import CATEGORIES, MemoryBreakdown, SavedTensors, count_saved, weight_bytes
from .qlora import NF4Linear
from .train import measure

TIMELINE_CATEGORIES = CATEGORIES + ("temporaries",)  # temporaries: memory no other category holds
PHASES = ("forward", "backward", "optimizer")
MAX_CUDA_EVENTS = 1_000_000  # the allocator's history is a ring buffer: a step's events must all fit


@dataclass(frozen=True)
class MemoryEvent:
    """One allocation (``nbytes > 0``) or free (``nbytes < 0``) of a step.

    Attributes:
        phase: "forward", "backward" or "optimizer".
        category: one of `TIMELINE_CATEGORIES`.
        module: the qualified name of the module that made it ("": the model's own forward, or none of its modules).
        nbytes: bytes allocated (positive) or freed (negative).
    """

    phase: str
    category: str
    module: str
    nbytes: int


@dataclass
class StepTimeline:
    """A step as events: ``start`` (bytes held when it began) plus each event's change, in order.

    Attributes:
        start: bytes by category of `TIMELINE_CATEGORIES` before the step's first event.
        events: the step's `MemoryEvent` list.
        step: the training step's number (1 = the first step the recorder saw).
        view: "kit" (the hooks' view) or "cuda" (the allocator's, see `allocator_timeline`).
        breakdown: `measure`'s `MemoryBreakdown` of the same step (from `record_step`), else None.
        cuda_peak: ``torch.cuda.max_memory_allocated`` over the step (the "cuda" view), else None.
        cuda: the allocator's `StepTimeline` of the same step, when it was recorded on CUDA.
    """

    start: dict[str, int]
    events: list[MemoryEvent] = field(default_factory=list)
    step: int = 1
    view: str = "kit"
    breakdown: MemoryBreakdown | None = None
    cuda_peak: int | None = None
    cuda: StepTimeline | None = None

    def curve(self) -> np.ndarray:
        """(n_events + 1, n_categories) int64: bytes by category before the first event and after each one."""
        index = {c: i for i, c in enumerate(TIMELINE_CATEGORIES)}
        deltas = np.zeros((len(self.events) + 1, len(TIMELINE_CATEGORIES)), dtype=np.int64)
        deltas[0] = [self.start.get(c, 0) for c in TIMELINE_CATEGORIES]
        for i, e in enumerate(self.events, start=1):
            deltas[i, index[e.category]] = e.nbytes
        return deltas.cumsum(axis=0)

    @property
    def totals(self) -> np.ndarray:
        """(n_events + 1,) total bytes before the first event and after each one."""
        return self.curve().sum(axis=1)

    @property
    def peak_index(self) -> int:
        """Index into `totals` of the (first) highest point."""
        return int(np.argmax(self.totals))

    @property
    def peak(self) -> int:
        """The highest total, in bytes."""
        return int(self.totals[self.peak_index])

    def at(self, index: int) -> dict[str, int]:
        """Bytes by category at point ``index`` of `totals` (0: the start)."""
        return dict(zip(TIMELINE_CATEGORIES, (int(v) for v in self.curve()[index])))

    def at_peak(self) -> dict[str, int]:
        """Bytes by category at the peak: what the step's highest point is made of."""
        return self.at(self.peak_index)

    def maxima(self) -> dict[str, int]:
        """Each category's largest value over the step (the kit's view: `measure`'s breakdown, category by category)."""
        return dict(zip(TIMELINE_CATEGORIES, (int(v) for v in self.curve().max(axis=0))))

    def phase_spans(self) -> list[tuple[str, int, int]]:
        """``(phase, first, last)``: the points of `totals` after each phase's events, in order."""
        spans: list[tuple[str, int, int]] = []
        for i, e in enumerate(self.events, start=1):
            if spans and spans[-1][0] == e.phase:
                spans[-1] = (e.phase, spans[-1][1], i)
            else:
                spans.append((e.phase, i, i))
        return spans

    def peak_phase(self) -> tuple[str | None, bool]:
        """``(phase, at_its_end)``: the phase whose event made the peak (None: the start is the peak), and
        whether the peak is that phase's last point (e.g. "at the end of the forward pass")."""
        i = self.peak_index
        for phase, first, last in self.phase_spans():
            if first <= i <= last:
                return phase, i == last
        return None, False


# ------------------------------------------------------------------------------- the kit's view (hooks)

def _storage(t: torch.Tensor) -> tuple[int, int]:
    storage = t.untyped_storage()
    return storage._cdata, storage.nbytes()


class _Held:
    """What autograd keeps instead of a saved tensor while recording; its release is the activation's free."""

    __slots__ = ("tensor", "key", "owner")

    def __init__(self, tensor, key, owner):
        self.tensor, self.key, self.owner = tensor, key, owner

    def __del__(self):
        self.owner.drop(self.key)


class _SavedEvents(SavedTensors):
    """`SavedTensors` that also turns each saved storage's first hold and last release into events.

    Other open `SavedTensors` (``measure``'s) are shadowed by these hooks, so `pack` counts for them too
    (`count_saved`). Tensors kept alive outside autograd (gradient checkpointing's layer inputs, reported
    through `count_saved`) are released when the tensor itself is freed (``weakref.finalize``).
    """

    def __init__(self, model: nn.Module, step: _StepRecord):
        super().__init__(model)
        self.step, self.holders, self._packing = step, {}, False

    def hold(self, t: torch.Tensor, key: int, nbytes: int) -> None:
        if key not in self.holders:
            self.holders[key] = [0, nbytes, self.step.module_now()]
            self.step.event("activations", nbytes, ptr=t.untyped_storage().data_ptr())
        self.holders[key][0] += 1

    def drop(self, key: int) -> None:
        entry = self.holders.get(key)
        if entry is None:
            return
        entry[0] -= 1
        if entry[0] == 0:
            del self.holders[key]
            self.step.event("activations", -entry[1], module=entry[2])

    def add(self, t):
        super().add(t)
        if isinstance(t, torch.Tensor) and not self._packing:
            key, nbytes = _storage(t)
            if key not in self.skip:
                self.hold(t, key, nbytes)
                weakref.finalize(t, self.drop, key)
        return t

    def pack(self, t):
        self._packing = True
        try:
            count_saved((t,))  # every open SavedTensors, this one included
        finally:
            self._packing = False
        key, nbytes = _storage(t)
        if key in self.skip:
            return t
        self.hold(t, key, nbytes)
        return _Held(t, key, self)

    def unpack(self, packed):
        return packed.tensor if isinstance(packed, _Held) else packed


class _StepRecord:
    """The events of one step being recorded, and the hooks that produce them (removed by `close`)."""

    def __init__(self, model: nn.Module, number: int, cuda: bool):
        self.model, self.number, self.phase = model, number, "forward"
        self.events: list[MemoryEvent] = []
        self.names = {id(m): name for name, m in model.named_modules()}
        self.owner = {id(p): name.rpartition(".")[0] for name, p in model.named_parameters()}
        self.trainable = {id(p) for p in model.parameters() if p.requires_grad}
        frozen, trainable = weight_bytes(model)
        self.grads = {_storage(p.grad)[0] for p in model.parameters() if p.grad is not None}
        grads = sum(_storage(p.grad)[1] for p in model.parameters() if p.grad is not None)
        self.start = dict.fromkeys(TIMELINE_CATEGORIES, 0) | dict(frozen_weights=frozen, trainable_weights=trainable,
                                                                   gradients=grads)
        self.state_keys: set[int] = set()
        self.stack: list[str | None] = []
        self.cuda = _CudaLog() if cuda else None
        self.saved = _SavedEvents(model, self)
        self.handles = [register_module_forward_pre_hook(self._enter_module),
                        register_module_forward_hook(self._leave_module)]
        self.handles += [p.register_post_accumulate_grad_hook(self._grad_ready)
                         for p in model.parameters() if p.requires_grad]
        self.saved.__enter__()

    def module_now(self) -> str:
        """The innermost module of the model running its forward now ("" outside every module)."""
        return (self.stack[-1] or "") if self.stack else ""

    def event(self, category: str, nbytes: int, module: str | None = None, ptr: int | None = None) -> None:
        """Append an event made by ``module`` (None: the module running now)."""
        module = self.module_now() if module is None else module
        self.events.append(MemoryEvent(self.phase, category, module, nbytes))
        if self.cuda is not None and nbytes > 0 and ptr is not None:
            self.cuda.tag(ptr, category, module)

    # forward: which module runs, and a QLoRA layer's dequantized weight
    def _enter_module(self, module, args):
        self.stack.append(self.names.get(id(module)))
        if isinstance(module, NF4Linear):
            self.event("temporaries", _dequantized_bytes(module))

    def _leave_module(self, module, args, output):
        if isinstance(module, NF4Linear):
            self.event("temporaries", -_dequantized_bytes(module))
            if module.backend == "torch" and isinstance(output, torch.Tensor) and output.grad_fn is not None:
                self._watch_backward_dequantize(module, output.grad_fn)
        if self.stack:
            self.stack.pop()

    def _watch_backward_dequantize(self, module: NF4Linear, node) -> None:
        """`_DequantizeMatmul`'s backward dequantizes W again (see its Note): an event around that node."""
        for _ in range(4):  # the output may be `out + bias` (and `.to(dtype)`) of the matmul's result
            if type(node).__name__.endswith("_DequantizeMatmulBackward") or node is None:
                break
            node = next((fn for fn, _ in node.next_functions if fn is not None), None)
        if node is None or not type(node).__name__.endswith("_DequantizeMatmulBackward"):
            return
        name, nbytes = self.names.get(id(module), ""), _dequantized_bytes(module)
        node.register_prehook(lambda grads: self.event("temporaries", nbytes, module=name))
        node.register_hook(lambda grads_in, grads_out: self.event("temporaries", -nbytes, module=name))

    def end_forward(self) -> None:
        self.saved.__exit__(None, None, None)
        for handle in self.handles[:2]:
            handle.remove()
        self.stack.clear()
        self.phase = "backward"
        if self.cuda is not None:
            self.cuda.mark("backward")

    # backward: gradients
    def _grad_ready(self, p: torch.Tensor) -> None:
        key, nbytes = _storage(p.grad)
        if key not in self.grads:
            self.grads.add(key)
            self.event("gradients", nbytes, module=self.owner.get(id(p), ""), ptr=p.grad.untyped_storage().data_ptr())

    # optimizer: state tensors
    def owns(self, optimizer: torch.optim.Optimizer) -> bool:
        return any(id(p) in self.trainable for group in optimizer.param_groups for p in group["params"])

    def before_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """State that exists before ``step()`` existed all along: it belongs to the start, not to an event."""
        self.phase = "optimizer"
        if self.cuda is not None:
            self.cuda.mark("optimizer")
        for t in _state_tensors(optimizer):
            key, nbytes = _storage(t)
            if key not in self.state_keys:
                self.state_keys.add(key)
                self.start["optimizer_state"] += nbytes

    def after_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """New state tensors (AdamW's moments at the first step); a step that adds none leaves a 0-byte event,
        so the optimizer step still shows as a phase."""
        count = len(self.events)
        for group in optimizer.param_groups:
            for p in group["params"]:
                for t in optimizer.state.get(p, {}).values():
                    if not isinstance(t, torch.Tensor):
                        continue
                    key, nbytes = _storage(t)
                    if key not in self.state_keys:
                        self.state_keys.add(key)
                        self.event("optimizer_state", nbytes, module=self.owner.get(id(p), ""),
                                   ptr=t.untyped_storage().data_ptr())
        if len(self.events) == count:
            self.event("optimizer_state", 0, module="")

    def close(self) -> StepTimeline:
        if self.phase == "forward":
            self.end_forward()
        for handle in self.handles[2:]:
            handle.remove()
        self.saved.step = _Discard()  # releases after the step (a graph kept alive) are not this step's
        timeline = StepTimeline(start=self.start, events=self.events, step=self.number)
        if self.cuda is not None:
            timeline.cuda = self.cuda.finish(self.start)
        return timeline


class _Discard:
    def event(self, *args, **kwargs) -> None:
        pass


def _dequantized_bytes(module: NF4Linear) -> int:
    """The (out, in) weight `NF4Linear` dequantizes for each matmul, in its compute dtype."""
    return module.out_features * module.in_features * module.compute_dtype.itemsize


def _state_tensors(optimizer: torch.optim.Optimizer):
    return [t for state in optimizer.state.values() for t in state.values() if isinstance(t, torch.Tensor)]


class TimelineRecorder:
    """Records the memory timeline of the training steps run while the context is open.

    A step begins with a forward pass of ``model`` with gradients on (evaluation forwards under ``no_grad`` are
    left out) and ends with the ``step()`` of an optimizer over its parameters; what happens in between is
    recorded as `MemoryEvent` s (see the module docstring). Model surgery before a step (``finetune`` applies
    LoRA after the recorder opens) is fine: each step reads the model as it is then.

    Args:
        model: the model whose steps to record.
        every: record step 1 and every ``every``-th step (1: all; ``finetune(eval_every=10)`` measures memory
            at steps 1, 10, 20, ...: ``every=10`` records the same steps).
        cuda: also record CUDA's allocator history (`allocator_timeline`); default: when the model is on CUDA.

    Attributes:
        timelines: the recorded steps' `StepTimeline` s, oldest first; ``latest`` is the newest (None before).

    Example:
        >>> with TimelineRecorder(model, every=10) as recorder:
        ...     finetune(model, task, method="lora", steps=60, eval_every=10)
        >>> recorder.latest.peak
    """

    def __init__(self, model: nn.Module, *, every: int = 1, cuda: bool | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"TimelineRecorder records an nn.Module's steps, got {type(model).__name__}.")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive int (1 records every step), got {every!r}.")
        if cuda and not torch.cuda.is_available():
            raise ValueError("cuda=True records CUDA's allocator history, and CUDA is not available here.")
        self.model, self.every, self.cuda = model, every, cuda
        self.timelines: list[StepTimeline] = []
        self.steps_seen = 0
        self._in_step, self._record, self._handles, self._params = False, None, [], set()

    @property
    def latest(self) -> StepTimeline | None:
        return self.timelines[-1] if self.timelines else None

    def __enter__(self) -> TimelineRecorder:
        self._handles = [self.model.register_forward_pre_hook(self._step_begins),
                         self.model.register_forward_hook(self._forward_ends),
                         register_optimizer_step_pre_hook(self._optimizer_begins),
                         register_optimizer_step_post_hook(self._optimizer_ends)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        if self._record is not None:  # a step that never reached its optimizer step is not kept
            self._record.close()
        self._record, self._in_step = None, False

    def _step_begins(self, module, args) -> None:
        if self._in_step or not torch.is_grad_enabled():
            return  # a second micro-batch of the same step, or an evaluation forward (no_grad)
        self._in_step, self._params = True, {id(p) for p in self.model.parameters()}
        self.steps_seen += 1
        if self.steps_seen == 1 or self.steps_seen % self.every == 0:
            on_cuda = any(p.is_cuda for p in self.model.parameters())
            cuda = on_cuda if self.cuda is None else bool(self.cuda)
            self._record = _StepRecord(self.model, self.steps_seen, cuda)

    def _forward_ends(self, module, args, output) -> None:
        if self._record is not None and self._record.phase == "forward":
            self._record.end_forward()

    def _optimizer_begins(self, optimizer, args, kwargs) -> None:
        if self._record is not None and self._record.owns(optimizer):
            self._record.before_optimizer(optimizer)

    def _optimizer_ends(self, optimizer, args, kwargs) -> None:
        if not self._in_step or not any(id(p) in self._params for g in optimizer.param_groups for p in g["params"]):
            return
        if self._record is not None:
            self._record.after_optimizer(optimizer)
            self.timelines.append(self._record.close())
        self._record, self._in_step = None, False


def record_step(model: nn.Module, batch, optimizer: torch.optim.Optimizer | None = None, *,
                gradient_checkpointing: bool = False) -> StepTimeline:
    """`measure`'s step, recorded event by event; ``timeline.breakdown`` is `measure`'s `MemoryBreakdown`.

    Args:
        model, batch, optimizer, gradient_checkpointing: as in `lora_lab.train.measure` (None: a throwaway AdamW
            with ``lr=0``, so the weights do not move; its state is still allocated, at the optimizer step).

    Returns:
        The step's `StepTimeline`; on CUDA its ``cuda`` attribute holds the allocator's view of the same step.
    """
    with TimelineRecorder(model) as recorder:
        breakdown = measure(model, batch, optimizer, gradient_checkpointing=gradient_checkpointing)
    return dataclasses.replace(recorder.latest, breakdown=breakdown)


# ------------------------------------------------------------------------------ the allocator's view (CUDA)

class _CudaLog:
    """CUDA's allocator history over one step, and the kit's names for the blocks it allocated."""

    def __init__(self):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        self.allocated = torch.cuda.memory_allocated()
        self.first = self._allocations()
        self.tags: list[tuple[int, int, str, str]] = []  # (allocations so far, address, category, module)
        self.marks: list[tuple[int, str]] = []  # (allocations so far, phase that begins)
        torch.cuda.memory._record_memory_history(max_entries=MAX_CUDA_EVENTS, context=None,
                                                 clear_history=True)  # this step's events only

    @staticmethod
    def _allocations() -> int:
        return torch.cuda.memory_stats().get("allocation.all.allocated", 0)

    def tag(self, ptr: int, category: str, module: str) -> None:
        self.tags.append((self._allocations() - self.first, ptr, category, module))

    def mark(self, phase: str) -> None:
        self.marks.append((self._allocations() - self.first, phase))

    def stop(self) -> list[dict]:
        torch.cuda.synchronize()
        snapshot = torch.cuda.memory._snapshot()
        torch.cuda.memory._record_memory_history(enabled=None)
        return snapshot["device_traces"][torch.cuda.current_device()]

    def finish(self, start: dict[str, int]) -> StepTimeline:
        trace = self.stop()
        timeline = allocator_timeline(trace, start, self.allocated, self.tags, self.marks)
        timeline.cuda_peak = torch.cuda.max_memory_allocated()
        return timeline


def allocator_timeline(trace: Sequence[dict], start: dict[str, int], allocated: int,
                       tags: Sequence[tuple[int, int, str, str]] = (),
                       marks: Sequence[tuple[int, str]] = ()) -> StepTimeline:
    """The allocator's view of a step, from ``torch.cuda.memory._snapshot()["device_traces"][device]``.

    Every ``alloc`` adds its block's size and every ``free_completed`` takes it away again, so the totals are
    ``torch.cuda.memory_allocated`` after each event and their peak is ``max_memory_allocated``.

    Args:
        trace: the allocator's entries (``action``, ``addr``, ``size``) in order.
        start: the kit's view of what was held before the step (`StepTimeline.start`); what the allocator held
            beyond it (the batch, rounding to 512-byte blocks) starts as temporaries.
        allocated: ``torch.cuda.memory_allocated()`` before the step.
        tags: ``(n, address, category, module)``: the block at ``address`` that was live after the step's n-th
            allocation holds ``category`` (a saved activation, a gradient, a state tensor) for ``module``.
        marks: ``(n, phase)``: ``phase`` begins after the step's n-th allocation.
    """
    by_address: dict[int, list[int]] = {}
    allocs = [e for e in trace if e.get("action") == "alloc"]
    for n, e in enumerate(allocs, start=1):
        by_address.setdefault(e["addr"], []).append(n)
    names: dict[int, tuple[str, str]] = {}
    for count, addr, category, module in tags:
        ns = by_address.get(addr, [])
        i = bisect.bisect_right(ns, count)
        if i:
            names.setdefault(ns[i - 1], (category, module))
    first = dict.fromkeys(TIMELINE_CATEGORIES, 0) | dict(start)
    first["temporaries"] += max(allocated - sum(first.values()), 0)
    phases, n, live, events = sorted(marks), 0, {}, []
    for e in trace:
        if e.get("action") == "alloc":
            n += 1
            live[e["addr"]] = names.get(n, ("temporaries", ""))
            events.append(MemoryEvent(_phase_at(phases, n), *live[e["addr"]], e["size"]))
        elif e.get("action") == "free_completed":
            category, module = live.pop(e["addr"], ("temporaries", ""))
            events.append(MemoryEvent(_phase_at(phases, n), category, module, -e["size"]))
    return StepTimeline(start=first, events=events, view="cuda")


def _phase_at(marks: Sequence[tuple[int, str]], n: int) -> str:
    """The phase after the n-th allocation: the last mark at or before it (forward before any)."""
    phase = "forward"
    for count, name in marks:
        if count < n:
            phase = name
    return phase

