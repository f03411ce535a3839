"""train_task and run_epoch on the inputs a torch user hands them: empty loaders, a last batch of one sample with
and without BatchNorm, progress output into a pipe or log file, and no host-device sync per training step."""
import contextlib
import copy
import io
import math
from unittest import mock

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import python_layers.trainer as trainer
from python_layers import EideticNetwork
from tests.python_layers.synthetic import CLASSES, IMAGE_SHAPE, cnn_body, mlp_body
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)


def bn_mlp_body(width=16):
    """Flatten -> Linear -> BatchNorm1d -> ReLU: the BatchNorm sees one value per channel in a batch of one."""
    return nn.Sequential(nn.Flatten(), nn.Linear(64, width), nn.BatchNorm1d(width), nn.ReLU()), width


def new_model(body_fn, seed=0):
    torch.manual_seed(seed)
    model = EideticNetwork(*body_fn())
    model.prepare_for_task(0, CLASSES)
    return model, torch.optim.SGD(model.parameters(), lr=0.05)


def samples(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn((n,) + IMAGE_SHAPE, generator=g), torch.randint(0, CLASSES, (n,), generator=g)


class Unsized:
    """A loader without len(), batch_size or drop_last: only iteration."""

    def __init__(self, x, y, batch_size):
        self.x, self.y, self.batch_size_ = x, y, batch_size

    def __iter__(self):
        for i in range(0, self.x.shape[0], self.batch_size_):
            yield self.x[i:i + self.batch_size_], self.y[i:i + self.batch_size_]


def same_state(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


KW = dict(pruning=None, max_epochs=1, progress=False)


# ----- empty loaders -------------------------------------------------------------------------------------
@pytest.mark.parametrize("traced", [False, True])
def test_an_empty_loader_is_a_clear_error(traced):
    x, y = samples(0)
    for loader in ([], DataLoader(TensorDataset(x, y), batch_size=4), Unsized(x, y, 4)):
        model, optimizer = new_model(mlp_body)
        if traced:  # the graph already exists: train_task does not peek at a first batch
            model.ensure_graph(samples(2)[0])
        with pytest.raises(ValueError, match="loader yielded no batch"):
            model.train_task(loader, optimizer, **KW)


def test_an_optimizer_that_needs_a_closure_is_a_clear_error_before_any_step():
    model, _ = new_model(mlp_body)
    x, y = samples(8)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(TypeError, match=r"LBFGS.step needs a closure.*first-order optimizer"):
        model.train_task([(x, y)], torch.optim.LBFGS(model.parameters()), **KW)
    assert same_state(model.state_dict(), before)


def test_a_task_of_one_class_is_said_before_it_trains():
    """Cross-entropy over one class is 0 whatever the input: train_task learns nothing and freezes what the task
    keeps untrained; said at the user's line (a one-class task is allowed: test_trainer's one-class test)."""
    torch.manual_seed(0)
    model = EideticNetwork(*mlp_body())
    model.prepare_for_task(0, 1)
    x, y = samples(8)
    with pytest.warns(UserWarning, match=r"task 0's head has 1 class: train_task trains with cross-entropy, which is "
                                         r"0 for a single class.*num_classes=2") as record:
        model.train_task([(x, y * 0)], torch.optim.SGD(model.parameters(), lr=0.05), **KW)
    assert record[0].filename == __file__


@pytest.mark.parametrize("labels, message", [
    (lambda y: y + CLASSES, r"labels range over \[\d+, \d+\] but the task's head has 3 classes"),
    (lambda y: y.float(), "1-D integer tensor of class indices"),
])
def test_labels_outside_the_head_are_a_clear_error_before_any_step(labels, message):
    """Checked before the batch's forward: no step, and no batch-norm statistic moves either."""
    model, optimizer = new_model(bn_mlp_body)
    x, y = samples(8)
    model.ensure_graph(x)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=message):
        model.train_task([(x, labels(y))], optimizer, **KW)
    assert same_state(model.state_dict(), before)  # no step was taken, no running statistic moved


def test_labels_outside_the_head_in_a_later_batch_are_refused_before_that_step():
    """On the CPU every batch's labels are checked before its step: a bad third batch stops the epoch with the
    library's error (naming the batch), after exactly two steps, and no finished task moves."""
    torch.manual_seed(0)
    model = EideticNetwork(*bn_mlp_body())
    x, y = samples(12)
    model.prepare_for_task(0, CLASSES)
    model.train_task([(x, y)], torch.optim.SGD(model.parameters(), lr=0.05),
                     **dict(KW, pruning="l1", step=0.5, stop_threshold=1.0))  # keeps half of each layer, finishes
    model.eval()
    task0 = model(x, task=0)
    model.prepare_for_task(1, CLASSES)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    steps = []
    optimizer.register_step_post_hook(lambda *_: steps.append(1))
    batches = [(x[:4], y[:4]), (x[4:8], y[4:8]), (x[8:], y[8:] + CLASSES)]
    with pytest.raises(ValueError, match=r"labels range over \[\d+, \d+\] in batch 2 of the epoch .* finished tasks "
                                         r"are unchanged\) but the task's head has 3 classes"):
        model.train_task(batches, optimizer, **KW)
    assert len(steps) == 2
    model.eval()
    assert torch.equal(model(x, task=0), task0)


def test_batches_in_the_forms_torch_users_hand_them():
    """Dict batches under the usual key pairs, numpy or list labels and labels of any integer dtype train as the
    (x, y) tuple does; anything else is a TypeError naming what is accepted."""
    x, y = samples(8)
    model, optimizer = new_model(mlp_body)
    model.train_task([(x, y)], optimizer, **KW)
    want = model(x, task=0)
    for batch in ({"x": x, "y": y}, {"inputs": x, "labels": y}, {"image": x, "label": y},
                  {"pixel_values": x, "labels": y}, (x, y.numpy()), (x, y.tolist()), (x, y.int()),
                  (x, y.to(torch.uint8)), (x, y, "extra")):
        model, optimizer = new_model(mlp_body)
        model.train_task([batch], optimizer, **KW)
        assert torch.equal(model(x, task=0), want)
    for batch, message in (({"img": x, "target": y}, r"a dict batch needs its inputs and labels under one of the key "
                                                     r"pairs .*got keys \['img', 'target'\]"),
                           ((list(x), y), r"a batch's inputs must be a tensor \(or a numpy array\), got list: "
                                          r"collate the samples")):
        model, optimizer = new_model(mlp_body)
        model.ensure_graph(x)
        with pytest.raises(TypeError, match=message):
            model.train_task([batch], optimizer, **KW)


def test_a_loader_read_once_is_refused_and_drop_last_is_named_when_it_empties_one():
    x, y = samples(8)
    model, optimizer = new_model(mlp_body)
    for loader in ((b for b in [(x, y)]), iter([(x, y)])):
        with pytest.raises(TypeError, match=r"train_task reads the loader once per epoch.*can be read once: pass a "
                                            r"re-iterable"):
            model.train_task(loader, optimizer, **KW)
    assert model.graph is None and model.current_task == 0  # refused before the trace drew a batch
    with pytest.raises(ValueError, match=r"loader yielded no batch.*drop_last=True drops an incomplete last batch"):
        model.train_task(DataLoader(TensorDataset(x[:5], y[:5]), batch_size=16, drop_last=True), optimizer, **KW)


# ----- a batch of one sample ---------------------------------------------------------------------------------
def test_a_last_batch_of_one_with_batchnorm_is_refused_before_training():
    """5 samples, batch_size 2: the last batch holds one sample, which BatchNorm1d cannot normalise in training
    mode. The error names drop_last and comes before any training: weights and running statistics unchanged."""
    x, y = samples(5)
    model, optimizer = new_model(bn_mlp_body)
    model.ensure_graph(x[:2])
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="drop_last") as info:
        model.train_task(DataLoader(TensorDataset(x, y), batch_size=2), optimizer, **KW)
    assert "size 1" in str(info.value) and "BatchNorm" in str(info.value)
    assert same_state(model.state_dict(), before)
    # batch_size=1: every batch has one sample
    with pytest.raises(ValueError, match="drop_last"):
        model.train_task(DataLoader(TensorDataset(x, y), batch_size=1), optimizer, **KW)
    assert same_state(model.state_dict(), before)
    # drop_last=True trains
    history = model.train_task(DataLoader(TensorDataset(x, y), batch_size=2, drop_last=True), optimizer, **KW)
    assert history[-1]["phase"] == "finish" and math.isfinite(history[-1]["loss"])


def test_a_batch_of_one_from_a_loader_that_does_not_say_how_it_batches():
    """No batch_size/len(): the batch is checked when it comes, before its forward pass; that batch changes no
    running statistic (earlier BatchNorms of the same forward are put back)."""
    x, y = samples(5)
    model, optimizer = new_model(bn_mlp_body)
    seen = []

    class Watch(Unsized):
        def __iter__(self):
            for xb, yb in super().__iter__():
                if xb.shape[0] == 1:
                    seen.append(copy.deepcopy(model.state_dict()))
                yield xb, yb

    with pytest.raises(ValueError, match="drop_last"):
        model.train_task(Watch(x, y, 2), optimizer, **KW)
    assert len(seen) == 1 and same_state(model.state_dict(), seen[0])


def test_batchnorm_over_feature_maps_trains_on_a_batch_of_one_like_torch():
    """BatchNorm2d on [1, C, 8, 8] normalises 64 values per channel: torch trains on it, and so does train_task."""
    x, y = samples(5)
    torch.manual_seed(0)
    plain, _ = cnn_body()
    plain.train()(x[:1])  # torch accepts it
    model, optimizer = new_model(cnn_body)
    model.ensure_graph(x[:2])
    for group in model.groups:  # capacity for a next task
        group.prune([0])
    history = model.train_task(DataLoader(TensorDataset(x, y), batch_size=2), optimizer, **KW)
    assert math.isfinite(history[-1]["loss"])
    # the check of such a batch hooks no module: a next task's step keeps the frozen blocks constant (a module
    # hook would turn that off, and say so)
    import warnings
    from python_layers import HookedTrainingWarning
    model.prepare_for_task(1, CLASSES)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HookedTrainingWarning)
        model.train_task(DataLoader(TensorDataset(x, y), batch_size=2),
                         torch.optim.SGD(model.parameters(), lr=0.05), **KW)


def test_a_last_batch_of_one_without_batchnorm_trains():
    x, y = samples(5)
    model, optimizer = new_model(mlp_body)
    history = model.train_task(DataLoader(TensorDataset(x, y), batch_size=2), optimizer, **KW)
    assert history[0]["phase"] == "train" and math.isfinite(history[0]["loss"])


# ----- run_epoch: what it returns, host syncs, progress output -------------------------------------------------
def plain_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 12), nn.ReLU(), nn.Linear(12, CLASSES))


def test_run_epoch_returns_the_sample_weighted_mean_loss_and_accuracy():
    x, y = samples(10, seed=3)
    model = plain_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)  # the model stays as it is: losses computable by hand
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 10, 4)]  # 4, 4, 2 samples
    with torch.no_grad():
        losses = [float(F.cross_entropy(model(xb), yb)) * yb.numel() for xb, yb in batches]
        correct = sum(int((model(xb).argmax(-1) == yb).sum()) for xb, yb in batches)
    loss, acc = trainer.run_epoch(model, batches, optimizer, torch.device("cpu"), progress=False)
    assert loss == pytest.approx(sum(losses) / 10, rel=1e-12, abs=0)
    assert acc == correct / 10


SYNCS = ("item", "tolist", "numpy", "cpu", "__float__", "__int__", "__bool__", "__index__")


def count_syncs(n_batches, monkeypatch):
    """Calls that read a tensor's value on the host (each one waits for the device), in one run_epoch of a plain
    model with the progress bar on (a terminal faked, the bar written into a StringIO)."""
    x, y = samples(4 * n_batches, seed=5)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, x.shape[0], 4)]
    model = plain_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)  # SGD: its step reads no tensor on the host
    monkeypatch.setattr(trainer, "_is_terminal", lambda stream: True, raising=False)
    # the CPU stands in for a device here: labels read as on a device (the first batch only; on the CPU every
    # batch's labels are read, which waits for nothing)
    monkeypatch.setattr(trainer, "_labels_checked", lambda i, y: i == 0)
    counts = dict.fromkeys(SYNCS, 0)
    patches = []
    for name in SYNCS:
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            counts[_name] += 1
            return _real(self, *args, **kwargs)

        patches.append(mock.patch.object(torch.Tensor, name, counted))
    err = io.StringIO()
    with contextlib.ExitStack() as stack, contextlib.redirect_stderr(err):
        for p in patches:
            stack.enter_context(p)
        trainer.run_epoch(model, batches, optimizer, torch.device("cpu"), desc="counting", progress=True)
    assert "counting" in err.getvalue()  # the tqdm bar ran
    return counts


def test_run_epoch_reads_no_tensor_on_the_host_per_step(monkeypatch):
    """The number of host reads does not grow with the number of batches (2 vs 8), progress bar included. The bar's
    timed refresh is pushed out of reach so that a slow machine cannot make the counts differ."""
    monkeypatch.setattr(trainer, "POSTFIX_SECONDS", 1e9, raising=False)
    assert trainer.tqdm is not None
    few, many = count_syncs(2, monkeypatch), count_syncs(8, monkeypatch)
    assert few == many, (few, many)
    assert sum(few.values()) <= 4  # the loss sum and the correct count, read once at the end


def test_progress_into_a_pipe_is_one_plain_line_per_epoch():
    """stdout and stderr are not terminals (a piped `make demo`, a log file): no carriage-return frames, at most one
    line per epoch, each with the epoch's loss and accuracy."""
    x, y = samples(40, seed=7)
    batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, 40, 4)]
    model = plain_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    out, err = io.StringIO(), io.StringIO()
    epochs = 3
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        results = [trainer.run_epoch(model, batches, optimizer, torch.device("cpu"), desc=f"epoch {e}",
                                     progress=True) for e in range(epochs)]
    text = out.getvalue() + err.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert 1 <= len(lines) <= epochs
    for e, line in enumerate(lines):
        assert line.startswith(f"epoch {e}: loss={results[e][0]:.4f}, acc={results[e][1]:.3f}, pruned="), line
    # train_task too, with its pruning steps
    eid, opt = new_model(mlp_body)
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        history = eid.train_task(batches, opt, pruning="l2", step=0.25, max_epochs=2, patience=1, recovery_epochs=1,
                                 max_prune_steps=2, progress=True)
    text = out.getvalue() + err.getvalue()
    n_epochs = sum(r["phase"] in ("train", "recover") for r in history)
    assert "\r" not in text and 1 <= len(text.splitlines()) <= n_epochs


@pytest.mark.parametrize("compiled", [False, True])
def test_a_body_frozen_by_the_user_after_task_0_is_said_before_its_capacity_is_spent(compiled):
    """requires_grad_(False) on the whole model (to evaluate it), never undone: the next task would freeze every
    FREE neuron untrained. Said before training, once (finish_task, on the network itself, does not repeat it;
    also when train_task gets torch.compile(model)); a body frozen from the start gives task 0 everything, as
    documented, and is not."""
    from python_layers import CapacityWarning
    x, y = samples(8)
    model, optimizer = new_model(mlp_body)
    model.ensure_graph(x[:2])
    for group in model.groups:
        group.prune([0, 1])
    model.train_task(DataLoader(TensorDataset(x, y), batch_size=4), optimizer, **KW)
    model.requires_grad_(False)
    model.prepare_for_task(1, CLASSES)
    with pytest.warns(CapacityWarning, match=r"FREE neurons but no parameter that requires grad.*"
                                             r"model.requires_grad_\(True\)") as record:
        trainer.train_task(torch.compile(model, backend="eager") if compiled else model,
                           DataLoader(TensorDataset(x, y), batch_size=4),
                           torch.optim.SGD(model.heads[1].parameters(), lr=0.05), **KW)
    said = [w for w in record if "no parameter that requires grad" in str(w.message)]
    assert len(said) == 1, "said once, before training (finish_task does not repeat it)"



def test_the_router_reads_inputs_of_the_same_batch_forms():
    """fit_router and the routing helpers take their inputs as train_task does (trainer.batch_inputs)."""
    from python_layers import routing
    x, y = samples(4)
    for batch in (x, (x, y), [x], {"x": x}, {"image": x, "label": y}, {"inputs": x}, (x.numpy(), y)):
        assert torch.equal(routing._inputs(batch), x)
    with pytest.raises(TypeError, match=r"a routing loader yielded a dict batch with keys \['img'\]; its inputs must "
                                        r"be under one of \['x', 'input', 'inputs', 'image', 'pixel_values'\]"):
        routing._inputs({"img": x})
