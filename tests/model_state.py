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
        assert torch.equal(value, before[0][key]), key
