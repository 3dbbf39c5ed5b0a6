"""Text from a model: ``generate(model, "copy: cat > ")`` continues a prompt, greedily or sampled.

Its own module because it needs both the model and the kit's tokenizer (`lora_lab.data`), which itself imports
`lora_lab.model`: imports run model -> data -> sampling.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .data import get_tokenizer


@torch.no_grad()
def generate(model, prompt, max_new_tokens: int = 32, temperature: float = 0.0, seed: int = 0,
             tokenizer=None, stop_at_eos: bool = True):
    """Continue `prompt` token by token: greedy at temperature 0, else sampled from softmax(logits / t).

    Args:
        model: a LlamaForCausalLM (LoRA-wrapped or not).
        prompt: a string, or a list of strings (each continued on its own).
        max_new_tokens: how many tokens to add at most (fewer if the model emits eos).
        temperature: 0 for greedy decoding; > 0 samples with a torch.Generator seeded by `seed`,
            so the same call gives the same text.
        tokenizer: defaults to `lora_lab.data.get_tokenizer()`.

    Returns:
        The continuation only (without the prompt), a string or a list like `prompt`.
    """
    if tokenizer is None:
        tokenizer = get_tokenizer()
    if not isinstance(prompt, str):
        return [generate(model, p, max_new_tokens, temperature, seed, tokenizer, stop_at_eos) for p in prompt]
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {temperature}.")
    device = next(model.parameters()).device
    gen = torch.Generator(device=device).manual_seed(seed)
    ids = torch.tensor([tokenizer.encode(prompt, bos=True)], device=device)  # (1, T)
    new = []
    for _ in range(max_new_tokens):
        logits = model(ids[:, -model.config.max_position_embeddings:])[0, -1].float()  # (V,)
        if temperature == 0:
            token = logits.argmax()
        else:
            token = torch.multinomial(F.softmax(logits / temperature, dim=-1), 1, generator=gen)[0]
        if stop_at_eos and token == tokenizer.eos_id:
            break
        new.append(int(token))
        ids = torch.cat([ids, token.view(1, 1)], dim=1)
    return tokenizer.decode(new)
