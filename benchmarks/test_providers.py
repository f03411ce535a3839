"""The providers compute the same function and keep frozen neurons frozen: the comparison is fair.

Run: .venv/bin/python -m pytest -q benchmarks/test_providers.py   (a few seconds; not part of
``make test`` nor of ``make bench``, which runs benchmarks only).
"""
import pytest
import torch

from benchmarks.providers import (MODELS, LayerCase, held_bytes, make_layer, make_model, make_optimizer, model_input,
                                  torch_prune_twin, train_step, training_step_bytes)
from eidetic_kernels import FREE
from eidetic_kernels.layers import EideticLayer

CASES = [LayerCase("linear", 37, 5), LayerCase("conv2d", 11, 3, 7), LayerCase("batchnorm2d", 13, 4, 5)]
TOL = dict(rtol=1e-5, atol=1e-5)  # fp32, same weights, different summation order


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.kind)
@pytest.mark.parametrize("share", [0.0, 0.5, 0.9])
def test_layer_providers_agree(case, share):
    g = torch.Generator().manual_seed(3)
    eid = make_layer("eidetic", case, share, seed=5)
    tp = torch_prune_twin(torch.nn.Sequential(eid), lambda: torch.nn.Sequential(case.make_torch_layer()))
    x = case.make_input(g).requires_grad_()
    x2 = x.detach().clone().requires_grad_()
    y, y2 = eid(x), tp(x2)
    torch.testing.assert_close(y, y2, **TOL)
    grad_out = torch.randn(y.shape, generator=g)
    y.backward(grad_out)
    y2.backward(grad_out)
    torch.testing.assert_close(x.grad, x2.grad, **TOL)
    free = eid.task_state == FREE  # eidetic's trainable rows are the FREE neurons in index order
    torch.testing.assert_close(eid.weight.grad, tp[0].weight_orig.grad[free], **TOL)
    assert not tp[0].weight_orig.grad[~free].any()  # frozen rows get no gradient


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("provider", ["torch-prune", "eidetic"])
def test_frozen_neurons_stay_frozen(name, provider):
    """Three AdamW steps: every frozen neuron's weights, bias and BN statistics are bit-identical."""
    model = make_model(provider, name, 0.5, seed=1)
    opt = make_optimizer(provider, model)
    g = torch.Generator().manual_seed(2)

    def frozen_values():
        values = []
        for m in model.modules():
            if isinstance(m, EideticLayer):
                values += [m.frozen_weight.clone(), m.frozen_bias.clone()]
                if getattr(m, "running_mean", None) is not None:
                    frozen = m.task_state == 0
                    values += [m.running_mean[frozen].clone(), m.running_var[frozen].clone()]
            elif hasattr(m, "frozen_index"):
                i = m.frozen_index
                values += [m.weight_orig[i].detach().clone(), m.bias_orig[i].detach().clone()]
                if getattr(m, "running_mean", None) is not None:
                    values += [m.running_mean[i].clone(), m.running_var[i].clone()]
        return values

    before = frozen_values()
    assert before, "the model should have frozen neurons"
    for _ in range(3):
        x, y = model_input(name, 8, g)
        train_step(model, opt, x, y)
    after = frozen_values()
    assert all(torch.equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("name", ["mlp", "cnn"])
@pytest.mark.parametrize("share", [0.5, 0.9])
def test_model_providers_agree(name, share):
    eid = make_model("eidetic", name, share, seed=4)
    tp = torch_prune_twin(eid, MODELS[name][0])
    x, _ = model_input(name, 6, torch.Generator().manual_seed(0))
    torch.testing.assert_close(eid(x), tp(x), **TOL)


def test_memory_accounting():
    """nn holds exactly its parameters and buffers; torch-prune holds about three dense weights."""
    case = LayerCase("linear", 64, 8)
    nn_layer = make_layer("nn", case, 0.5)
    weight_bytes = 64 * 64 * 4
    assert held_bytes(nn_layer) == weight_bytes + 64 * 4
    tp = make_layer("torch-prune", case, 0.5)
    assert 3 * weight_bytes <= held_bytes(tp) < 4 * weight_bytes
    eid = make_layer("eidetic", case, 0.5)
    x = case.make_input(torch.Generator().manual_seed(0))
    opt = make_optimizer("eidetic", eid)
    stats = training_step_bytes(eid, opt, lambda: eid(x), lambda y: y.sum().backward())
    assert stats["layer_bytes"] < 1.1 * (weight_bytes + 64 * 4)
    assert stats["grad_bytes"] == 32 * (64 * 4 + 4)  # only the 32 FREE rows have gradients
    assert stats["optimizer_bytes"] == 2 * stats["grad_bytes"]


def test_the_cnn_floor_computes_what_it_claims():
    """benchmarks/cnn_floor.py: the trainable rows' gradients are those of plain autograd through a network whose
    frozen conv rows output zeros and whose frozen batch-norm channels are a constant affine map."""
    import torch.nn.functional as F

    from benchmarks.cnn_floor import FloorBatchNorm2d, FloorConv2d, floor_network
    from benchmarks.providers import small_cnn

    torch.manual_seed(0)
    floor = floor_network(small_cnn(), tasks=3)
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(4, 3, 12, 12, generator=g), torch.randint(0, 10, (4,), generator=g)

    def reference(h):
        for m in floor:
            if isinstance(m, FloorConv2d):
                y_t = F.conv2d(h, m.weight, m.bias, m.stride, m.padding)
                h = torch.cat([y_t.new_zeros((y_t.shape[0], m.n_frozen) + y_t.shape[2:]), y_t], 1)
            elif isinstance(m, FloorBatchNorm2d):
                f = m.n_frozen
                y_t = F.batch_norm(h[:, f:], None, None, m.weight, m.bias, training=True)
                h = torch.cat([h[:, :f] * m.scale[:, :f] + m.shift[:, :f], y_t], 1)
            else:
                h = m(h)
        return h

    params = list(floor.parameters())
    want = torch.autograd.grad(F.cross_entropy(reference(x), y), params)
    got = torch.autograd.grad(F.cross_entropy(floor(x), y), params)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, **TOL)
    assert [m.n_frozen for m in floor if isinstance(m, FloorConv2d)] == [9, 18, 39]
