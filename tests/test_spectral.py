"""Tests for lora_lab.spectral: intruder dimensions (arXiv 2410.21228) and PEFT's mitigation of them."""

import copy

import pytest
import torch

from model_state import assert_unchanged, snapshot
from peft_twin import PREFIX, logits, tiny_llama, token_ids

from lora_lab import LoraConfig, apply_lora, lora_layers, set_adapter
from lora_lab.spectral import intruder_dimensions, max_cosine, mitigated_factors, model_cosines, \
    reduce_intruder_dimension

peft = pytest.importorskip("peft", reason="the mitigation is checked against PEFT's reduce_intruder_dimension")
transformers = pytest.importorskip("transformers", reason="PEFT's twin is a transformers Llama")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
from peft.tuners.lora.intruders import reduce_intruder_dimension as peft_reduce  # noqa: E402

CONFIG = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])


def weight(seed=0, shape=(64, 48)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_the_pretrained_weight_has_no_intruders_against_itself():
    w0 = weight()
    assert intruder_dimensions(w0, w0) == []
    torch.testing.assert_close(max_cosine(w0, w0), torch.ones(10, dtype=torch.float64))


def test_a_tiny_update_adds_no_intruders():
    w0 = weight()
    assert intruder_dimensions(w0, w0 + 1e-6 * weight(seed=1)) == []


def test_a_rank_one_spike_outside_w0s_top_directions_is_an_intruder():
    w0 = weight()
    u0 = torch.linalg.svd(w0, full_matrices=False).U  # (64, 48)
    direction = u0[:, 24:].sum(1) / 24 ** 0.5  # spread over W0's bottom half: |cos| with each is 1/sqrt(24)
    spike = 10 * torch.linalg.matrix_norm(w0, ord=2) * torch.outer(direction, weight(seed=2, shape=(48,)))
    assert intruder_dimensions(w0, w0 + spike) == [0]  # the new top singular vector, and only it
    assert max_cosine(w0, w0 + spike)[0] < 0.25


def test_a_spike_along_one_of_w0s_own_directions_is_not_an_intruder():
    w0 = weight()
    u0 = torch.linalg.svd(w0, full_matrices=False).U
    spike = 10 * torch.linalg.matrix_norm(w0, ord=2) * torch.outer(u0[:, -1], weight(seed=2, shape=(48,)))
    assert intruder_dimensions(w0, w0 + spike) == []  # large, but W0 had that direction (its smallest)


@pytest.mark.parametrize("args, match", [
    ((weight(), weight(shape=(48, 64))), "same shape"),
    ((weight(), weight().fill_(float("nan"))), "NaN"),
    ((weight(), weight(), 0), "top_k"),
    ((weight(), weight(), 10, 1.5), "threshold_epsilon"),
])
def test_bad_inputs_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        intruder_dimensions(*args)


@pytest.fixture(scope="module")
def base():
    return tiny_llama(transformers)


def spiked_lora(base, seed=0):
    """Our LoRA model with large random factors (large enough to put intruders into the merged weights)."""
    ours = apply_lora(copy.deepcopy(base), LoraConfig(**CONFIG))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen))
    return ours


def peft_copy(base, ours):
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**CONFIG))
    theirs.load_state_dict({PREFIX + k: v for k, v in ours.state_dict().items()})
    return theirs


@pytest.mark.parametrize("lam", [0.0, 0.5, 0.75])
def test_mitigation_gives_peft_s_adapter_and_outputs(base, lam):
    ours = spiked_lora(base)
    theirs = peft_copy(base, ours)
    found = reduce_intruder_dimension(ours, mitigation_lambda=lam)
    log = []
    peft_reduce(theirs, mitigation_lambda=lam, logging_sink=log.append)
    assert sum(found.values()) > 0  # the test exercises the mitigation, not only the copy of the factors
    assert [f"{PREFIX}{name}: Intruders: {n}" if n else f"{PREFIX}{name}: No intruders"
            for name, n in found.items()] == log[:-1]  # the same counts, layer by layer
    their_layers = {n.removeprefix(PREFIX): m for n, m in theirs.named_modules()
                    if isinstance(m, peft.tuners.lora.LoraLayer)}
    for name, layer in lora_layers(ours).items():
        # the refit is one SVD in float64 here and in float32 in PEFT: equal to float32's precision
        torch.testing.assert_close(layer.get_delta_weight("intruder_reduced"),
                                   their_layers[name].get_delta_weight("intruder_reduced"), rtol=1e-4, atol=1e-5)
    ids = token_ids()
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-4, atol=1e-4)


def test_lambda_one_keeps_the_adapter_and_the_old_one_stays(base):
    ours = spiked_lora(base)
    reduce_intruder_dimension(ours, mitigation_lambda=1.0)
    for layer in lora_layers(ours).values():
        torch.testing.assert_close(layer.get_delta_weight("intruder_reduced"), layer.get_delta_weight("default"),
                                   rtol=1e-5, atol=1e-5)
    assert ours.active_adapter == "intruder_reduced"
    before = logits(ours, token_ids())
    set_adapter(ours, "default")
    torch.testing.assert_close(logits(ours, token_ids()), before, rtol=1e-4, atol=1e-4)


def test_each_intruder_keeps_lambda_of_its_singular_value_before_the_rank_cut():
    w0 = weight().float()
    u0 = torch.linalg.svd(w0.double(), full_matrices=False).U
    direction = (u0[:, 24:].sum(1) / 24 ** 0.5).float()
    delta = 10 * torch.outer(direction, weight(seed=2, shape=(48,)).float())  # one intruder, W0's norm is ~15
    merged = (w0 + delta).double()
    u, s, vh = torch.linalg.svd(merged, full_matrices=False)
    a, b, found = mitigated_factors(w0, delta, r=48, scaling=2.0, mitigation_lambda=0.25)  # r = 48: no cut
    assert found == [0]
    new = w0.double() + 2.0 * (b.double() @ a.double())
    assert float(u[:, 0] @ new @ vh[0]) == pytest.approx(0.25 * float(s[0]), rel=1e-5)  # λ s_j along u_j v_j^T
    assert float(u[:, 1] @ new @ vh[1]) == pytest.approx(float(s[1]), rel=1e-5)  # the others are untouched


@pytest.mark.parametrize("kwargs, match", [
    (dict(old_adapter_name="nope"), "no adapter"),
    (dict(new_adapter_name="default"), "already has"),
    (dict(mitigation_lambda=float("nan")), "finite"),
    (dict(top_k=0), "top_k"),
])
def test_bad_calls_are_refused_and_change_nothing(base, kwargs, match):
    ours = spiked_lora(base)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=match):
        reduce_intruder_dimension(ours, **kwargs)
    assert_unchanged(ours, before)
    assert list(ours.peft_config) == ["default"]


def test_model_cosines_cover_every_target_and_match_max_cosine(base):
    ours = spiked_lora(base)
    cos = model_cosines(base, ours)
    assert list(cos) == list(lora_layers(ours))
    name = next(iter(cos))
    layer = ours.get_submodule(name)
    torch.testing.assert_close(cos[name], max_cosine(layer.base_layer.weight, layer.weight))
