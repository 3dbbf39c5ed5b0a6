"""lora_lab.variants: the starting error of each variant on the kit's model, against the same error computed with
PEFT's PiSSA and LoftQ and bitsandbytes' NF4; the equal-budget training comparison and its snapshots."""

import copy
import math

import pytest
import torch

from test_nf4 import bnb_dequantize, bnb_quantize

import lora_lab as ll
from lora_lab import variants
from lora_lab.lora_init import quantization_error

peft = pytest.importorskip("peft", reason="the starting errors are checked against PEFT's inits")
transformers = pytest.importorskip("transformers", reason="PEFT's inits run on the transformers export")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")


@pytest.fixture(scope="module")
def base():
    return ll.load_base_model("cpu")


@pytest.fixture(scope="module")
def ids():
    ids, _ = ll.load_task().get_batch("eval", 16, generator=torch.Generator().manual_seed(0))
    return ids


@pytest.fixture(scope="module")
def errors(base, ids):
    return variants.starting_errors(base, {n: variants.variant_config(n) for n in variants.VARIANTS}, ids)


def hf_twin(base, tmp_path):
    ll.export_hf(base, tmp_path / "hf")
    return transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def peft_error(hf, peft_model, ids, replace):
    """Logit MAE of ``peft_model`` after ``replace(name, layer)`` set each LoRA layer's base and factors."""
    with torch.no_grad():
        reference = hf(ids).logits.double()
        for name, layer in peft_model.named_modules():
            if isinstance(layer, peft.tuners.lora.Linear):
                replace(name.removeprefix("base_model.model."), layer)
        return float((peft_model(ids).logits.double() - reference).abs().mean())


def test_a_model_has_no_error_against_its_own_logits(base, ids):
    assert variants.logit_error(base, variants.model_logits(base, ids), ids) == variants.LogitError(0.0, 0.0)


def test_the_error_is_the_mean_absolute_and_squared_logit_difference(base, ids):
    moved = copy.deepcopy(base)
    with torch.no_grad():
        moved.lm_head.weight.add_(0.01)
    reference = variants.model_logits(base, ids)
    diff = variants.model_logits(moved, ids) - reference
    error = variants.logit_error(moved, reference, ids)
    assert error.mae == pytest.approx(float(diff.abs().mean()), rel=1e-12) and error.mae > 0
    assert error.mse == pytest.approx(float((diff ** 2).mean()), rel=1e-12)


def test_other_tokens_and_a_nan_model_are_refused(base, ids):
    with pytest.raises(ValueError, match="same ids"):
        variants.logit_error(base, variants.model_logits(base, ids[:4]), ids)
    broken = copy.deepcopy(base)
    with torch.no_grad():
        broken.lm_head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        variants.logit_error(broken, variants.model_logits(base, ids), ids)


def test_loftq_starts_closer_to_the_16bit_model_than_plain_qlora(errors):
    assert errors["LoftQ"].mae < errors["QLoRA"].mae and errors["LoftQ"].mse < errors["QLoRA"].mse


def test_qdora_starts_exactly_where_qlora_does(errors):
    assert errors["QDoRA"] == errors["QLoRA"]  # B = 0 and m = ||W0||_c: the 4-bit base alone


def test_an_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="variant must be one of"):
        variants.variant_config("VeRA")


def test_pissa_s_start_equals_peft_s_pissa_with_bitsandbytes_nf4(base, ids, tmp_path):
    ours = variants.starting_errors(base, {"PiSSA": variants.variant_config("PiSSA")}, ids)["PiSSA"]
    hf = hf_twin(base, tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=16, target_modules="all-linear",
                                                                      init_lora_weights="pissa"))

    def quantize_residual(name, layer):  # QPiSSA: PEFT's residual, to bitsandbytes' NF4 (double quant, block 64)
        w = layer.base_layer.weight
        w.copy_(bnb_dequantize(*bnb_quantize(w.detach().clone(), 64, "nf4", True)).reshape(w.shape))

    # Different SVD calls on the same weights may round a residual entry across an NF4 midpoint: a few codes apart.
    assert peft_error(hf, theirs, ids, quantize_residual) == pytest.approx(ours.mae, rel=1e-3)


def peft_loftq_on_cpu(weight, r):
    """One LoftQ step as PEFT's ``loftq_init`` takes it (bitsandbytes' NF4 without double quantization, PEFT's
    ``_low_rank_decomposition``), dequantized by bitsandbytes' pure-PyTorch kernel: its CPU kernel misreads the
    scales of down_proj's rows, 352 wide, not whole 64-blocks (see `test_nf4.bnb_dequantize`)."""
    from peft.utils.loftq_utils import _low_rank_decomposition

    deq = bnb_dequantize(*bnb_quantize(weight, 64, "nf4", False)).reshape(weight.shape)
    out = _low_rank_decomposition(weight - deq, reduced_rank=r)
    return out["R"], out["L"], deq


def test_loftq_s_start_equals_peft_s_loftq_algorithm(base, ids, tmp_path):
    # PEFT's LoftQ quantizes without double quantization and does not divide by s: compare at s = 1.
    config = variants.variant_config("LoftQ", r=8, lora_alpha=8)
    ours = variants.starting_errors(base, {"LoftQ": config}, ids, double_quant=False)["LoftQ"]
    hf = hf_twin(base, tmp_path)
    theirs = peft.get_peft_model(copy.deepcopy(hf), peft.LoraConfig(r=8, lora_alpha=8, target_modules="all-linear"))

    def loftq(name, layer):
        A, B, deq = peft_loftq_on_cpu(base.get_submodule(name).weight.detach(), 8)
        layer.base_layer.weight.copy_(deq)
        layer.lora_A["default"].weight.copy_(A)
        layer.lora_B["default"].weight.copy_(B)

    assert peft_error(hf, theirs, ids, loftq) == pytest.approx(ours.mae, rel=1e-4)


def test_the_callback_keeps_only_fits_that_lower_the_logit_error(base, ids):
    model = ll.apply_qlora(copy.deepcopy(base), variants.variant_config("QLoRA"))
    reference = variants.model_logits(base, ids)
    before = variants.logit_error(model, reference, ids).mse
    kept = variants.loftq_with_callback(model, base, ids)
    assert 0 < len(kept) < len(ll.lora_layers(model))  # on this model some fits help and some do not
    assert variants.logit_error(model, reference, ids).mse < before
    for name, layer in ll.lora_layers(model).items():
        assert (layer.lora_B["default"].weight.abs().sum() > 0) == (name in kept)  # rejected fits were rolled back


def test_the_callback_refuses_a_model_without_adapters(base, ids):
    with pytest.raises(ValueError, match="no LoRA layers"):
        variants.loftq_with_callback(copy.deepcopy(base), base, ids)


def test_plain_qlora_s_weight_error_is_nf4_s_error_and_loftq_lowers_it(base):
    plain = ll.apply_qlora(copy.deepcopy(base), variants.variant_config("QLoRA"))
    layers = ll.lora_layers(plain).items()
    expected = math.sqrt(sum(quantization_error(base.get_submodule(n).weight.detach(), m.base_layer.quant_state) ** 2
                             for n, m in layers))
    assert variants.weight_error(plain, base) == pytest.approx(expected, rel=1e-6)
    loftq = ll.apply_qlora(copy.deepcopy(base), variants.variant_config("LoftQ"))
    assert variants.weight_error(loftq, base) < expected


def test_the_sweep_is_starting_errors_at_each_rank(base, ids):
    makers = {"LoftQ": lambda r: variants.variant_config("LoftQ", r=r, lora_alpha=2 * r)}
    sweep = variants.error_sweep(base, ids, (2, 16), makers)
    assert sweep[16]["LoftQ"] == variants.starting_errors(base, {"LoftQ": makers["LoftQ"](16)}, ids)["LoftQ"]
    assert sweep[16]["LoftQ"].mae < sweep[2]["LoftQ"].mae


def test_equal_budget_runs_share_batches_and_snapshots(base):
    task = ll.load_task()
    names = ["model.layers.0.self_attn.q_proj"]
    configs = {"full": None, "QLoRA": variants.variant_config("QLoRA", target_modules=("q_proj",)),
               "QDoRA": variants.variant_config("QDoRA", target_modules=("q_proj",))}
    runs = variants.compare_training(base, task, configs, steps=4, batch_size=4, eval_every=2, eval_examples=8,
                                     snapshot_names=names, snapshot_steps=(2, 4))
    assert {label: r.history.eval_steps for label, r in runs.items()} == {k: [0, 2, 4] for k in configs}
    assert all(sorted(r.weights) == [0, 2, 4] for r in runs.values())
    assert torch.equal(runs["full"].weights[0][names[0]], base.get_submodule(names[0]).weight.detach())
    assert torch.equal(runs["QLoRA"].weights[0][names[0]], runs["QDoRA"].weights[0][names[0]])  # dequant(NF4(W))
    assert runs["full"].trainable == sum(p.numel() for p in base.parameters())
    assert runs["QDoRA"].trainable == runs["QLoRA"].trainable + 128 * 4  # a magnitude per output of 4 q_proj
    points = variants.magnitude_direction_points(runs["QDoRA"])
    assert [p[0] for p in points[names[0]]] == [2, 4] and all(p[1] > 0 and p[2] > 0 for p in points[names[0]])


def test_bad_snapshot_steps_are_refused_before_training(base):
    with pytest.raises(ValueError, match="snapshot_steps"):
        variants.compare_training(base, ll.load_task(), {"full": None}, steps=4, snapshot_steps=(5,))


def test_the_correlation_is_pearson_s_r():
    points = {"a": [(1, 2.0, 1.0), (2, 4.0, 2.0)], "b": [(1, 1.0, 3.0), (2, 0.5, 4.0)]}
    d, m = [1.0, 2.0, 3.0, 4.0], [2.0, 4.0, 1.0, 0.5]
    expected = float(torch.corrcoef(torch.tensor([d, m], dtype=torch.float64))[0, 1])
    assert variants.correlation(points) == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="at least 3"):
        variants.correlation({"a": points["a"]})
    with pytest.raises(ValueError, match="same at every point"):
        variants.correlation({"a": [(1, 1.0, 1.0), (2, 2.0, 1.0), (3, 3.0, 1.0)]})
