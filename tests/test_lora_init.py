"""lora_lab.lora_init: every init_lora_weights choice gives PEFT's factors and base weights on the same weights."""

import copy
import json

import pytest
import torch
from torch import nn

from peft_twin import logits, tiny_llama, token_ids
from model_state import assert_unchanged, snapshot

from lora_lab import LoftQConfig, add_adapter, apply_lora, count_parameters, lora_layers, merge_lora, unmerge_lora
from lora_lab.adapter import load_adapter, save_adapter
from lora_lab.checkpoint import load_base_model
from lora_lab.lora import LoraConfig, LoRALinear
from lora_lab.lora_init import loftq_init, olora_init, pissa_init, quantization_error, subtract_initial
from lora_lab.nf4 import quantize
from lora_lab.qlora import NF4Linear, QLoRALinear, apply_qlora, merge_and_unload

peft = pytest.importorskip("peft", reason="the init tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the interop tests build a tiny transformers Llama")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

TARGETS = ["q_proj", "v_proj", "up_proj"]  # up_proj is (48, 32): a non-square weight for the SVD and QR


@pytest.fixture(scope="module")
def base():
    return tiny_llama(transformers)


@pytest.fixture(scope="module")
def ids():
    return token_ids()



def both(base, seed=0, **kwargs):
    """The kit's and PEFT's model from the same weights and the same global RNG state."""
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    torch.manual_seed(seed)
    apply_lora(ours, LoraConfig(target_modules=TARGETS, **kwargs))
    torch.manual_seed(seed)
    theirs = peft.get_peft_model(theirs, peft.LoraConfig(target_modules=TARGETS, **kwargs))
    return ours, theirs


def pairs(ours, theirs):
    """(our LoRALinear, PEFT's lora.Linear) for every target, by module name."""
    mine = lora_layers(ours)
    return [(mine[name.removeprefix("base_model.model.")], m) for name, m in theirs.named_modules()
            if isinstance(m, peft.tuners.lora.LoraLayer)]


def randomize(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model


# ------------------------------------------------------------------------------- config


def test_the_defaults_are_peft_s():
    config, theirs = LoraConfig(), peft.LoraConfig()
    assert config.init_lora_weights is True is theirs.init_lora_weights
    assert config.loftq_config == {} == theirs.loftq_config
    assert LoraConfig(init_lora_weights="loftq", loftq_config=LoftQConfig()).loftq_config == vars(
        peft.LoftQConfig()) == {"loftq_bits": 4, "loftq_iter": 1}


@pytest.mark.parametrize("kwargs, match", [
    ({"init_lora_weights": "eva"}, "not implemented"),
    ({"init_lora_weights": "PiSSA"}, "init_lora_weights must be"),
    ({"init_lora_weights": "pissa_niter_x"}, "init_lora_weights must be"),
    ({"init_lora_weights": 1}, "init_lora_weights must be"),
    ({"init_lora_weights": "loftq"}, "needs loftq_config"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_bits": 8}}, "loftq_bits must be 4"),
    ({"init_lora_weights": "loftq", "loftq_config": {"loftq_iter": 0}}, "loftq_iter must be"),
    ({"init_lora_weights": "loftq", "loftq_config": {"bits": 4}}, "unknown keys"),
    ({"loftq_config": LoftQConfig()}, "only used with init_lora_weights='loftq'"),
])
def test_a_bad_init_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LoraConfig(**kwargs)


# ---------------------------------------------------------------------- inits that keep the base


@pytest.mark.parametrize("init", [True, False, "gaussian"])
def test_factors_equal_peft_s_bit_for_bit(base, ids, init):
    ours, theirs = both(base, seed=5, r=4, init_lora_weights=init)
    for mine, peft_layer in pairs(ours, theirs):
        # Same draws from the same generator in the same order (nn.Linear's init for A and B, then the reset).
        assert torch.equal(mine.lora_A["default"].weight, peft_layer.lora_A["default"].weight)
        assert torch.equal(mine.lora_B["default"].weight, peft_layer.lora_B["default"].weight)
        assert torch.equal(mine.base_layer.weight, peft_layer.base_layer.weight)
    starts_at_base = torch.equal(logits(ours, ids), logits(base, ids))
    assert starts_at_base == (init is not False)  # False: B is random too, so B A != 0 (PEFT: for tests)


def test_gaussian_draws_a_with_std_one_over_r():
    layer = LoRALinear(nn.Linear(512, 512), r=4, init_lora_weights="gaussian")
    A = layer.lora_A["default"].weight
    assert abs(A.double().std().item() - 1 / 4) < 0.01  # 2048 draws: the std's own error is ~0.25 / 45
    assert not layer.lora_B["default"].weight.any()


# ---------------------------------------------------------------------- PiSSA and OLoRA


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_3", "olora"])
@pytest.mark.parametrize("lora_alpha, use_rslora", [(8, False), (16, True)])
def test_factors_and_residual_equal_peft_s(base, ids, init, lora_alpha, use_rslora):
    ours, theirs = both(base, seed=2, r=4, lora_alpha=lora_alpha, use_rslora=use_rslora, init_lora_weights=init)
    for mine, peft_layer in pairs(ours, theirs):
        # The same torch.linalg (or svd_lowrank, same generator state) calls on the same weights: bit for bit.
        assert torch.equal(mine.lora_A["default"].weight, peft_layer.lora_A["default"].weight)
        assert torch.equal(mine.lora_B["default"].weight, peft_layer.lora_B["default"].weight)
        assert torch.equal(mine.base_layer.weight, peft_layer.base_layer.weight)
    # residual + s B A = W0 up to fp32 rounding of the subtraction: the model starts where the base was.
    torch.testing.assert_close(logits(ours, ids), logits(base, ids), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)


def test_pissa_takes_the_principal_directions():
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    A, B, residual = pissa_init(w, 3, scaling=2.0)
    U, S, Vh = torch.linalg.svd(w, full_matrices=False)
    torch.testing.assert_close(2.0 * B @ A, U[:, :3] @ torch.diag(S[:3]) @ Vh[:3])  # best rank-3 approximation
    kept = torch.linalg.svdvals(residual)  # the other 13 singular values, then 3 (rounding-level) zeros
    torch.testing.assert_close(kept[:13], S[3:], atol=1e-5, rtol=1e-5)
    assert kept[13:].max() < 1e-5


def test_olora_gives_an_orthonormal_b():
    torch.manual_seed(0)
    w = torch.randn(24, 16)
    A, B, residual = olora_init(w, 5, scaling=0.5)
    torch.testing.assert_close(B.T @ B, torch.eye(5), atol=1e-5, rtol=0)
    torch.testing.assert_close(residual + 0.5 * B @ A, w, atol=1e-5, rtol=0)


def test_merge_unmerge_and_merge_and_unload_give_w0_back(base, ids):
    ours, _ = both(base, r=4, init_lora_weights="pissa")
    plain, _ = both(base, r=4)
    assert count_parameters(ours) == count_parameters(plain)  # the same factors, only their values differ
    residual = {n: m.base_layer.weight.clone() for n, m in lora_layers(ours).items()}
    merge_lora(ours)
    for name, layer in lora_layers(ours).items():  # W_res + s B A = W0 (fp32 rounding)
        torch.testing.assert_close(layer.base_layer.weight, base.get_submodule(name).weight, atol=1e-6, rtol=0)
    unmerge_lora(ours)
    for name, layer in lora_layers(ours).items():
        torch.testing.assert_close(layer.base_layer.weight, residual[name], atol=1e-6, rtol=0)
    merged = merge_and_unload(ours)
    torch.testing.assert_close(logits(merged, ids), logits(base, ids), rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------- refusals


def test_a_4bit_base_is_refused_for_inits_that_decompose_it():
    nf4 = NF4Linear.from_linear(nn.Linear(64, 64))
    with pytest.raises(ValueError, match="apply_qlora"):
        QLoRALinear(nf4, r=4, init_lora_weights="pissa")
    with pytest.raises(TypeError, match="apply_qlora"):  # PEFT: "Please initialize PiSSA under float32 ..."
        LoRALinear(nf4, r=4, init_lora_weights="olora")


def test_a_nan_base_is_refused_and_every_layer_keeps_its_weight(base):
    model = copy.deepcopy(base)
    with torch.no_grad():
        model.model.layers[1].self_attn.v_proj.weight[0, 0] = float("nan")  # the last target: earlier ones ran
    before = snapshot(model)
    with pytest.raises(ValueError, match="NaN"):
        apply_lora(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa"))
    assert_unchanged(model, before)


def test_a_tied_weight_is_refused_unchanged():
    model = nn.Sequential(nn.Embedding(16, 16), nn.Linear(16, 16, bias=False))
    model[1].weight = model[0].weight
    before = snapshot(model)
    with pytest.raises(ValueError, match="tied"):
        apply_lora(model, LoraConfig(r=2, target_modules=["1"], init_lora_weights="olora"))
    assert_unchanged(model, before)


def test_a_base_changing_adapter_cannot_share_the_model(base):
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    before = snapshot(model)
    with pytest.raises(ValueError, match="rewrite the base weights"):
        add_adapter(model, "second", LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    assert_unchanged(model, before)
    model = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="olora"))
    with pytest.raises(ValueError, match="rewrite the base weights"):
        add_adapter(model, "second", LoraConfig(r=4, target_modules=TARGETS))


# ------------------------------------------------------------------------------------ save and load


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_peft_loads_our_trained_adapter_onto_the_original_model(base, ids, tmp_path, init):
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS,
                                                                init_lora_weights=init)))
    save_adapter(ours, tmp_path)
    assert json.loads((tmp_path / "adapter_config.json").read_text())["init_lora_weights"] == init
    # PEFT recomputes the residual from the original weights (the same SVD/QR), then loads the trained factors.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)
    again = load_adapter(copy.deepcopy(base), tmp_path)
    assert torch.equal(logits(again, ids), logits(ours, ids))  # same residual, same factors: bit for bit


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_we_load_peft_s_trained_adapter_onto_the_original_model(base, ids, tmp_path, init):
    _, theirs = both(base, r=4, init_lora_weights=init)
    randomize(theirs)
    theirs.save_pretrained(tmp_path)
    ours = load_adapter(copy.deepcopy(base), tmp_path)
    torch.testing.assert_close(logits(ours, ids), logits(theirs, ids), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_2", "olora"])
def test_conversion_to_plain_lora_applies_to_the_original_weights(base, ids, tmp_path, init):
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS,
                                                      init_lora_weights=init))
    save_adapter(ours, tmp_path / "init")  # right after init, before training
    randomize(ours)
    save_adapter(ours, tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    config = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert (config["r"], config["lora_alpha"], config["init_lora_weights"]) == (8, 16, True)
    # Onto the unchanged base: W0 + s (B A - B0 A0) = W_res + s B A, up to fp32 rounding of the two paths.
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(theirs, ids), logits(ours, ids), rtol=1e-4, atol=1e-5)
    mine = load_adapter(copy.deepcopy(base), tmp_path / "lora")
    torch.testing.assert_close(logits(mine, ids), logits(ours, ids), rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:PiSSA changes the base weights:UserWarning")  # PEFT's, during its conversion
def test_conversion_equals_peft_s(base, tmp_path):
    ours, theirs = both(base, r=4, init_lora_weights="pissa")
    save_adapter(ours, tmp_path / "ours_init")
    theirs.peft_config["default"].init_lora_weights = True  # PEFT's recipe for the initial adapter
    theirs.save_pretrained(tmp_path / "theirs_init")
    theirs.peft_config["default"].init_lora_weights = "pissa"
    randomize(ours), randomize(theirs)
    save_adapter(ours, tmp_path / "ours", path_initial_model_for_weight_conversion=tmp_path / "ours_init")
    theirs.save_pretrained(tmp_path / "theirs", path_initial_model_for_weight_conversion=tmp_path / "theirs_init")
    from safetensors.torch import load_file
    mine, peft_s = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("ours", "theirs"))
    assert mine.keys() == peft_s.keys()
    for key in mine:  # concatenations of the same tensors
        assert torch.equal(mine[key], peft_s[key]), key
    configs = [json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("ours", "theirs")]
    assert [(c["r"], c["lora_alpha"], c["init_lora_weights"]) for c in configs] == [(8, 16, True)] * 2


def test_subtract_initial_is_the_difference_of_updates():
    gen = torch.Generator().manual_seed(0)
    A, B, A0, B0 = (torch.randn(shape, generator=gen) for shape in ((3, 7), (5, 3), (3, 7), (5, 3)))
    A2, B2 = subtract_initial(A, B, A0, B0)
    torch.testing.assert_close(B2 @ A2, B @ A - B0 @ A0)
    with pytest.raises(ValueError, match="shapes"):
        subtract_initial(A, B, A0[:2], B0)


@pytest.mark.parametrize("init, loads", [("eva", True), ("orthogonal", True), ("corda", False), ("lora_ga", False)])
def test_peft_inits_the_kit_lacks_load_only_where_the_base_is_untouched(base, ids, tmp_path, init, loads):
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS)))
    save_adapter(ours, tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "init_lora_weights": init}))
    if loads:  # EVA and orthogonal init only pick the factors' start, which the file's factors replace
        assert torch.equal(logits(load_adapter(copy.deepcopy(base), tmp_path), ids), logits(ours, ids))
    else:  # CorDA and LoRA-GA rewrite the base weights, which lora_lab does not implement
        with pytest.raises(ValueError, match="not implemented"):
            load_adapter(copy.deepcopy(base), tmp_path)


def test_a_random_svd_adapter_file_is_refused(base, tmp_path):
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa_niter_2"))
    save_adapter(ours, tmp_path)
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="random SVD"):
        load_adapter(model, tmp_path)
    assert_unchanged(model, before)


def test_conversion_of_a_plain_adapter_is_refused(base, tmp_path):
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    save_adapter(ours, tmp_path / "init")
    with pytest.raises(ValueError, match="for PiSSA and OLoRA"):
        save_adapter(ours, tmp_path / "lora", path_initial_model_for_weight_conversion=tmp_path / "init")
    assert not (tmp_path / "lora").exists()


def test_a_file_with_another_init_cannot_overwrite_the_adapter(base, tmp_path):
    pissa = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS, init_lora_weights="pissa"))
    save_adapter(pissa, tmp_path)
    plain = apply_lora(copy.deepcopy(base), LoraConfig(r=4, target_modules=TARGETS))
    before = snapshot(plain)
    with pytest.raises(ValueError, match="init_lora_weights"):
        load_adapter(plain, tmp_path)
    assert_unchanged(plain, before)


# ------------------------------------------------------------------------------------------- LoftQ


def peft_loftq_on_cpu(weight, r, num_iter):
    """PEFT's ``loftq_init`` loop, on the CPU: PEFT's own function moves the weight to CUDA (or XPU) first.

    The same steps with the same pieces: bitsandbytes' NF4 (``Params4bit`` quantizes with blocksize 64 and
    ``compress_statistics=False``, i.e. ``quantize_4bit`` without double quantization) and PEFT's
    ``_low_rank_decomposition``.
    """
    import bitsandbytes.functional as F
    from peft.utils.loftq_utils import _low_rank_decomposition

    res = weight.clone()
    for i in range(num_iter):
        packed, state = F.quantize_4bit(res, blocksize=64, compress_statistics=False, quant_type="nf4")
        dequantized = F.dequantize_4bit(packed, state)
        res = weight - dequantized
        out = _low_rank_decomposition(res, reduced_rank=r)
        if i + 1 == num_iter:
            break
        res = weight - torch.mm(out["L"], out["R"])
    return out["R"], out["L"], dequantized


@pytest.mark.parametrize("num_iter", [1, 3])
def test_loftq_equals_peft_s_algorithm(num_iter):
    weight = load_base_model().model.layers[0].mlp.up_proj.weight.detach()  # real pretrained weights (128, 64)
    A, B, q = loftq_init(weight, 8, scaling=1.0, num_iter=num_iter)
    their_A, their_B, their_deq = peft_loftq_on_cpu(weight, 8, num_iter)
    assert torch.equal(q.dequantize(torch.float32), their_deq)  # the kit's NF4 is bitsandbytes' bit for bit
    # The same SVD; PEFT multiplies by a sliced sqrt(diag(S)) matrix where the kit scales columns: the same
    # products, summed with exact zeros, so equal up to the last bit of a few entries.
    torch.testing.assert_close(A, their_A, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(B, their_B, rtol=1e-6, atol=1e-7)


def test_loftq_shrinks_the_quantization_error_of_every_layer():
    model = load_base_model()
    drops = []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.endswith(("q_proj", "v_proj", "up_proj")):
            w = m.weight.detach()
            plain = quantization_error(w, quantize(w, "nf4", 64, False))
            errors = [quantization_error(w, q, A, B) for A, B, q in
                      (loftq_init(w, 8, 1.0, num_iter=t) for t in (1, 5))]
            assert errors[1] < errors[0] < plain
            drops.append(errors[0] / plain)
    # Measured at r=8 on the kit's base model: T=1 leaves 0.74-0.92 of plain NF4's error per layer (0.90 over
    # all 28 linears together), T=5 0.66-0.83 (0.81). The margin: the ratio is a property of fixed weights.
    assert max(drops) < 0.95


def test_apply_qlora_with_loftq_stores_loftq_s_base_and_factors(ids):
    model = load_base_model()
    reference = copy.deepcopy(model)
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig(loftq_iter=2))
    apply_qlora(model, config)
    for name, layer in lora_layers(model).items():
        w = reference.get_submodule(name).weight
        A, B, q = loftq_init(w, 8, config.scaling, 2, double_quant=True)  # the layer's own 4-bit format
        assert torch.equal(layer.base_layer.weight, q.packed)
        assert torch.equal(layer.lora_A["default"].weight, A) and torch.equal(layer.lora_B["default"].weight, B)
    plain = apply_qlora(copy.deepcopy(reference), LoraConfig(r=8, target_modules=["q_proj", "v_proj"]))
    x = torch.randint(0, 34, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gaps = [(m(x).double() - reference(x).double()).abs().mean().item() for m in (model, plain)]
    assert gaps[0] < gaps[1]  # LoftQ's 4-bit model starts closer to the full-precision one


def test_loftq_on_a_full_precision_base_replaces_it_by_its_nf4_values_as_peft_does():
    torch.manual_seed(0)
    linear = nn.Linear(64, 32)
    w = linear.weight.detach().clone()
    layer = LoRALinear(linear, r=4, lora_alpha=4, init_lora_weights="loftq", loftq_config={"loftq_iter": 1})
    their_A, their_B, their_deq = peft_loftq_on_cpu(w, 4, 1)
    assert torch.equal(layer.base_layer.weight, their_deq)
    torch.testing.assert_close(layer.lora_A["default"].weight, their_A, rtol=1e-6, atol=1e-7)


def test_apply_qlora_with_pissa_quantizes_the_residual():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 64))
    w = model[0].weight.detach().clone()
    apply_qlora(model, LoraConfig(r=4, target_modules=["0"], init_lora_weights="pissa"))
    A, B, residual = pissa_init(w, 4, 2.0)  # LoraConfig's lora_alpha=8 at r=4: s = 2
    assert torch.equal(model[0].base_layer.weight, quantize(residual, "nf4", 64, True).packed)
    assert torch.equal(model[0].lora_A["default"].weight, A)


def test_a_loftq_adapter_round_trips_onto_the_model_it_needs(tmp_path):
    config = LoraConfig(r=4, lora_alpha=4, target_modules=["q_proj", "v_proj"], init_lora_weights="loftq",
                        loftq_config=LoftQConfig())
    x = torch.randint(0, 34, (2, 8), generator=torch.Generator().manual_seed(0))
    for apply in (apply_lora, apply_qlora):  # PEFT's LoftQ on full-precision weights, and the kit's 4-bit one
        ours = randomize(apply(load_base_model(), config))
        save_adapter(ours, tmp_path / apply.__name__)
        assert json.loads((tmp_path / apply.__name__ / "adapter_config.json").read_text())["loftq_config"] == {
            "loftq_bits": 4, "loftq_iter": 1}
        # The same deterministic LoftQ on the same weights gives the same base; the file gives the factors.
        target = load_base_model() if apply is apply_lora else apply_qlora(load_base_model(), config)
        again = load_adapter(target, tmp_path / apply.__name__)
        with torch.no_grad():
            assert torch.equal(again(x), ours(x))
