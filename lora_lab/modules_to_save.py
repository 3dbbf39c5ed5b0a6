"""``modules_to_save``: modules trained in full beside the LoRA adapters (PEFT's ``ModulesToSaveWrapper``).

Some modules are new for the task and have nothing pretrained to adapt: a classification head
(``classifier``, ``score``) starts random, and a low-rank update of a random matrix is no saving. PEFT trains
a full copy of each such module and saves it with the adapter; the original is kept, frozen, so the base
model is still there (``disable_adapter``) and a second adapter can get its own copy.
"""

from __future__ import annotations

import copy

from torch import nn

from .lora import DEFAULT_ADAPTER, check_adapter_name


class ModulesToSaveWrapper(nn.Module):
    """A frozen ``original_module`` and one trainable copy per adapter, ``modules_to_save[name]`` (PEFT's names).

    The forward pass calls the active adapter's copy; with adapters disabled, or when the active adapter has
    no copy here, it calls ``original_module``. Each copy starts as ``copy.deepcopy(original_module)``, so the
    wrapped model computes exactly what the base model did until training moves the copy.

    Args:
        original_module: The module to train in full (a head such as ``classifier`` or ``lm_head``).
        adapter_name: The first adapter's name, which is also the active one.
    """

    def __init__(self, original_module: nn.Module, adapter_name: str = DEFAULT_ADAPTER):
        super().__init__()
        if isinstance(original_module, ModulesToSaveWrapper):
            raise ValueError("This module is already in modules_to_save; unload the model first.")
        self.original_module = original_module
        self.modules_to_save = nn.ModuleDict()
        self.disable_adapters = False
        self.active_adapter = adapter_name
        self.update(adapter_name)

    def update(self, adapter_name: str) -> None:
        """Give ``adapter_name`` its own copy of ``original_module``; only the active adapter's copy trains."""
        check_adapter_name(adapter_name)
        if adapter_name in self.modules_to_save:
            raise ValueError(f"This module already has a copy for adapter {adapter_name!r}.")
        self.modules_to_save[adapter_name] = copy.deepcopy(self.original_module)
        self.original_module.requires_grad_(False)
        self.modules_to_save[adapter_name].requires_grad_(adapter_name == self.active_adapter)

    def set_adapter(self, adapter_name: str) -> None:
        """Use ``adapter_name``'s copy from now on (the original where it has none); only that copy trains."""
        self.active_adapter = adapter_name
        for name, module in self.modules_to_save.items():
            module.requires_grad_(name == adapter_name)

    def delete_adapter(self, adapter_name: str) -> None:
        """Drop ``adapter_name``'s copy (the caller makes another adapter active first)."""
        del self.modules_to_save[adapter_name]

    @property
    def active_module(self) -> nn.Module:
        """The module the forward pass calls now."""
        if self.disable_adapters or self.active_adapter not in self.modules_to_save:
            return self.original_module
        return self.modules_to_save[self.active_adapter]

    def forward(self, *args, **kwargs):
        """Whatever the active module returns for the same arguments."""
        return self.active_module(*args, **kwargs)

    def __getattr__(self, name: str):
        """Attributes the wrapper lacks (``weight``, ``out_features``) are the active module's, as in PEFT."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name.startswith("__") or name in ("original_module", "modules_to_save", "active_adapter",
                                                  "disable_adapters"):
                raise
            return getattr(self.active_module, name)


def saved_module_wrappers(model: nn.Module) -> dict[str, ModulesToSaveWrapper]:
    """Full names of the model's `ModulesToSaveWrapper` modules, mapped to the wrappers."""
    return {name: m for name, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)}


def modules_to_save_names(model: nn.Module, modules_to_save, exclude: tuple[str, ...] = ()) -> list[str]:
    """The modules ``modules_to_save`` names: the outermost module whose name ends in one at a ``.`` boundary.

    PEFT matches ``name.endswith(entry)``; the kit asks for a whole last part (``"classifier"`` does not select
    ``"my_classifier"``), as its ``target_modules`` does. Modules inside ``exclude`` (LoRA layers) are skipped.
    As in PEFT, an entry may match nothing (PEFT's ``task_type="SEQ_CLS"`` writes ``["classifier", "score"]``
    for whichever head the model has), but at least one must match.

    Raises:
        ValueError: no entry matches a module.
    """
    names = [n for n, _ in model.named_modules() if n and not n.startswith(exclude)]
    chosen = [n for entry in modules_to_save for n in names if n == entry or n.endswith("." + entry)]
    if modules_to_save and not chosen:
        raise ValueError(f"modules_to_save={list(modules_to_save)!r} matches no module of this model; use a module "
                         "name such as 'classifier' or 'lm_head' (model.named_modules() lists them).")
    return [n for n in dict.fromkeys(chosen) if not any(n.startswith(f"{m}.") for m in chosen if m != n)]


def wrap_modules_to_save(model: nn.Module, names: list[str], adapter_name: str) -> None:
    """Give each named module a trainable copy for ``adapter_name``, wrapping it first where needed."""
    for name in names:
        module = model.get_submodule(name)
        if isinstance(module, ModulesToSaveWrapper):
            module.update(adapter_name)
            continue
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, ModulesToSaveWrapper(module, adapter_name))
