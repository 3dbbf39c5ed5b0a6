"""The same model in lora_lab and in PEFT, with the same weights: for the tests of each layer kind."""

import copy

import torch

PREFIX = "base_model.model."


def randomize(model, seed=0, std=0.1):
    """Nonzero, reproducible values for every trainable parameter (B = 0 or A = 0 at init would hide a bug)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(std * torch.randn(p.shape, generator=gen))
    return model


def peft_twin(peft, base, ours, **config):
    """``peft.get_peft_model(copy of base, LoraConfig(**config))`` with our trainable tensors copied in.

    Our parameter ``x.lora_A.default.weight`` is PEFT's ``base_model.model.x.lora_A.default.weight``, and so on for
    ``lora_embedding_A.default`` and ``modules_to_save.default.weight``: the same layout, one prefix apart.
    """
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(**config))
    mine = dict(ours.named_parameters())
    their_params = dict(theirs.named_parameters())
    trainable = {n for n, p in their_params.items() if p.requires_grad}
    assert trainable == {PREFIX + n for n, p in mine.items() if p.requires_grad}  # PEFT trains what we train
    with torch.no_grad():
        for name in trainable:
            their_params[name].copy_(mine[name.removeprefix(PREFIX)])
    return theirs


def grads(model, prefix=""):
    """Trainable parameters' gradients by our name (PEFT's prefix removed)."""
    return {n.removeprefix(prefix): p.grad for n, p in model.named_parameters() if p.requires_grad}


def tiny_llama(transformers, **config):
    """A tiny transformers ``LlamaForCausalLM`` built locally (no download), seeded, in eval mode."""
    config = transformers.LlamaConfig(**{**dict(vocab_size=64, hidden_size=32, intermediate_size=48,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                max_position_embeddings=32), **config})
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).eval()


def token_ids(vocab=64, shape=(2, 6), seed=1):
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits
