"""lora_lab: LoRA and QLoRA, taught with real algorithms.

Each module holds one concept (see README, "The package"). The names users touch are PEFT's
(`LoraConfig`, `r`, `lora_alpha`, `lora_A`, `lora_B`), quantization uses bitsandbytes' names
(`blocksize`, `absmax`), and the model uses transformers' Llama module names.
"""

__version__ = "0.1.0"

# Public API: each module adds its own line below.
from .i18n import get_language, set_language  # noqa: F401
from .lora import LoraConfig, LoRALinear, LoRALayer, ParameterCount, count_parameters  # noqa: F401
from .dora import MagnitudeVector  # noqa: F401
from .lora_embedding import LoRAEmbedding  # noqa: F401
from .modules_to_save import ModulesToSaveWrapper  # noqa: F401
from .lora_init import LoftQConfig  # noqa: F401
from .loraplus import create_loraplus_optimizer, loraplus_param_groups  # noqa: F401
from .inject import apply_lora, lora_layers, merge_lora, unload, unmerge_lora  # noqa: F401
from .multi_adapter import add_adapter, delete_adapter, disable_adapter, set_adapter  # noqa: F401
from .adapter import load_adapter, save_adapter  # noqa: F401
from .model import LlamaConfig, LlamaForCausalLM  # noqa: F401
from .checkpoint import load_base_model  # noqa: F401
from .data import get_tokenizer, load_task, pretraining_corpus  # noqa: F401
from .sampling import generate  # noqa: F401
from .hf import export_hf, import_hf  # noqa: F401
from .train import History, StopTraining, finetune  # noqa: F401
from .memory import MemoryBreakdown  # noqa: F401
from .train import measure  # noqa: F401
from .estimator import Estimate, estimate  # noqa: F401
from .timeline import MemoryEvent, StepTimeline, TimelineRecorder, record_step  # noqa: F401
from .variants import LogitError, VariantRun, compare_training, starting_errors  # noqa: F401
from .nf4 import (QuantizedWeight, codebook, dequantize, dequantize_nf4, dynamic_map, fp4_codebook,  # noqa: F401
                  int4_codebook, nf4_codebook, quantize, quantize_fp4, quantize_int4, quantize_nf4)
from .qlora import (NF4Linear, QLoRALinear, RequantizationReport, apply_qlora, load_quantized,  # noqa: F401
                    merge_and_unload, quantized_memory_report, save_quantized)
from .spectral import intruder_dimensions, max_cosine, reduce_intruder_dimension  # noqa: F401
from .forgetting import BaseProbe, copy_task, corpus_loss, forgetting_sweep, mitigation_sweep  # noqa: F401
from .pretrained import load_pretrained  # noqa: F401
from .instruct import load_chat_task  # noqa: F401
