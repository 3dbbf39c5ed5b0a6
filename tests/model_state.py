"""What a failed call must leave alone, for the "nothing is half-done" tests."""

import torch


def snapshot(model):
    """Everything a failed call must leave alone: tensors, requires_grad, module types."""
    return ({k: v.clone() for k, v in model.state_dict().items()},
            {n: p.requires_grad for n, p in model.named_parameters()},
            {n: type(m) for n, m in model.named_modules()})


def assert_unchanged(model, before):
    tensors, grads, types = snapshot(model)
    assert types == before[2] and grads == before[1] and tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        assert same_bits(value, before[0][key]), key


def same_bits(a, b):
    """Same dtype, shape and bytes: a NaN equals itself here, and -0.0 differs from 0.0."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bytes(a), _bytes(b))


def _bytes(t):
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
