"""The pretrained tiny Llama on disk: ``load_base_model()`` reads the weights shipped inside the package.

Everything is checked before a model is built: the config's sizes against the safetensors header, dtypes, and
that every value is finite (see `lora_lab._io`), so a damaged or tampered file gives a ValueError that says what
to do, not a raw error or a 2 GiB allocation. `lora_lab.hf` reads transformers' format through the same checks.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import save_file

from ._io import FLOAT_CODES, check_finite, read_header, read_json, read_safetensors
from .model import LlamaConfig, LlamaForCausalLM, resolve_device

WEIGHTS_DIR = Path(__file__).parent / "weights"


def load_checkpoint(model: LlamaForCausalLM, state_dict: dict) -> None:
    """Copy `state_dict` into `model`, naming the first tensor that does not fit.

    Raises:
        ValueError: a key is missing or unexpected, a tensor's shape differs, an integer tensor stands where a
            float weight belongs, or a weight holds NaN/inf. The model is left unchanged in that case
            (everything is checked before anything is copied).
    """
    expected = model.state_dict()
    if model.config.tie_word_embeddings:
        state_dict = {**state_dict}
        state_dict.setdefault("lm_head.weight", state_dict.get("model.embed_tokens.weight"))
    _check_fits(expected, {k: (tuple(v.shape), v.is_floating_point()) for k, v in state_dict.items() if v is not None})
    check_finite({k: v for k, v in state_dict.items() if v is not None}, "the checkpoint",
                 "Load a checkpoint saved before training diverged.")
    model.load_state_dict(state_dict, strict=True)


def read_checkpoint(config: LlamaConfig, file, fix: str) -> dict:
    """The tensors of a safetensors checkpoint for `config`; names, shapes and dtypes are checked from the file's
    header against the config (built on the meta device) before any tensor is read or any model is built.

    Args:
        fix: the sentence a damaged-file error ends with (what to do about it).
    """
    header, _ = read_header(file, fix)
    with torch.device("meta"):  # shapes only: a config that declares a huge model costs nothing here
        expected = LlamaForCausalLM(config).state_dict()
    given = {k: (tuple(v["shape"]), v["dtype"] in FLOAT_CODES) for k, v in header.items()}
    if config.tie_word_embeddings and "model.embed_tokens.weight" in given:
        given.setdefault("lm_head.weight", given["model.embed_tokens.weight"])
    _check_fits(expected, given)
    return read_safetensors(file, fix)[0]


def _check_fits(expected: dict, given: dict) -> None:
    """``given`` maps names to (shape, is floating point); raise ValueError at the first that ``expected`` lacks."""
    for name, tensor in expected.items():
        if name not in given:
            raise ValueError(f"checkpoint has no tensor '{name}'; was it saved from a different architecture?")
        shape, is_float = given[name]
        if shape != tuple(tensor.shape):
            raise ValueError(
                f"tensor '{name}' has shape {shape} in the checkpoint but "
                f"{tuple(tensor.shape)} in the model; build the model with the checkpoint's config."
            )
        if tensor.is_floating_point() and not is_float:
            raise ValueError(f"tensor '{name}' is not floating point in the checkpoint; model weights are float32, "
                             "bfloat16 or float16, so the file is not a model checkpoint.")
    for name in given:
        if name not in expected:
            raise ValueError(f"checkpoint tensor '{name}' has no place in this model; check the config.")


def save_base_model(model: LlamaForCausalLM, directory=WEIGHTS_DIR, name: str = "base") -> None:
    """Write `<name>.safetensors` and `<name>_config.json` (the format `load_base_model` reads)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]  # the same storage as embed_tokens; safetensors refuses shared tensors
    save_file(state, str(directory / f"{name}.safetensors"))
    (directory / f"{name}_config.json").write_text(json.dumps(asdict(model.config), indent=2) + "\n")


def load_base_model(device=None, strict: bool = False, directory=WEIGHTS_DIR, name: str = "base"):
    """The pretrained tiny Llama shipped with the package (made by scripts/pretrain.py), in eval mode.

    Args:
        device: None picks CUDA when available, else CPU. "cuda" without CUDA falls back to the CPU
            with a warning (strict=False) or raises ValueError (strict=True).
        directory, name: where the weights are; the defaults are the shipped ones.
    """
    device = resolve_device(device, strict)
    directory = Path(directory)
    config_file, weights_file = directory / f"{name}_config.json", directory / f"{name}.safetensors"
    if not config_file.is_file() or not weights_file.is_file():
        raise ValueError(f"{directory} needs {config_file.name} and {weights_file.name}; pass the directory and name "
                         "save_base_model wrote.")
    fix = "Save the model again with save_base_model (or reinstall lora_lab for the shipped weights)."
    raw = read_json(config_file, fix)
    try:
        config = LlamaConfig(**raw)
    except TypeError as err:
        raise ValueError(f"{config_file.name} does not describe a LlamaConfig ({err}). {fix}") from None
    state = read_checkpoint(config, weights_file, fix)
    model = LlamaForCausalLM(config)
    load_checkpoint(model, state)
    return model.to(device).eval()
