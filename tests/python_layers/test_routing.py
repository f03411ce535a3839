"""Task routing: the learned router and entropy routing, checked against per-task forwards."""
import copy
import re

import pytest
import torch

from python_layers import EideticNetwork
from python_layers.routing import TaskRouter, _features
from tests.python_layers.synthetic import CLASSES, Batches, cnn_body, make_tasks, mlp_body
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)

NUM_TASKS = 3
TASK_CHANCE = 1 / NUM_TASKS
# routed task accuracy must beat chance (1/3) by this much; the synthetic tasks are far apart (~1.0 reached)
ROUTER_MARGIN = 0.5
TRAIN = dict(pruning="l2", step=0.25, stop_threshold=0.1, max_epochs=6, patience=2, recovery_epochs=2,
             progress=False)


@pytest.fixture(scope="module")
def trained():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tasks = make_tasks(num_tasks=NUM_TASKS, seed=21)
        model = EideticNetwork(*mlp_body())
        for t, (loader, _, _) in enumerate(tasks):
            model.prepare_for_task(t, CLASSES)
            model.train_task(loader, torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.05), **TRAIN)
        history = model.fit_router([loader for loader, _, _ in tasks], generator=torch.Generator().manual_seed(0))
    finally:
        torch.set_num_threads(threads)
    x = torch.cat([x for _, x, _ in tasks])
    task_ids = torch.cat([torch.full((x.shape[0],), t) for t, (_, x, _) in enumerate(tasks)])
    classes = torch.cat([y for _, _, y in tasks])
    return model, tasks, history, x, task_ids, classes


def test_the_router_tells_the_tasks_apart(trained):
    model, _, history, x, task_ids, classes = trained
    assert history[-1]["accuracy"] >= TASK_CHANCE + ROUTER_MARGIN
    tasks, predicted = model.predict(x)
    assert tasks.dtype == torch.long and predicted.dtype == torch.long and tasks.shape == predicted.shape == (len(x),)
    routed = float((tasks == task_ids).float().mean())
    assert routed >= TASK_CHANCE + ROUTER_MARGIN, f"held-out routing accuracy {routed:.3f}"
    both = float(((tasks == task_ids) & (predicted == classes)).float().mean())
    assert both >= 1 / (NUM_TASKS * CLASSES) + ROUTER_MARGIN, f"routed class accuracy {both:.3f}"


def test_a_task_with_few_router_inputs_does_not_become_every_inputs_answer(trained):
    """Tasks are weighted equally: with label smoothing, a task with 4 router inputs against hundreds must not pull
    the other tasks' inputs to itself (torch's class weights scale every sample's smoothing term by every class's
    weight: the small task's large weight won every input). A task with no input at all is a clear error."""
    model, tasks, _, x, task_ids, _ = trained
    kept = model.router
    try:
        # copies of the module's loaders (iterating one moves its shuffling state for the tests after this one)
        own = [Batches(loader.x, loader.y, loader.batch_size) for loader, _, _ in tasks]
        few = [(own[1].x[:4], own[1].y[:4])]
        model.fit_router([own[0], few, own[2]], label_smoothing=0.1, generator=torch.Generator().manual_seed(0))
        routed, _ = model.predict(x)
        for t in (0, 2):
            share = float((routed[task_ids == t] == t).float().mean())
            assert share >= 0.9, f"task {t}: {share:.3f} of its inputs routed to it"
        with pytest.raises(ValueError, match=r"task\(s\) \[1\] yielded no input"):
            model.fit_router([own[0], [], own[2]])
    finally:
        model.router = kept


def reference_heads(model, x):
    """Independent: every finished task's logits through model(x, task=t), one body pass each."""
    return [model(x, task=t) for t in range(model.num_finished_tasks)]


@pytest.mark.parametrize("router", ["learned", "entropy"])
def test_predict_matches_per_task_forwards(trained, router):
    model, _, _, x, _, _ = trained
    model.eval()
    with torch.no_grad():
        logits = reference_heads(model, x)
        tasks, classes = model.predict(x, router=router)
        if router == "learned":
            features, activations = _features(model, x, NUM_TASKS, activations=True)
            expect_tasks = model.router(features, activations).argmax(-1)
        else:
            entropy = []
            for z in logits:
                p = torch.softmax(z.double(), -1)
                entropy.append(-(p * p.log()).sum(-1) / torch.log(torch.tensor(float(z.shape[-1]))))
            expect_tasks = torch.stack(entropy, -1).argmin(-1)
    assert torch.equal(tasks, expect_tasks)
    expect_classes = torch.stack([logits[int(t)][i].argmax() for i, t in enumerate(tasks)])
    assert torch.equal(classes, expect_classes)


def test_predict_runs_the_body_once(trained):
    model = trained[0]
    first_layer = next(layer for _, layer in model.groups[0].members)
    calls = []
    handle = first_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.predict(trained[3][:7], router="entropy")
        model.predict(trained[3][:7], router="learned")
    finally:
        handle.remove()
    assert len(calls) == 2


def test_fit_router_touches_no_body_or_head_state(trained):
    model, tasks, _, _, _, _ = trained
    body_and_heads = {k: v.clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor) and not k.startswith("router.")}
    model.train()
    model.fit_router([loader for loader, _, _ in tasks], epochs=2, generator=torch.Generator().manual_seed(0))
    assert model.training  # the mode comes back
    after = model.state_dict()
    for k, v in body_and_heads.items():
        assert torch.equal(after[k], v), k
    assert isinstance(model.router, TaskRouter) and not any(p.requires_grad for p in model.router.parameters())
    model.eval()


def test_an_optimizer_built_after_fit_router_leaves_the_router_alone(trained):
    """The README's recipe builds each task's optimizer from model.parameters(), which holds the router once it is
    fitted; AdamW steps (and decays) every parameter that has a .grad, so the router must be left without one."""
    model, tasks, _, x, _, _ = trained
    model = copy.deepcopy(model)
    model.fit_router([loader for loader, _, _ in tasks], epochs=1, generator=torch.Generator().manual_seed(1))
    assert all(p.grad is None for p in model.router.parameters())
    router_state = {k: v.clone() for k, v in model.router.state_dict().items()}
    model.eval()
    with torch.no_grad():
        routed = model.router(*_features(model, x, NUM_TASKS, activations=True))
    model.prepare_for_task(NUM_TASKS, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=0.5)
    model.train_task(tasks[0][0], optimizer, **dict(TRAIN, max_epochs=1, recovery_epochs=1))
    for k, v in model.router.state_dict().items():  # finish_task may renumber the feature columns, never change them
        assert torch.equal(v.flatten().sort().values, router_state[k].flatten().sort().values), k
    model.eval()
    with torch.no_grad():  # the router's scores on the tasks it was fitted on, bit for bit
        assert torch.equal(model.router(*_features(model, x, NUM_TASKS, activations=True)), routed)


def test_entropy_routing_needs_no_router_and_errors_are_clear(trained):
    model, tasks, _, x, _, _ = trained
    torch.manual_seed(0)
    fresh = EideticNetwork(*mlp_body())
    with pytest.raises(ValueError, match="no task is finished"):
        fresh.predict(x[:3], router="entropy")
    with pytest.raises(ValueError, match="router must be"):
        model.predict(x[:3], router="oracle")
    with pytest.raises(ValueError, match="missing tasks"):
        model.fit_router([tasks[0][0]])
    with pytest.raises(ValueError, match="unfinished"):
        model.fit_router([loader for loader, _, _ in tasks] * 2)
    later = copy.deepcopy(model)
    later.router = None
    with pytest.raises(ValueError, match="fit_router"):
        later.predict(x[:3])
    later.router = model.router
    # a fourth task makes the router stale: refit it
    later.prepare_for_task(NUM_TASKS, CLASSES)
    later.train_task(tasks[0][0], torch.optim.AdamW(later.parameters(), lr=5e-3), pruning=None, max_epochs=1,
                     progress=False)
    with pytest.raises(ValueError, match="fitted on 3 tasks but 4"):
        later.predict(x[:3])
    tasks_e, _ = later.predict(x[:3], router="entropy")
    assert int(tasks_e.max()) < 4
    # not batches: one sample, or tensors passed as loaders (iterating a tensor gives its rows)
    with pytest.raises(ValueError, match=r"batch x \[B, \.\.\.\].*x.unsqueeze\(0\)"):
        model.predict(x[0].flatten())
    shape = ", ".join(map(str, x.shape[1:]))  # one sample of the traced rank: the traced batch's shape named
    with pytest.raises(ValueError, match=rf"batch x \[B, {shape}\].*got {re.escape(str(tuple(x[0].shape)))}.*unsqueeze"):
        model.predict(x[0])
    flat = model.predict(x.flatten(1), router="entropy")  # another rank the body takes, as model(x) does
    assert all(torch.equal(a, b) for a, b in zip(flat, model.predict(x, router="entropy")))
    with pytest.raises(ValueError, match=r"loaders\[0\] must yield batches.*pass \[X\] or a DataLoader"):
        model.fit_router([x for _, x, _ in tasks])
    with pytest.raises(ValueError, match=r"loaders\[1\] must yield batches.*yielded a tensor of shape \(64,\)"):
        model.fit_router([[x] for _, x, _ in tasks[:1]] + [[x.flatten(1)[0]] for _, x, _ in tasks[1:]])


def test_seeded_generators_give_the_same_router(trained):
    """As documented: the generator drives the batches, torch's global generator the initial weights."""
    model, tasks, _, _, _, _ = trained
    routers = []
    for _ in range(2):
        torch.manual_seed(11)
        later = copy.deepcopy(model)
        later.fit_router([[x] for _, x, _ in tasks], epochs=2, generator=torch.Generator().manual_seed(3))
        routers.append(later.router.state_dict())
    assert routers[0].keys() == routers[1].keys()
    for k in routers[0]:
        assert torch.equal(routers[0][k], routers[1][k]), k


def test_a_bfloat16_networks_router_survives_a_reload():
    """fit_router builds a float32 router whatever the body's dtype; a reload rebuilds it in the saved dtype, and
    a router cast with the network (model.bfloat16()) computes in its own dtype."""
    torch.manual_seed(0)
    tasks = make_tasks(num_tasks=2, seed=22)
    make = lambda: EideticNetwork(*(lambda body, width: (body.to(torch.bfloat16), width))(*mlp_body(dropout=0.0)))
    model = make()
    as_bf16 = lambda loader: [(x.to(torch.bfloat16), y) for x, y in loader]
    for t, (loader, _, _) in enumerate(tasks):
        model.prepare_for_task(t, CLASSES)
        model.train_task(as_bf16(loader), torch.optim.AdamW(model.parameters(), lr=5e-3), pruning="l2", step=0.25,
                         max_epochs=1, recovery_epochs=1, max_prune_steps=1, progress=False)
    model.eval()
    model.fit_router([as_bf16(loader) for loader, _, _ in tasks], epochs=1)
    assert model.router.linear.weight.dtype == torch.float32
    x = torch.cat([x for _, x, _ in tasks]).to(torch.bfloat16)
    expected = model.predict(x)
    loaded = make()
    loaded.load_state_dict(model.state_dict())
    loaded.eval()
    assert loaded.router.linear.weight.dtype == torch.float32
    for a, b in zip(loaded.predict(x), expected):
        assert torch.equal(a, b)
    loaded.router.bfloat16()
    tasks_b, _ = loaded.predict(x)
    assert tasks_b.shape == (x.shape[0],)


def test_the_router_travels_with_the_state_dict(trained):
    model, _, _, x, _, _ = trained
    torch.manual_seed(5)
    loaded = EideticNetwork(*mlp_body())
    loaded.load_state_dict(model.state_dict())
    for router in ("learned", "entropy"):
        for a, b in zip(loaded.predict(x, router=router), model.predict(x, router=router)):
            assert torch.equal(a, b)


def test_the_router_reads_each_layers_summaries():
    # cnn_body: Conv(8) -> BN(8) -> ReLU -> MaxPool -> Flatten -> Linear(24) -> ReLU, features 24. The router reads
    # the conv output's mean and spread over positions (2 x 8), relu(BN output) averaged and the BN output's
    # maximum (2 x 8), the Linear output (24) and the features (24).
    torch.manual_seed(0)
    model = EideticNetwork(*cnn_body())
    tasks = make_tasks(num_tasks=1, seed=3)
    model.prepare_for_task(0, CLASSES)
    model.train_task(tasks[0][0], torch.optim.AdamW(model.parameters(), lr=5e-3), pruning=None, max_epochs=1,
                     progress=False)
    x = tasks[0][1][:5]
    model.eval()
    with torch.no_grad():
        features, activations = _features(model, x, 1, activations=True)
        conv = model.body[0](x)
        bn = model.body[1](conv)
        linear = model.body[5](model.body[4](model.body[3](model.body[2](bn))))
    expect = torch.cat([conv.flatten(2).mean(-1), conv.flatten(2).std(-1, correction=0),
                        bn.clamp_min(0).flatten(2).mean(-1), bn.flatten(2).amax(-1), linear, features], 1)
    assert activations.shape == (5, 80)
    torch.testing.assert_close(activations, expect)


def test_a_flip_router_averages_an_input_and_its_mirror(trained):
    model, tasks, _, x, _, _ = trained
    model = copy.deepcopy(model)
    model.fit_router([loader for loader, _, _ in tasks], epochs=3, flip=True,
                     generator=torch.Generator().manual_seed(0))
    assert bool(model.router.flip)
    model.eval()
    first_layer = next(layer for _, layer in model.groups[0].members)
    calls = []
    handle = first_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        tasks_f, classes_f = model.predict(x, router="learned")
    finally:
        handle.remove()
    assert len(calls) == 2  # the input and its mirror
    with torch.no_grad():
        probs = sum(model.router(*_features(model, view, NUM_TASKS, activations=True)).softmax(-1)
                    for view in (x, x.flip(-1)))
        logits = reference_heads(model, x)
    assert torch.equal(tasks_f, probs.argmax(-1))
    assert torch.equal(classes_f, torch.stack([logits[int(t)][i].argmax() for i, t in enumerate(tasks_f)]))
    # the flag travels with the state dict; a router state without it (an older checkpoint) reads no mirror
    torch.manual_seed(5)
    loaded = EideticNetwork(*mlp_body())
    loaded.load_state_dict(model.state_dict())
    assert bool(loaded.router.flip) and torch.equal(loaded.predict(x)[0], tasks_f)
    state = {k: v for k, v in model.router.state_dict().items() if k != "flip"}
    router = TaskRouter(model.router.linear.in_features, NUM_TASKS)
    router.load_state_dict(state)
    assert not bool(router.flip)


def test_flip_needs_images():
    model = EideticNetwork(*mlp_body())
    tasks = make_tasks(num_tasks=1, seed=4)
    model.prepare_for_task(0, CLASSES)
    model.train_task(tasks[0][0], torch.optim.AdamW(model.parameters(), lr=5e-3), pruning=None, max_epochs=1,
                     progress=False)
    flat = [tasks[0][1].flatten(1)]  # [B, 64]: nothing to mirror
    with pytest.raises(ValueError, match=r"flip=True mirrors images \[B, C, H, W\]"):
        model.fit_router([flat], flip=True)


@pytest.mark.parametrize("reads", ["input", "both"])
def test_a_router_reading_the_raw_input(trained, reads):
    model, tasks, _, x, task_ids, _ = trained
    model = copy.deepcopy(model)
    body_and_heads = {k: v.clone() for k, v in model.state_dict().items()
                      if isinstance(v, torch.Tensor) and not k.startswith("router.")}
    history = model.fit_router([loader for loader, _, _ in tasks], epochs=3, reads=reads, conv_epochs=10,
                               generator=torch.Generator().manual_seed(0))
    assert [r["reader"] for r in history] == ["body"] * 3 * (reads == "both") + ["input"] * 10
    router = model.router
    assert router.in_channels == 1 and bool(router.reads_body) == (reads == "both")
    assert not any(p.requires_grad for p in router.parameters())
    after = model.state_dict()
    for k, v in body_and_heads.items():
        assert torch.equal(after[k], v), k
    model.eval()
    with torch.no_grad():
        tasks_r, classes_r = model.predict(x)
        features, activations = _features(model, x, NUM_TASKS, activations=True)
        conv = router.input_logits(x)
        expect = conv if reads == "input" else router.body_logits(features, activations).log_softmax(-1) + \
            conv.log_softmax(-1)
        logits = reference_heads(model, x)
    assert torch.equal(tasks_r, expect.argmax(-1))
    assert torch.equal(classes_r, torch.stack([logits[int(t)][i].argmax() for i, t in enumerate(tasks_r)]))
    assert float((tasks_r == task_ids).float().mean()) >= TASK_CHANCE + ROUTER_MARGIN
    # the CNN and its input statistics travel with the state dict
    torch.manual_seed(5)
    loaded = EideticNetwork(*mlp_body())
    loaded.load_state_dict(model.state_dict())
    assert loaded.router.in_channels == 1 and torch.equal(loaded.predict(x)[0], tasks_r)
    assert torch.equal(loaded.router.pixel_scale, router.pixel_scale)


def test_a_router_state_without_the_input_reader_reads_the_body(trained):
    # an older checkpoint: no reads_body flag, no CNN; a router that had a CNN sheds it when loading one
    model = trained[0]
    state = {k: v for k, v in model.router.state_dict().items() if k != "reads_body"}
    router = TaskRouter(model.router.linear.in_features, NUM_TASKS, in_channels=1, reads_body=False)
    router.load_state_dict(state)
    assert bool(router.reads_body) and router.conv is None and router.in_channels == 0
    assert "pixel_mean" not in router.state_dict()
    features, activations = _features(model, trained[3][:4], NUM_TASKS, activations=True)
    with torch.no_grad():
        assert torch.equal(router(features, activations), model.router(features, activations))


def test_input_router_errors_are_clear(trained):
    model, tasks, _, x, _, _ = trained
    loaders = [loader for loader, _, _ in tasks]
    with pytest.raises(ValueError, match="reads must be one of"):
        model.fit_router(loaders, reads="pixels")
    with pytest.raises(ValueError, match="conv_epochs must be an int >= 1"):
        model.fit_router(loaders, reads="input", conv_epochs=0)
    flat = [[x[:8].flatten(1)] for _ in range(NUM_TASKS)]
    with pytest.raises(ValueError, match=r"the router's CNN reads images \[B, C, H, W\]"):
        model.fit_router(flat, reads="both")
    router = TaskRouter(model.router.linear.in_features, NUM_TASKS, in_channels=1)
    with pytest.raises(ValueError, match="raw input"):
        router(torch.zeros(2, router.linear.in_features))


def test_a_cnn_router_fits_and_mirrors_without_extra_body_passes(trained):
    model, tasks, _, x, task_ids, _ = trained
    model = copy.deepcopy(model)
    first_layer = next(layer for _, layer in model.groups[0].members)
    calls = []
    handle = first_layer.register_forward_hook(lambda *args: calls.append(1))
    try:
        model.fit_router([loader for loader, _, _ in tasks], reads="input", flip=True, conv_epochs=3,
                         generator=torch.Generator().manual_seed(0))
        assert calls == []  # the router reads the input alone: its data need no body pass
        model.eval()
        tasks_r, _ = model.predict(x)
    finally:
        handle.remove()
    assert len(calls) == 1  # the heads' pass; the mirror goes through the router's CNN only
    router = model.router
    assert router.linear.in_features == model.feature_dim and bool(router.flip) and not bool(router.reads_body)
    with torch.no_grad():
        probs = router.input_logits(x).softmax(-1) + router.input_logits(x.flip(-1)).softmax(-1)
    assert torch.equal(tasks_r, probs.argmax(-1))
    assert float((tasks_r == task_ids).float().mean()) >= TASK_CHANCE + ROUTER_MARGIN


@pytest.mark.parametrize("reads", ["body", "input", "both"])
def test_warm_start_copies_the_previous_router_and_adds_fresh_rows(reads):
    from python_layers.routing import _warm_start
    reads_body, in_channels, hidden = reads != "input", 0 if reads == "body" else 3, 16
    torch.manual_seed(0)
    old = TaskRouter(10, 2, input_dim=12 if reads_body else 0, hidden=hidden, in_channels=in_channels,
                     reads_body=reads_body)
    new = TaskRouter(10, 3, input_dim=12 if reads_body else 0, hidden=hidden, in_channels=in_channels,
                     reads_body=reads_body)
    fresh = {k: v.clone() for k, v in new.named_parameters()}
    with torch.no_grad():
        _warm_start(new, old)
    theirs = dict(old.named_parameters())
    rows = {"linear.weight", "linear.bias", "mlp.4.weight", "mlp.4.bias", "conv.10.weight", "conv.10.bias"}
    assert rows & set(fresh) and (reads == "body") == ("conv.0.weight" not in fresh)
    for name, p in new.named_parameters():
        if name in rows:  # one row per task: the old tasks' rows copied, the new task's row as it was
            assert torch.equal(p[:2], theirs[name]) and torch.equal(p[2:], fresh[name][2:]), name
        else:
            assert torch.equal(p, theirs[name]), name
    with pytest.raises(ValueError, match="fewer than the 3 finished now"):
        _warm_start(new, new)
    other = TaskRouter(10, 2, input_dim=12 if reads_body else 0, hidden=hidden, in_channels=1 if in_channels else 0,
                       reads_body=reads_body)
    if in_channels:
        with pytest.raises(ValueError, match=r"reads otherwise or has other sizes: in_channels 1 \(this fit: 3\)"):
            _warm_start(new, other)


def test_random_crops_are_windows_of_the_zero_padded_input():
    from python_layers.routing import _random_crop
    x = torch.randn(16, 2, 6, 5)
    assert _random_crop(x, 0, None) is x
    out = _random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2))
    offsets = set()
    for b in range(16):
        found = [(i, j) for i in range(5) for j in range(5) if torch.equal(padded[b, :, i:i + 6, j:j + 5], out[b])]
        assert found, b
        offsets.add(found[0])
    assert len(offsets) > 4  # each input its own position
    assert torch.equal(out, _random_crop(x, 2, torch.Generator().manual_seed(0)))  # drawn from the generator


def test_a_cnn_router_trains_on_crops(trained):
    model, tasks, _, x, task_ids, _ = trained
    model = copy.deepcopy(model)
    torch.manual_seed(0)  # the CNN's initial weights
    model.fit_router([loader for loader, _, _ in tasks], reads="input", conv_epochs=20, crop=1,
                     generator=torch.Generator().manual_seed(0))
    model.eval()
    tasks_r, _ = model.predict(x)
    assert float((tasks_r == task_ids).float().mean()) >= TASK_CHANCE + ROUTER_MARGIN
    with pytest.raises(ValueError, match="crop must be an int >= 0, got -1"):
        model.fit_router([loader for loader, _, _ in tasks], reads="input", crop=-1)


def test_fit_router_warm_starts_from_the_previous_tasks_router(trained):
    model, tasks, _, x, task_ids, _ = trained
    model = copy.deepcopy(model)
    loaders = [loader for loader, _, _ in tasks]
    model.num_finished_tasks = 2  # the network as it was after task 1 (tasks 0 and 1 read the same neurons)
    try:
        model.fit_router(loaders[:2], reads="input", conv_epochs=3, generator=torch.Generator().manual_seed(0))
    finally:
        model.num_finished_tasks = NUM_TASKS
    previous = model.router
    before = {k: v.clone() for k, v in previous.state_dict().items()}
    history = model.fit_router(loaders, reads="input", conv_epochs=5, init=previous,
                               generator=torch.Generator().manual_seed(0))
    assert [r["reader"] for r in history] == ["input"] * 5 and model.router is not previous
    assert all(torch.equal(v, previous.state_dict()[k]) for k, v in before.items())  # read, not changed
    model.eval()
    tasks_r, _ = model.predict(x)
    assert float((tasks_r == task_ids).float().mean()) >= TASK_CHANCE + ROUTER_MARGIN
    with pytest.raises(ValueError, match="fitted on 3 tasks; it must have fewer than the 3 finished now"):
        model.fit_router(loaders, reads="input", init=model.router)
    with pytest.raises(ValueError, match="reads otherwise or has other sizes: reads_body False"):
        model.fit_router(loaders, reads="both", init=previous)
    with pytest.raises(TypeError, match="init must be None or a TaskRouter .*got bool"):
        model.fit_router(loaders, reads="input", init=False)  # was an AttributeError after every feature pass


def test_a_run_warm_starts_its_router_and_fits_the_last_one_longer(tmp_path, monkeypatch):
    from python_layers import routing
    from python_layers.config import load_config
    from python_layers.run import train
    seen = []
    real = routing.fit_router

    def spy(model, loaders, **kwargs):
        seen.append((len(loaders), kwargs.get("init") is not None, kwargs.get("conv_epochs"), kwargs.get("crop")))
        return real(model, loaders, **kwargs)
    monkeypatch.setattr(routing, "fit_router", spy)
    cfg = load_config(None, dict(scenario="synthetic", tasks=3, widths=[16, 16], max_epochs=2, patience=1,
                                 recovery_epochs=1, step=0.25, max_prune_steps=1, batch_size=32, lr=1e-2, threads=1,
                                 progress=False, router_input="input", router_flip=True, router_warm_start=True,
                                 router_input_epochs=1, router_input_epochs_last=2, router_input_crop=2))
    results = train(cfg, tmp_path / "run", log=lambda *a: None)
    assert seen == [(1, False, 1, 2), (2, True, 1, 2), (3, True, 2, 2)]
    fits = results["router_fits"]
    assert [(f["after_task"], f["warm_start"], f["input_epochs"], f["epochs"]) for f in fits] == [
        (0, False, None, None), (1, True, 1, None), (2, True, 2, None)]
    assert all(f["seconds"] > 0 for f in fits) and set(fits[2]["last_epoch"]) == {"input"}
    for key in ("routed_accuracy_matrix", "entropy_routed_accuracy_matrix"):
        assert all(v is not None for i, row in enumerate(results[key]) for v in row[:i + 1]), key
    assert results["entropy_routed_acc"] == pytest.approx(sum(results["entropy_routed_accuracy_matrix"][2]) / 3)


# ------------------------------------------------------------------------------------------------------------------
# Split MNIST (the shared data): the learned router against the true task id
# ------------------------------------------------------------------------------------------------------------------
def split_mnist_gap(num_tasks: int, samples_per_task: int, width: int = 200, reads=("body",)):
    """(oracle ACC, {reader: routed ACC}): a 784-width-width MLP trained task after task with light pruning, then a
    router for each of ``reads`` (body, input or both: each fitted on a copy of the same network, from the same
    seeds) on the same ``samples_per_task`` training inputs of each task, all measured on the whole test set."""
    from python_layers.models import build_body
    from python_layers.scenarios import DataNotFoundError, InMemoryLoader, build_scenario
    try:
        scenario = build_scenario("split_mnist", num_tasks, seed=0, train_samples_per_task=samples_per_task)
    except DataNotFoundError as exc:
        pytest.skip(f"MNIST not found ($EIDETIC_DATA or ../shared/data): {exc}")
    torch.manual_seed(0)
    body, feature_dim = build_body("mlp", scenario.input_shape, [width, width], 0.0)
    model = EideticNetwork(body, feature_dim)
    for t, task in enumerate(scenario.tasks):
        model.prepare_for_task(t, 2)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3,
                                      weight_decay=0.01)
        model.train_task(InMemoryLoader(task.train, 128, shuffle=True, seed=t), optimizer, pruning="l2", step=0.2,
                         stop_threshold=0.01, max_epochs=3, patience=1, recovery_epochs=1, max_prune_steps=2,
                         progress=False)
    model.eval()
    tests = [task.test.batch(torch.arange(len(task.test))) for task in scenario.tasks]
    with torch.no_grad():
        oracle = sum(float((model(x, task=t).argmax(-1) == y).float().mean()) for t, (x, y) in enumerate(tests))
    routed = {}
    for reader in reads:
        routed_model = copy.deepcopy(model)
        torch.manual_seed(0)  # the router's initial weights
        routed_model.fit_router([InMemoryLoader(task.train, 1000, shuffle=False, task_label=t)
                                 for t, task in enumerate(scenario.tasks)], reads=reader,
                                generator=torch.Generator().manual_seed(0))
        routed_model.eval()
        hits = 0.0
        with torch.no_grad():
            for t, (x, y) in enumerate(tests):
                tasks, classes = routed_model.predict(x)
                hits += float(((tasks == t) & (classes == y)).float().mean())
        routed[reader] = hits / num_tasks
    return oracle / num_tasks, routed


@pytest.mark.slow
@pytest.mark.trains_on_mnist
def test_split_mnist_3_tasks_routed_within_one_point_of_the_oracle():
    # The router's own CNN on the pixels (router_input: input) is the one that holds the bound with room to
    # spare: measured gaps 0.45-0.49 points over 3 body seeds x 2-4 router seeds (oracle 0.9943-0.9955).
    # The router on the body's activations (the default, router_input: body) lands 0.79-1.30 points below the
    # oracle over the same seeds with these 6,000 inputs per task (0.64-0.91 with the demo's 10,000), so it is
    # held to 1.5 points: a guard against losing it, not the 1-point claim. The linear router on the last layer
    # alone (hidden=0) routes at 0.9521 here (gap 4.2 points). ~6,000 test images: one
    # point is ~60 of them.
    oracle, routed = split_mnist_gap(3, 6000, reads=("input", "body"))
    assert oracle >= 0.98, f"the body itself is off: oracle ACC {oracle:.4f}"
    assert oracle - routed["input"] <= 0.01, f"router CNN: routed ACC {routed['input']:.4f} vs oracle {oracle:.4f}"
    assert oracle - routed["body"] <= 0.015, f"body reader: routed ACC {routed['body']:.4f} vs oracle {oracle:.4f}"


@pytest.mark.slow
@pytest.mark.trains_on_mnist
def test_split_mnist_5_tasks_routed_close_to_the_oracle():
    # 5 tasks do NOT reach one point: measured oracle 0.9890, routed 0.9663 (gap 2.3 points; the linear router on
    # the features: 0.8822, gap 10.7). With 10,000 router inputs per task (configs/demo.yaml tasks=5) the gap is
    # 1.6 points, and wider or ensembled routers, the heads' confidence and Gaussian task models do not close it:
    # the MLP body's activations tell digit pairs apart less well than a small CNN on the pixels
    # (benchmarks/results/routing/README.md).
    oracle, routed = split_mnist_gap(5, 5000)
    routed = routed["body"]
    assert oracle >= 0.98, f"the body itself is off: oracle ACC {oracle:.4f}"
    assert oracle - routed <= 0.03, f"routed ACC {routed:.4f} vs oracle {oracle:.4f}"


@pytest.mark.slow
@pytest.mark.trains_on_mnist
def test_split_mnist_5_tasks_routed_within_one_point_through_the_routers_own_cnn():
    # router_input=input (configs/split_mnist5.yaml): the router's own CNN on the pixels, 10,000 router inputs per
    # task. Measured here: oracle 0.9942, routed 0.9868 (gap 0.74 points; ~60 s on one thread). On the demo's body
    # (configs/demo.yaml tasks=5): the CNN 0.74, the body reader alone 1.68, both readers 0.99 points below the
    # oracle (benchmarks/results/routing/README.md).
    oracle, routed = split_mnist_gap(5, 10000, reads=("input",))
    routed = routed["input"]
    assert oracle >= 0.98, f"the body itself is off: oracle ACC {oracle:.4f}"
    assert oracle - routed <= 0.01, f"routed ACC {routed:.4f} vs oracle {oracle:.4f}"
