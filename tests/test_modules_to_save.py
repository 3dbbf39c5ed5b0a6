"""modules_to_save: a trained copy of a head beside the adapters, PEFT's ModulesToSaveWrapper semantics and files."""

import copy

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from model_state import assert_unchanged, snapshot
from peft_twin import PREFIX, grads, logits, peft_twin, randomize, token_ids

from lora_lab import (LoraConfig, ModulesToSaveWrapper, add_adapter, apply_lora, apply_qlora, count_parameters,
                      delete_adapter, disable_adapter, load_adapter, merge_and_unload, save_adapter, set_adapter,
                      unload)

peft = pytest.importorskip("peft", reason="the modules_to_save tests compare with PEFT (pip install peft)")
transformers = pytest.importorskip("transformers", reason="the tests build a tiny transformers BERT classifier")
pytestmark = pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")

CONFIG = {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"], "modules_to_save": ["classifier"]}


@pytest.fixture(scope="module")
def base():
    """A tiny BertForSequenceClassification (3 labels) built locally (no download), in eval mode."""
    config = transformers.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=32, num_labels=3)
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture(scope="module")
def ids():
    return token_ids()



def ours_and_theirs(base, **kwargs):
    config = {**CONFIG, **kwargs}
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**config)))
    return ours, peft_twin(peft, base, ours, **config)


def assert_same_function(ours, theirs):
    # Same weights; PEFT scales B(Ax) by s where lora_lab scales Ax before B: the same product rounded at another
    # point (<= 1 fp32 ulp of the update), carried through two layers and the head.
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_the_wrapper_holds_the_original_and_a_trainable_copy(base, ids):
    model = apply_lora(copy.deepcopy(base), LoraConfig(**CONFIG))
    head = model.classifier
    assert isinstance(head, ModulesToSaveWrapper) and list(head.modules_to_save) == ["default"]
    copy_, original = head.modules_to_save["default"], head.original_module
    assert copy_ is not original and torch.equal(copy_.weight, original.weight)
    assert all(p.requires_grad for p in copy_.parameters()) and not any(p.requires_grad for p in original.parameters())
    assert head.weight is copy_.weight and head.out_features == 3  # attributes are the active copy's, as in PEFT
    assert torch.equal(logits(model, ids), logits(base, ids))  # B = 0 and an identical copy: the base function


def test_outputs_gradients_and_counts_match_peft(base, ids):
    ours, theirs = ours_and_theirs(base)
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    assert_same_function(logits(ours, ids), logits(theirs, ids))
    assert not torch.allclose(logits(ours, ids), logits(base, ids))
    labels = torch.tensor([0, 2])
    ours(ids, labels=labels).loss.backward()
    theirs(ids, labels=labels).loss.backward()
    mine, their = grads(ours), grads(theirs, PREFIX)
    assert "classifier.modules_to_save.default.weight" in mine and mine.keys() == their.keys()
    for name, grad in mine.items():
        torch.testing.assert_close(grad, their[name], rtol=1e-4, atol=1e-7)  # the same rounding, through backward


def test_an_explicit_classifier_matches_peft_seq_cls(base, ids, tmp_path):
    """PEFT's task_type="SEQ_CLS" puts the head in modules_to_save itself (["classifier", "score"])."""
    ours = randomize(apply_lora(copy.deepcopy(base), LoraConfig(**CONFIG)))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(
        task_type="SEQ_CLS", r=4, lora_alpha=8, target_modules=["query", "value"]))
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    randomize(theirs, seed=4)
    theirs.save_pretrained(tmp_path)
    back = load_adapter(copy.deepcopy(base), tmp_path)  # "score" matches nothing here, as in PEFT: one match suffices
    assert set(back.peft_config["default"].modules_to_save) == {"classifier", "score"}
    assert_same_function(logits(back, ids), logits(theirs, ids))


def test_disable_adapter_uses_the_original_module(base, ids):
    ours, theirs = ours_and_theirs(base)
    with disable_adapter(ours), theirs.disable_adapter():
        assert torch.equal(logits(ours, ids), logits(base, ids))
        assert_same_function(logits(ours, ids), logits(theirs, ids))
    assert not torch.allclose(logits(ours, ids), logits(base, ids))


def test_merge_and_unload_and_unload_keep_the_trained_copy_as_peft_does(base, ids):
    ours, theirs = ours_and_theirs(base)
    expected = logits(ours, ids)
    merged_ours, merged_theirs = merge_and_unload(copy.deepcopy(ours)), copy.deepcopy(theirs).merge_and_unload()
    assert type(merged_ours.classifier) is nn.Linear
    ours_sd, theirs_sd = merged_ours.state_dict(), merged_theirs.state_dict()
    assert ours_sd.keys() == theirs_sd.keys() and all(torch.equal(v, theirs_sd[k]) for k, v in ours_sd.items())
    torch.testing.assert_close(logits(merged_ours, ids), expected, rtol=1e-5, atol=1e-5)
    plain_ours, plain_theirs = unload(ours), theirs.unload()
    assert torch.equal(plain_ours.classifier.weight, plain_theirs.classifier.weight)
    assert not torch.equal(plain_ours.classifier.weight, base.classifier.weight)  # the trained copy, not W0


def test_adapter_files_round_trip_both_ways(base, ids, tmp_path):
    ours, theirs = ours_and_theirs(base)
    save_adapter(ours, tmp_path / "ours")
    tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert torch.equal(tensors[PREFIX + "classifier.weight"], ours.classifier.modules_to_save["default"].weight)
    assert PREFIX + "classifier.bias" in tensors  # PEFT's keys: "modules_to_save.default." dropped
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "ours")
    assert loaded.peft_config["default"].modules_to_save == ["classifier"]
    assert_same_function(logits(ours, ids), logits(loaded, ids))
    randomize(theirs, seed=2)
    theirs.save_pretrained(tmp_path / "theirs")
    assert load_file(tmp_path / "theirs" / "adapter_model.safetensors").keys() == tensors.keys()
    back = load_adapter(copy.deepcopy(base), tmp_path / "theirs")
    assert_same_function(logits(back, ids), logits(theirs, ids))
    assert torch.equal(back.classifier.original_module.weight, base.classifier.weight)  # the original stays W0


def test_two_adapters_get_their_own_copies_as_in_peft(base, ids, tmp_path):
    ours, theirs = ours_and_theirs(base)
    second = {"r": 2, "lora_alpha": 2, "target_modules": ["query"], "modules_to_save": ["classifier"]}
    add_adapter(ours, "other", LoraConfig(**second))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    head = ours.classifier
    assert list(head.modules_to_save) == ["default", "other"]
    assert not any(p.requires_grad for p in head.modules_to_save["other"].parameters())  # frozen until set
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    set_adapter(ours, "other")
    theirs.set_adapter("other")
    assert all(p.requires_grad for p in head.modules_to_save["other"].parameters())
    assert not any(p.requires_grad for p in head.modules_to_save["default"].parameters())
    randomize(ours, seed=7)
    their_params = dict(theirs.named_parameters())
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if p.requires_grad:
                their_params[PREFIX + name].copy_(p)
    assert_same_function(logits(ours, ids), logits(theirs, ids))
    save_adapter(ours, tmp_path)
    again = load_adapter(copy.deepcopy(base), tmp_path)
    load_adapter(again, tmp_path / "other", adapter_name="other")
    set_adapter(again, "other")
    assert_same_function(logits(again, ids), logits(ours, ids))
    delete_adapter(ours, "default")
    assert list(ours.classifier.modules_to_save) == ["other"]


def test_bad_modules_to_save_are_refused_before_anything_changes(base, tmp_path):
    model = copy.deepcopy(base)
    before = snapshot(model)
    with pytest.raises(ValueError, match="matches no module"):
        apply_lora(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["head"]))
    with pytest.raises(ValueError, match="does not implement modules_to_save"):
        apply_qlora(model, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert_unchanged(model, before)
    wrapped = apply_lora(copy.deepcopy(base), LoraConfig(r=4, lora_alpha=8, target_modules=["query", "value"]))
    save_adapter(apply_lora(copy.deepcopy(base), LoraConfig(**CONFIG)), tmp_path)
    before = snapshot(wrapped)
    with pytest.raises(ValueError, match="has modules_to_save=None, the file"):
        load_adapter(wrapped, tmp_path)  # overwriting "default", which trains no copy of the head
    assert_unchanged(wrapped, before)
    with pytest.raises(ValueError, match="modules_to_save must be None or a non-empty list"):
        LoraConfig(modules_to_save="classifier")
    with pytest.raises(ValueError, match="not implemented"):
        LoraConfig(modules_to_save=["classifier"], bias="all")


def test_lora_never_targets_a_module_to_save(base):
    """PEFT excludes modules_to_save from target_modules: all-linear leaves the classifier to its copy."""
    ours = apply_lora(copy.deepcopy(base), LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, target_modules="all-linear",
                                                                      modules_to_save=["classifier"]))
    assert isinstance(ours.classifier, ModulesToSaveWrapper)
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()
    second = {"r": 2, "target_modules": "all-linear", "modules_to_save": ["classifier"]}
    add_adapter(ours, "other", LoraConfig(**second))
    theirs.add_adapter("other", peft.LoraConfig(**second))
    assert list(ours.classifier.modules_to_save) == ["default", "other"]
    set_adapter(ours, "other")
    theirs.set_adapter("other")
    assert tuple(count_parameters(ours)) == theirs.get_nb_trainable_parameters()


def test_finetune_refuses_modules_to_save_with_qlora_before_anything_changes():
    import lora_lab as ll

    model = ll.load_base_model()
    before = snapshot(model)
    with pytest.raises(ValueError, match="method='qlora' does not implement modules_to_save"):
        ll.finetune(model, ll.load_task(), method="qlora", config=LoraConfig(modules_to_save=["lm_head"]), steps=1)
    assert_unchanged(model, before)


def test_finetune_trains_the_copy_of_lm_head_only():
    import lora_lab as ll

    model = ll.load_base_model()
    w0 = model.lm_head.weight.detach().clone()
    config = LoraConfig(r=2, lora_alpha=4, modules_to_save=["lm_head"])
    ll.finetune(model, ll.load_task(), config=config, steps=2, batch_size=4, eval_every=None)
    head = model.lm_head
    assert isinstance(head, ModulesToSaveWrapper) and torch.equal(head.original_module.weight, w0)
    assert not torch.equal(head.modules_to_save["default"].weight, w0)
