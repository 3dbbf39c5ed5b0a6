"""LoRA on an embedding table (Hu et al. 2021, §4: "LoRA can be applied to any subset of weight matrices").

An ``nn.Embedding`` with weight ``W0`` (num_embeddings, embedding_dim) is a linear layer on one-hot inputs:
``W0[ids] = onehot(ids) @ W0``. Its LoRA update is therefore a low-rank ``ΔW = scaling (B A)^T`` of the table,
with ``A`` (r, num_embeddings) and ``B`` (embedding_dim, r), and looking up ``ids`` in ``A^T`` (a table of
r-vectors) is the cheap way to compute ``onehot(ids) @ A^T``. The names and layout are PEFT's
(``lora_embedding_A[name]``, ``lora_embedding_B[name]``, both ``nn.ParameterDict`` entries).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .lora import DEFAULT_ADAPTER, LoraConfig, LoRALinear, adapter_dtype, check_adapter_name, layer_device


class LoRAEmbedding(LoRALinear):
    """A frozen ``nn.Embedding`` plus trainable low-rank updates of its table, one per named adapter.

        W' = W0 + scaling (B A)^T,      h = W0[ids] + scaling (A^T[ids]) B^T

    ``W0`` (num_embeddings, embedding_dim) is ``base_layer.weight``; ``lora_embedding_A[name]`` is ``A``
    (r, num_embeddings) and ``lora_embedding_B[name]`` is ``B`` (embedding_dim, r), PEFT's layout. It is a
    `LoRALinear` whose input is a one-hot vector (``in_features = num_embeddings``, ``out_features =
    embedding_dim``), so adapters are added, switched, merged and deleted exactly as there; ``lora_A`` and
    ``lora_B`` name the same two tables, so model-level code reads both kinds alike.

    # Note: why an embedding's A starts at zero
    PEFT initializes an embedding's adapter the other way round from a linear one: ``A = 0`` and ``B`` standard
    normal. The update ``B A`` is still zero at the start (see `# Note: why lora_B starts at zero`), and the
    gradient of ``A`` is ``B^T dL/dh`` at the looked-up rows, which is not zero, so training moves it.

    Args:
        base_layer: The ``nn.Embedding`` to adapt; it is frozen in place.
        r, lora_alpha, lora_dropout, use_rslora, adapter_name: as in `LoRALinear`. Dropout acts on the ids'
            one-hot input, which PEFT does not do either: it is accepted and, as in PEFT, not applied.
    """

    def __init__(self, base_layer: nn.Module, r: int = LoraConfig.r, lora_alpha: float = LoraConfig.lora_alpha,
                 lora_dropout: float = 0.0, use_rslora: bool = False, adapter_name: str = DEFAULT_ADAPTER,
                 use_dora: bool = False, *, init_lora_weights: bool | str = True, loftq_config: dict | None = None):
        nn.Module.__init__(self)  # LoRALinear's tables are nn.Linear modules; these are bare parameters
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"LoRAEmbedding wraps an nn.Embedding, got {type(base_layer).__name__}.")
        self.base_layer = base_layer
        self.in_features, self.out_features = base_layer.num_embeddings, base_layer.embedding_dim
        self.fan_in_fan_out = False
        self.r, self.lora_alpha, self.use_rslora, self.scaling = {}, {}, {}, {}
        self.lora_embedding_A, self.lora_embedding_B = nn.ParameterDict(), nn.ParameterDict()
        self.lora_dropout = nn.ModuleDict()
        self.use_dora: dict[str, bool] = {}
        self.lora_magnitude_vector = nn.ModuleDict()  # stays empty: DoRA on an embedding is not implemented
        self._dora_norms: dict[str, torch.Tensor] = {}
        self.merged_adapters: list[str] = []
        self.disable_adapters = False
        self.update_layer(adapter_name, r, lora_alpha, lora_dropout, use_rslora, init_lora_weights, loftq_config,
                          use_dora=use_dora)
        self.active_adapter = adapter_name
        base_layer.requires_grad_(False)

    @property
    def lora_A(self) -> nn.ParameterDict:
        """``lora_embedding_A``: adapter name -> ``A`` (r, num_embeddings)."""
        return self.lora_embedding_A

    @property
    def lora_B(self) -> nn.ParameterDict:
        """``lora_embedding_B``: adapter name -> ``B`` (embedding_dim, r)."""
        return self.lora_embedding_B

    def update_layer(self, adapter_name: str, r: int, lora_alpha: float, lora_dropout: float = 0.0,
                     use_rslora: bool = False, init_lora_weights: bool | str = True,
                     loftq_config: dict | None = None, *, use_dora: bool = False) -> None:
        """Add an adapter called ``adapter_name``; everything is checked first."""
        check_adapter_name(adapter_name)
        if init_lora_weights is not True or loftq_config:
            raise ValueError(f"init_lora_weights={init_lora_weights!r} on an nn.Embedding is not implemented in "
                             "lora_lab; embeddings start as PEFT's do (A = 0, B normal).")
        if use_dora is not False:
            raise ValueError("DoRA (use_dora=True) on an nn.Embedding is not implemented in lora_lab; target only "
                             "linear layers with a DoRA config.")
        self._check_new_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora)
        factory = {"dtype": adapter_dtype(self.base_layer), "device": layer_device(self.base_layer)}
        self.lora_embedding_A[adapter_name] = nn.Parameter(torch.empty(r, self.in_features, **factory))
        self.lora_embedding_B[adapter_name] = nn.Parameter(torch.empty(self.out_features, r, **factory))
        self._record_adapter(adapter_name, r, lora_alpha, lora_dropout, use_rslora, use_dora=False)
        self.reset_lora_parameters(adapter_name)
        if getattr(self, "active_adapter", adapter_name) != adapter_name:  # a second adapter waits, frozen
            self.lora_embedding_A[adapter_name].requires_grad_(False)
            self.lora_embedding_B[adapter_name].requires_grad_(False)

    def reset_lora_parameters(self, adapter_name: str | None = None) -> None:
        """A = 0, B ~ N(0, 1) (PEFT's embedding init; see `# Note: why an embedding's A starts at zero`)."""
        name = self._name(adapter_name)
        nn.init.zeros_(self.lora_embedding_A[name])
        nn.init.normal_(self.lora_embedding_B[name])

    def factors(self, adapter: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The adapter's ``(A, B)``: A (r, num_embeddings), B (embedding_dim, r)."""
        return self.lora_embedding_A[adapter], self.lora_embedding_B[adapter]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """``W0[ids] + (A^T[ids] @ B^T) * scaling``; (...) int ids -> (..., embedding_dim)."""
        result = self.base_layer(ids)  # (..., embedding_dim)
        if self.merged or not self.adapter_on:
            return result
        name = self.active_adapter
        after_A = self._embed(ids, self.lora_embedding_A[name].T)  # (..., r): rows of A^T (num_embeddings, r)
        update = (after_A @ self.lora_embedding_B[name].T) * self.scaling[name]  # (..., embedding_dim)
        return result + update.to(result.dtype)

    def _lora_delta(self, name: str) -> torch.Tensor:
        """The table's update ``scaling * (B @ A)^T`` (num_embeddings, embedding_dim), in float32; `get_delta_weight`,
        `merge` and `unmerge` are `LoRALinear`'s, on this layout."""
        delta = self.lora_embedding_B[name].float() @ self.lora_embedding_A[name].float()  # (dim, r) @ (r, num)
        return delta.T * self.scaling[name]

    def _embed(self, ids: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        """Look ``ids`` up in ``table`` with the base layer's options (padding_idx, max_norm, ...), as PEFT does."""
        base = self.base_layer
        return F.embedding(ids, table, padding_idx=base.padding_idx, max_norm=base.max_norm,
                           norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq, sparse=base.sparse)
