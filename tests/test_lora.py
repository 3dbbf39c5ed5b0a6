"""Invariants of lora_lab.lora: LoraConfig, LoRALinear, the blog-post LoRALayer and count_parameters."""

import contextlib
import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from toy_models import TinyLM, randomize_lora_B

from lora_lab import LoraConfig, LoRALayer, LoRALinear, ParameterCount, apply_lora, count_parameters

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
FAST = settings(max_examples=20, deadline=None)


@st.composite
def layer_cases(draw):
    """A LoRALinear of random size/rank/dtype with random A and nonzero B, and an input with 0-3 leading dims."""
    n_in, n_out = draw(st.integers(1, 40)), draw(st.integers(1, 40))
    r = draw(st.integers(1, min(n_in, n_out)))
    dtype = draw(st.sampled_from(DTYPES))
    lead = draw(st.lists(st.integers(1, 3), max_size=3))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    base = nn.Linear(n_in, n_out, bias=draw(st.booleans())).to(dtype)
    layer = LoRALinear(base, r, lora_alpha=draw(st.sampled_from([r, 1, 16])), use_rslora=draw(st.booleans()))
    # A ~ N(0, 1/in) (the paper's Gaussian, at Kaiming's scale); B's scale is drawn so that the update
    # B A ranges from well below |W0| (~ 1/sqrt(in)) to well above it.
    b_std = draw(st.sampled_from([1e-2, 1.0, 10.0]))
    with torch.no_grad():
        layer.lora_A["default"].weight.copy_(torch.randn(r, n_in) / math.sqrt(n_in))
        layer.lora_B["default"].weight.copy_(b_std * torch.randn(n_out, r))
    assert layer.get_delta_weight().abs().max() > 0  # with B A = 0 the merge tests would check nothing
    x = torch.randn(*lead, n_in).to(dtype)
    return layer, x


def abs_bound(layer, x):
    """|x| (|W0| + |dW|)^T + |b| + scaling |x| |A|^T |B|^T: the magnitude rounding errors scale with."""
    f = lambda t: t.detach().abs().double()  # noqa: E731
    base = layer.base_layer
    bias = f(base.bias) if base.bias is not None else 0
    return (f(x) @ (f(base.weight) + f(layer.get_delta_weight())).T + bias
            + layer.scaling["default"] * f(x) @ f(layer.lora_A["default"].weight).T
            @ f(layer.lora_B["default"].weight).T)


# ------------------------------------------------------------------------------------------ LoRALinear


@FAST
@given(layer_cases())
def test_output_equals_base_at_init(case):
    layer, x = case
    layer.reset_lora_parameters()
    assert torch.equal(layer(x), layer.base_layer(x))  # B = 0 makes the update exactly zero, not just small


@FAST
@given(layer_cases())
def test_merge_then_unmerge_restores_base_weight(case):
    layer, _ = case
    w0 = layer.base_layer.weight.detach().clone()
    delta = layer.get_delta_weight()
    layer.merge()
    layer.unmerge()
    # (W0 + d) - d is rounded twice in W0's dtype, each time by at most eps/2 of a value <= |W0| + |d|
    # (the (1 + eps) covers the second-order term); subnormals round by up to half the smallest step.
    # The bound is sharp: two roundings the same way, with W0 at the bottom of its binade, come within 3% of it.
    info = torch.finfo(w0.dtype)
    bound = info.eps * (w0.abs().double() + delta.abs().double()) * (1 + info.eps) + info.smallest_normal * info.eps
    assert ((layer.base_layer.weight.double() - w0.double()).abs() <= bound).all()


@FAST
@given(layer_cases())
def test_merged_and_unmerged_outputs_agree(case):
    layer, x = case
    unmerged = layer(x).double()
    layer.merge()
    merged = layer(x).double()
    # Both paths compute the same sum, each within (n + r + 8) * eps/2 of it relative to abs_bound: a dot product
    # of length n or r carries at most n*eps/2 (Higham's gamma_n), and the few other roundings (bias, scaling,
    # casting the fp32 delta, W0 + delta, the final add) are eps/2 each. The difference is at most twice that.
    # Values below the smallest normal round by up to half its step (eps * smallest_normal) instead.
    info = torch.finfo(x.dtype)
    roundings = layer.in_features + layer.r["default"] + 8
    tol = roundings * info.eps * abs_bound(layer, x) + roundings * info.eps * info.smallest_normal
    assert ((merged - unmerged).abs() <= tol).all()


def test_forward_is_the_paper_formula():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(12, 10), r=3, lora_alpha=6)
    randomize_lora_B(layer)
    x = torch.randn(4, 5, 12)
    W0, b, A, B = (t.detach() for t in (layer.base_layer.weight, layer.base_layer.bias,
                                        layer.lora_A["default"].weight, layer.lora_B["default"].weight))
    expected = x @ (W0 + (6 / 3) * B @ A).T + b  # h = (W0 + alpha/r B A) x + b
    torch.testing.assert_close(layer(x), expected)  # fp32 default tolerance: same sum, other association


@FAST
@given(layer_cases())
def test_only_lora_parameters_get_gradients(case):
    layer, x = case
    layer(x).float().sum().backward()
    assert layer.base_layer.weight.grad is None
    assert layer.base_layer.bias is None or layer.base_layer.bias.grad is None
    assert layer.lora_A["default"].weight.grad is not None and layer.lora_B["default"].weight.grad is not None


def test_zero_B_gives_B_a_gradient_and_A_none_yet():
    """Pins `# Note: why lora_B starts at zero`: at init only B moves; A starts moving once B != 0."""
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(16, 16), r=4)
    layer(torch.randn(8, 16)).pow(2).sum().backward()
    assert layer.lora_B["default"].weight.grad.abs().sum() > 0
    assert torch.equal(layer.lora_A["default"].weight.grad, torch.zeros_like(layer.lora_A["default"].weight))


def test_init_is_kaiming_uniform_for_A_and_zero_for_B():
    layer = LoRALinear(nn.Linear(256, 64), r=64)
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=sqrt(5)): sqrt(6 / ((1 + 5) * fan_in))
    a = layer.lora_A["default"].weight
    assert a.abs().max() <= bound and a.abs().max() > 0.95 * bound  # 16k uniform draws reach the edge
    assert abs(a.std().item() - bound / math.sqrt(3)) < 0.02 * bound  # std of U(-b, b) is b/sqrt(3)
    assert torch.equal(layer.lora_B["default"].weight, torch.zeros(64, 64))


@pytest.mark.parametrize("alpha, rslora, expected", [(16, False, 4.0), (16, True, 8.0), (4, False, 1.0)])
def test_scaling(alpha, rslora, expected):
    layer = LoRALinear(nn.Linear(8, 8), r=4, lora_alpha=alpha, use_rslora=rslora)
    assert layer.scaling["default"] == expected  # alpha/r, alpha/sqrt(r), and alpha = r means scaling 1
    assert LoraConfig(r=4, lora_alpha=alpha, use_rslora=rslora).scaling == expected


def test_defaults_are_peft_defaults():
    """A config (or adapter_config.json) that leaves a field out means the same here as in PEFT."""
    peft = pytest.importorskip("peft", reason="compares the defaults with PEFT's LoraConfig")
    fields = ("r", "lora_alpha", "lora_dropout", "bias", "use_rslora")
    theirs = peft.LoraConfig()
    assert {f: getattr(LoraConfig(), f) for f in fields} == {f: getattr(theirs, f) for f in fields}
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as peft_targets

    assert list(LoraConfig().target_modules) == peft_targets["llama"]  # what target_modules=None picks for Llama
    layer = LoRALinear(nn.Linear(16, 16))  # the layer's defaults are the config's
    mine = (layer.r["default"], layer.lora_alpha["default"], layer.scaling["default"])
    assert mine == (theirs.r, theirs.lora_alpha, 1.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_adapters_take_the_base_dtype_and_shapes(dtype):
    layer = LoRALinear(nn.Linear(12, 7, dtype=dtype), r=5)
    assert layer.lora_A["default"].weight.shape == (5, 12) and layer.lora_B["default"].weight.shape == (7, 5)
    assert layer.lora_A["default"].weight.dtype == layer.lora_B["default"].weight.dtype == dtype
    assert layer(torch.randn(2, 12, dtype=dtype)).dtype == dtype
    assert layer.get_delta_weight().shape == (7, 12) and layer.get_delta_weight().dtype == dtype
    assert layer.get_delta_weight(dtype=torch.float64).dtype == torch.float64


def test_forward_needs_only_in_and_out_features():
    """A quantized base (no float weight) is wrapped the same way; only merging needs base_layer.weight."""

    class Packed(nn.Module):
        in_features, out_features = 6, 4

        def __init__(self):
            super().__init__()
            self.register_buffer("weight", torch.zeros(12, dtype=torch.uint8))  # packed storage

        def forward(self, x):
            return x[..., :4] * 2

    layer = LoRALinear(Packed(), r=2)
    assert layer.lora_A["default"].weight.dtype == torch.float32
    x = torch.randn(3, 6)
    assert torch.equal(layer(x), x[..., :4] * 2)
    with pytest.raises(TypeError, match="Packed"):
        layer.merge()


@pytest.mark.parametrize("kwargs, match", [
    ({"r": 0}, "positive int"), ({"r": 2.0}, "positive int"), ({"r": 9}, "min"),
    ({"r": 2, "lora_dropout": 1.0}, r"\[0, 1\)"), ({"r": 2, "lora_dropout": -0.1}, r"\[0, 1\)"),
])
def test_layer_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoRALinear(nn.Linear(16, 8), **kwargs)


@pytest.mark.parametrize("alpha", [0, -1, float("nan"), float("inf"), True, "16"])
def test_layer_rejects_a_lora_alpha_that_is_not_positive_and_finite(alpha):
    with pytest.raises(ValueError, match="lora_alpha"):
        LoRALinear(nn.Linear(16, 8), r=2, lora_alpha=alpha)


@pytest.mark.parametrize("make", [lambda flag: LoraConfig(use_rslora=flag),
                                  lambda flag: LoRALinear(nn.Linear(4, 4), r=2, use_rslora=flag)],
                         ids=["LoraConfig", "LoRALinear"])
@pytest.mark.parametrize("flag", ["false", 0, 1, None])
def test_use_rslora_must_be_a_real_bool(make, flag):
    with pytest.raises(TypeError, match="True or False"):
        make(flag)


def test_layer_rejects_non_linear_and_double_wrapping():
    with pytest.raises(TypeError, match="Conv1d"):
        LoRALinear(nn.Conv1d(4, 4, 1), r=2)
    with pytest.raises(ValueError, match="already a LoRALinear"):
        LoRALinear(LoRALinear(nn.Linear(4, 4), r=2), r=2)


def test_merge_state_errors():
    layer = LoRALinear(nn.Linear(4, 4), r=2)
    with pytest.raises(ValueError, match="not merged"):
        layer.unmerge()
    layer.merge()
    assert layer.merged
    with pytest.raises(ValueError, match="already merged"):
        layer.merge()


def test_dropout_touches_only_the_adapter_path():
    torch.manual_seed(0)
    layer = LoRALinear(nn.Linear(8, 8), r=2, lora_dropout=0.5)
    assert isinstance(layer.lora_dropout["default"], nn.Dropout)
    x = torch.randn(64, 8)
    assert torch.equal(layer(x), layer.base_layer(x))  # train mode, dropout on, but B = 0: base is untouched
    randomize_lora_B(layer)
    layer.eval()
    torch.testing.assert_close(layer(x), x @ (layer.base_layer.weight + layer.get_delta_weight()).T
                               + layer.base_layer.bias)  # eval: no dropout; fp32 default tolerance


# ------------------------------------------------------------------------------------- the blog post

BLOG_EXAMPLE = """
import torch
import torch.nn as nn
from lora_lab import LoRALayer

# 예제: 기존 Linear 레이어에 LoRA 적용
original_layer = nn.Linear(768, 768)
lora_layer = LoRALayer(original_layer, rank=8) # rank 값 조정 가능

# 입력 데이터
x = torch.randn(1, 768)
output = lora_layer(x)

print(f"Output shape: {output.shape}")
"""


def test_blog_post_example_runs_unchanged():
    scope, out = {}, io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(BLOG_EXAMPLE, scope)
    assert out.getvalue() == "Output shape: torch.Size([1, 768])\n"
    layer, x = scope["lora_layer"], scope["x"]
    assert isinstance(layer, LoRALinear) and layer.r["default"] == layer.rank == 8 and layer.scaling["default"] == 1.0
    assert layer.original_layer is scope["original_layer"] and not layer.base_layer.weight.requires_grad
    assert torch.equal(scope["output"], scope["original_layer"](x))


def test_blog_post_formula_with_trained_factors():
    """The post computes original(x) + x @ A @ B with A (in, r), B (r, out): our lora_A.weight.T, lora_B.weight.T."""
    torch.manual_seed(0)
    layer = LoRALayer(nn.Linear(32, 16), rank=4)
    randomize_lora_B(layer)
    x = torch.randn(5, 32)
    A, B = layer.lora_A["default"].weight.detach().T, layer.lora_B["default"].weight.detach().T
    torch.testing.assert_close(layer(x), layer.original_layer(x) + x @ A @ B)  # fp32 default tolerance


# ------------------------------------------------------------------------------------------ LoraConfig


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"lora_alpha": 0}, {"lora_alpha": float("nan")},
                                    {"lora_alpha": float("inf")}, {"bias": "some"}, {"target_modules": []},
                                    {"target_modules": ""}, {"target_modules": "("}, {"lora_dropout": 1}])
def test_config_validates_on_construction(kwargs):
    with pytest.raises(ValueError):
        LoraConfig(**kwargs)


# ------------------------------------------------------------------------------------ count_parameters


def test_count_parameters_and_its_printout():
    model = TinyLM()
    total = sum(p.numel() for p in model.parameters())
    assert count_parameters(model) == (total, total)
    apply_lora(model, LoraConfig(r=2))
    count = count_parameters(model)
    assert isinstance(count, ParameterCount) and count.total == total + count.trainable
    assert count.percent == pytest.approx(100 * count.trainable / count.total)
    assert str(count) == (f"trainable params: {count.trainable:,} || all params: {count.total:,} "
                          f"|| trainable%: {count.percent:.4f}")


def test_count_parameters_counts_tied_weights_once_and_uses_logical_numel():
    model = TinyLM()
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in many LMs
    assert count_parameters(model).total == sum(p.numel() for p in model.parameters())

    class Packed4bit(nn.Module):  # two 4-bit weights per stored byte
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(32, dtype=torch.uint8), requires_grad=False)

        def logical_numel(self):
            return 2 * self.weight.numel()

    assert count_parameters(nn.Sequential(Packed4bit(), nn.Linear(2, 3))) == (9, 64 + 9)
