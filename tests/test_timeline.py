"""lora_lab.timeline: a step's events against tensors built by hand, `measure`'s breakdown and the real layers."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.modules import module as nn_module
from torch.optim import optimizer as optim_module

from lora_lab.inject import apply_lora
from lora_lab.lora import LoraConfig
from lora_lab.model import LlamaConfig, LlamaForCausalLM
from lora_lab.qlora import NF4Linear, apply_qlora
from lora_lab.timeline import (TIMELINE_CATEGORIES, MemoryEvent, StepTimeline, TimelineRecorder, allocator_timeline,
                               record_step)
from lora_lab.train import finetune, measure

F32 = 4  # bytes per float32 element
TINY = dict(vocab_size=20, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=16)


class TwoLinear(nn.Module):
    """loss = sum(relu(W2 (W1 x) + b2)^2): W1 (3, 4) frozen, W2 (2, 3) + b2 (2,) trainable, a float64 buffer (5,)."""

    def __init__(self):
        super().__init__()
        self.frozen = nn.Linear(4, 3, bias=False).requires_grad_(False)
        self.head = nn.Linear(3, 2)
        self.register_buffer("table", torch.zeros(5, dtype=torch.float64))

    def forward(self, x, labels=None):
        h = self.frozen(x)  # (B, 3); nothing before it needs grad, so nothing is saved
        r = torch.relu(self.head(h))  # addmm saves h (and W2.t(), a view of a parameter); relu saves r
        return (r * r).sum(), r  # mul saves r twice: one storage


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**TINY))


def tiny_batch(batch=2, seq=16):
    ids = torch.randint(0, TINY["vocab_size"], (batch, seq), generator=torch.Generator().manual_seed(0))
    return ids, ids


@settings(max_examples=5, deadline=None)
@given(batch=st.integers(1, 16))
def test_hand_built_step_peaks_at_the_end_of_the_forward_pass(batch):
    model = TwoLinear()
    timeline = record_step(model, (torch.randn(batch, 4), None))
    frozen, trainable, acts = 3 * 4 * F32 + 5 * 8, (2 * 3 + 2) * F32, batch * 3 * F32 + batch * 2 * F32
    adam = 2 * (2 * 3 + 2) * F32 + 2 * F32  # exp_avg, exp_avg_sq + a float32 step per parameter
    assert timeline.start == dict.fromkeys(TIMELINE_CATEGORIES, 0) | dict(frozen_weights=frozen,
                                                                          trainable_weights=trainable)
    end_of_forward = timeline.phase_spans()[0][2]
    assert timeline.at(end_of_forward) == timeline.start | dict(activations=acts)  # h and r, nothing else yet
    # the peak is there once the activations outweigh the gradients and AdamW's state (from batch 6 on)
    assert (timeline.peak_index == end_of_forward) == (acts > trainable + adam)
    assert timeline.peak_phase() == (("forward", True) if acts > trainable + adam else ("optimizer", True))
    assert timeline.at(len(timeline.events)) == timeline.start | dict(gradients=trainable, optimizer_state=adam)
    # every category's largest value is measure's count of it, byte for byte
    assert timeline.maxima() == timeline.breakdown.as_dict() | dict(temporaries=0)


def test_second_step_holds_the_optimizer_state_from_its_start():
    model = TwoLinear()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.0)
    x = torch.randn(3, 4)
    record_step(model, (x, None), optimizer)
    second = record_step(model, (x, None), optimizer)
    parts = second.breakdown.as_dict()
    assert second.start["optimizer_state"] == parts["optimizer_state"] > 0
    # the moments exist already: the optimizer step shows as one event that allocates nothing
    assert [(e.phase, e.nbytes) for e in second.events if e.category == "optimizer_state"] == [("optimizer", 0)]
    # at the peak, the categories add up to measure's breakdown without the gradients (not yet formed)
    assert second.peak == sum(parts.values()) - parts["gradients"]


def test_events_name_their_phase_and_module():
    model = TwoLinear()
    timeline = record_step(model, (torch.randn(2, 4), None))
    saved = [e for e in timeline.events if e.category == "activations"]
    assert [(e.phase, e.module, e.nbytes) for e in saved if e.nbytes > 0] == [("forward", "head", 2 * 3 * F32),
                                                                           ("forward", "", 2 * 2 * F32)]
    assert {e.phase for e in saved if e.nbytes < 0} == {"backward"} and sum(e.nbytes for e in saved) == 0
    grads = [e for e in timeline.events if e.category == "gradients"]
    assert {(e.phase, e.module) for e in grads} == {("backward", "head")} and len(grads) == 2  # W2 and b2
    state = [e for e in timeline.events if e.category == "optimizer_state"]
    assert {(e.phase, e.module) for e in state} == {("optimizer", "head")}
    assert [name for name, _, _ in timeline.phase_spans()] == ["forward", "backward", "optimizer"]


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_step_matches_measure_and_checkpointing_lowers_the_peak(checkpointing):
    model = apply_lora(tiny_llama(), LoraConfig(r=4))
    batch = tiny_batch()
    timeline = record_step(model, batch, gradient_checkpointing=checkpointing)
    assert timeline.maxima() == measure(model, batch, gradient_checkpointing=checkpointing).as_dict() | dict(
        temporaries=0)
    assert timeline.at(len(timeline.events))["activations"] == 0  # checkpointed inputs are released too
    if checkpointing:
        assert timeline.peak < record_step(model, batch).peak


def test_qlora_dequantized_weights_come_and_go_layer_by_layer():
    model = apply_qlora(tiny_llama(), LoraConfig(r=4))
    timeline = record_step(model, tiny_batch())
    layers = {name: m for name, m in model.named_modules() if isinstance(m, NF4Linear)}
    temps = [e for e in timeline.events if e.category == "temporaries"]
    for e in temps:  # the real dequantized tensor's size, per layer
        m = layers[e.module]
        assert abs(e.nbytes) == m.dequantized_weight(m.compute_dtype).nbytes
    forward = [e for e in temps if e.phase == "forward"]
    assert len(forward) == 2 * len(layers)  # each layer once, freed before the next one starts
    assert [e.module for e in forward[::2]] == [e.module for e in forward[1::2]]
    # backward dequantizes again, except where the input needs no gradient (layer 0's q, k, v: frozen embeddings)
    backward = {e.module for e in temps if e.phase == "backward"}
    assert backward == set(layers) - {f"model.layers.0.self_attn.{p}_proj.base_layer" for p in "qv"} - {
        "model.layers.0.self_attn.k_proj"}
    assert timeline.curve()[:, TIMELINE_CATEGORIES.index("temporaries")].max() == max(
        m.out_features * m.in_features * F32 for m in layers.values())


def test_recorder_follows_finetune_and_skips_evaluation():
    model = tiny_llama()
    task = _TinyTask()
    with TimelineRecorder(model, every=2) as recorder:
        history = finetune(model, task, method="lora", config=LoraConfig(r=2), steps=4, batch_size=2,
                           eval_every=2, measure_memory=True)
    assert [t.step for t in recorder.timelines] == [1, 2, 4] == history.memory_steps
    for timeline, breakdown in zip(recorder.timelines, history.memory):
        assert timeline.maxima()["activations"] == breakdown.activations
        assert timeline.maxima()["trainable_weights"] == breakdown.trainable_weights


def test_recorder_removes_every_hook_and_leaves_the_model_unchanged():
    model = apply_lora(tiny_llama(), LoraConfig(r=4))
    for layer in model.modules():  # a nonzero B, so a real step would move A
        if hasattr(layer, "lora_B"):
            nn.init.normal_(layer.lora_B["default"].weight)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    before_hooks = global_hooks()
    record_step(model, tiny_batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None and not p._post_accumulate_grad_hooks for p in model.parameters())
    assert not model._forward_pre_hooks and not model._forward_hooks
    assert global_hooks() == before_hooks


def global_hooks():
    """How many module and optimizer hooks are registered for every module / optimizer."""
    return (len(nn_module._global_forward_pre_hooks), len(nn_module._global_forward_hooks),
            len(optim_module._global_optimizer_pre_hooks), len(optim_module._global_optimizer_post_hooks))


def test_a_nan_loss_is_refused_and_leaves_the_model_as_it_was():
    model = TwoLinear()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="finite loss"):
        record_step(model, (torch.full((2, 4), float("nan")), None))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError):
        TimelineRecorder("model")
    for every in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            TimelineRecorder(TwoLinear(), every=every)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            TimelineRecorder(TwoLinear(), cuda=True)


def test_allocator_timeline_replays_a_trace_and_names_its_blocks():
    trace = [dict(action="segment_alloc", addr=0, size=2**20),
             dict(action="alloc", addr=0, size=512),  # 1: a saved activation
             dict(action="alloc", addr=512, size=1024),  # 2: a temporary
             dict(action="free_requested", addr=512, size=1024), dict(action="free_completed", addr=512, size=1024),
             dict(action="alloc", addr=512, size=2048),  # 3: the same address again, now a gradient
             dict(action="free_completed", addr=0, size=512)]
    start = dict(frozen_weights=4096, trainable_weights=1024)
    timeline = allocator_timeline(trace, start, allocated=6144, tags=[(1, 0, "activations", "layer"),
                                                                      (3, 512, "gradients", "layer")],
                                  marks=[(2, "backward")])
    assert timeline.start["temporaries"] == 6144 - 4096 - 1024  # what the allocator held beyond the kit's tensors
    assert [(e.phase, e.category, e.nbytes) for e in timeline.events] == [
        ("forward", "activations", 512), ("forward", "temporaries", 1024), ("forward", "temporaries", -1024),
        ("backward", "gradients", 2048), ("backward", "activations", -512)]
    assert timeline.peak == 6144 + 512 + 2048 and timeline.view == "cuda"


def test_step_timeline_arithmetic():
    timeline = StepTimeline(start={"frozen_weights": 10}, events=[
        MemoryEvent("forward", "activations", "a", 5), MemoryEvent("backward", "activations", "a", -5),
        MemoryEvent("backward", "gradients", "a", 3)])
    assert timeline.totals.tolist() == [10, 15, 10, 13]
    assert timeline.peak_index == 1 and timeline.peak_phase() == ("forward", True)
    assert timeline.phase_spans() == [("forward", 1, 1), ("backward", 2, 3)]
    assert StepTimeline(start={"frozen_weights": 1}).peak_phase() == (None, False)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA's allocator history needs a CUDA device")
def test_cuda_allocator_view_peaks_at_max_memory_allocated():
    model = apply_lora(tiny_llama(), LoraConfig(r=4)).cuda()
    timeline = record_step(model, tuple(t.cuda() for t in tiny_batch(16)))
    cuda = timeline.cuda
    assert cuda is not None and cuda.peak == cuda.cuda_peak  # the replayed log is the allocator's own count
    assert cuda.maxima()["gradients"] >= timeline.maxima()["gradients"]  # blocks are rounded up, never down
    assert cuda.maxima()["activations"] >= timeline.maxima()["activations"] > 0
    # the allocator holds at least the kit's tensors; in a model this small its own scratch (cuBLAS' workspace)
    # can outweigh them, so "within 10 % of the CUDA peak" is benchmarks/gpu_check.py's check, at 1B parameters
    assert timeline.peak <= cuda.cuda_peak


class _TinyTask:
    """A task for `finetune`: random token ids, the loss as its evaluation."""

    seq_len = 8

    def get_batch(self, split, batch_size, generator=None):
        ids = torch.randint(0, TINY["vocab_size"], (batch_size, self.seq_len), generator=generator)
        return ids, ids

    def evaluate(self, model, split="eval", max_examples=None):
        ids, labels = self.get_batch(split, 2, torch.Generator().manual_seed(1))
        with torch.no_grad():
            loss, _ = model(ids, labels=labels)
        return {"loss": float(loss), "accuracy": 0.0}


@pytest.mark.parametrize("method", ["lora", "qlora"])
def test_a_step_on_the_meta_device_is_recorded_like_a_real_one(method):
    # the estimator's device: shapes without data, so notebook 05 can show a 7B step from the inside
    def build(device):
        torch.manual_seed(0)
        with torch.device(device):
            model = LlamaForCausalLM(LlamaConfig(**TINY))
        return (apply_lora if method == "lora" else apply_qlora)(model, LoraConfig(r=4))

    ids = tiny_batch()[0]
    real = record_step(build("cpu"), (ids, ids), gradient_checkpointing=True)
    meta = record_step(build("meta"), (ids.to("meta"), ids.to("meta")), gradient_checkpointing=True)
    assert meta.maxima() == real.maxima() and meta.peak == real.peak
    assert [(e.phase, e.category, e.module) for e in meta.events] == [(e.phase, e.category, e.module)
                                                                       for e in real.events]


def test_a_step_of_a_model_in_eval_mode_is_recorded_too():
    # measure does not switch the model to training mode: a step is a forward with gradients on, then step()
    x = torch.randn(4, 4)
    assert record_step(TwoLinear().eval(), (x, None)).maxima() == record_step(TwoLinear(), (x, None)).maxima()
