"""train_task: the paper's steps, their stopping rules, the restore of the last good state, the history."""
import copy
import re
import warnings

import pytest
import torch

import python_layers.trainer as trainer
from eidetic_kernels import FREE, PRUNED
from python_layers import EideticNetwork
from tests.python_layers.synthetic import CLASSES, make_tasks, mlp_body
from tests.python_layers.synthetic import single_thread  # noqa: F401  (autouse fixture)

LR = 5e-3
KEYS = {"task", "phase", "epoch", "step", "loss", "train_accuracy", "pruned_share", "frozen_share"}


def new_model(width=24, seed=0):
    torch.manual_seed(seed)
    model = EideticNetwork(*mlp_body(width=width))
    model.prepare_for_task(0, CLASSES)
    return model, torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)


@pytest.fixture(scope="module")
def tasks():
    return make_tasks(num_tasks=2, seed=11)


def scripted_accuracy(monkeypatch, script):
    """Really train every epoch, but report the accuracy ``script(phase, prune_step)`` returns."""
    real = trainer.run_epoch
    seen = []

    def fake(model, loader, optimizer, device, desc="", *args, **kwargs):
        loss, acc = real(model, loader, optimizer, device, desc, *args, **kwargs)
        m = re.search(r"prune step (\d+)", desc)
        phase, step = ("recover", int(m.group(1))) if m else ("train", 0)
        seen.append((phase, step))
        return loss, script(phase, step, len(seen))

    monkeypatch.setattr(trainer, "run_epoch", fake)
    return seen


def test_history_reads_like_the_paper(tasks):
    model, optimizer = new_model()
    history = model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.25, stop_threshold=0.1, max_epochs=6,
                               patience=2, recovery_epochs=2, progress=False)
    names = {g.name for g in model.groups}
    phases = [r["phase"] for r in history]
    assert phases[0] == "train" and phases[-1] == "finish"
    order = {"train": 0, "recover": 1, "restore": 2, "finish": 3}
    assert [order[p] for p in phases] == sorted(order[p] for p in phases), phases
    epochs = [r for r in history if r["phase"] in ("train", "recover")]
    assert [r["epoch"] for r in epochs] == list(range(1, len(epochs) + 1))
    assert sum(r["phase"] == "train" for r in history) <= 6
    for step in {r["step"] for r in epochs if r["phase"] == "recover"}:
        assert sum(r["step"] == step for r in epochs) <= 2  # recovery_epochs
    for r in epochs:
        assert KEYS <= set(r) and r["task"] == 0
        assert set(r["pruned_share"]) == names and set(r["frozen_share"]) == names
        assert 0 <= r["train_accuracy"] <= 1 and r["loss"] >= 0
    # pruning shares grow with the steps; nothing is frozen before the finish
    shares = [sum(r["pruned_share"].values()) for r in epochs]
    assert shares == sorted(shares) and shares[0] == 0
    assert all(v == 0 for r in epochs for v in r["frozen_share"].values())
    final = history[-1]
    assert final["stop_reason"] in ("accuracy dropped", "nothing left to prune")
    capacity = model.capacity()
    for name, kept in final["kept"].items():
        assert capacity[name]["task 0"] == kept >= 1
        assert final["frozen_share"][name] == pytest.approx(kept / sum(capacity[name].values()))
    assert model.num_finished_tasks == 1 and model.current_task is None


def test_training_stops_after_patience_epochs_without_improvement(tasks, monkeypatch):
    accuracies = [0.5, 0.6, 0.6, 0.55, 0.9, 0.95]  # epoch 2 is best; epochs 3 and 4 do not improve
    seen = scripted_accuracy(monkeypatch, lambda phase, step, n: accuracies[n - 1] if phase == "train" else 1.0)
    model, optimizer = new_model()
    history = model.train_task(tasks[0][0], optimizer, pruning=None, max_epochs=6, patience=2, progress=False)
    assert [p for p, _ in seen] == ["train"] * 4
    assert history[-1]["stop_reason"] == "no pruning" and history[-1]["train_accuracy"] == 0.6
    # without improvement at all, max_epochs caps the training
    seen.clear()
    model, optimizer = new_model()
    scripted_accuracy(monkeypatch, lambda phase, step, n: 0.1 * n)
    model.train_task(tasks[0][0], optimizer, pruning=None, max_epochs=3, patience=5, progress=False)


def test_training_keeps_the_best_epochs_weights(tasks, monkeypatch):
    """Epoch 2 is the best; epochs 3-4 move the weights on; the task is finished with epoch 2's weights."""
    accuracies = [0.5, 0.9, 0.8, 0.8]
    model, optimizer = new_model()
    states = []
    real = trainer.run_epoch

    def fake(*args, **kwargs):
        loss, _ = real(*args, **kwargs)
        states.append(copy.deepcopy(model.state_dict()))
        return loss, accuracies[len(states) - 1]

    monkeypatch.setattr(trainer, "run_epoch", fake)
    finished = capture_finish(model, optimizer)
    model.train_task(tasks[0][0], optimizer, pruning=None, max_epochs=4, patience=2, progress=False)
    assert_same_state(finished["model"], states[1])
    assert not torch.equal(states[1]["body.1.weight"], states[3]["body.1.weight"])


def capture_finish(model, optimizer):
    captured = {}
    real_finish = model.finish_task

    def finish(*args, **kwargs):
        captured["model"] = copy.deepcopy(model.state_dict())
        captured["optimizer"] = copy.deepcopy(optimizer.state_dict())
        return real_finish(*args, **kwargs)

    model.finish_task = finish
    return captured


def assert_same_state(a, b):
    assert a.keys() == b.keys()
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k


def test_a_step_that_does_not_recover_is_undone_with_the_optimizer_state(tasks, monkeypatch):
    """Step 1 recovers, step 2 never does: the task finishes with the weights, the neuron states AND the
    optimizer state that followed step 1's recovery."""
    model, optimizer = new_model()
    after_epoch = []
    real = trainer.run_epoch

    def fake(m, loader, opt, device, desc="", *args, **kwargs):
        loss, _ = real(m, loader, opt, device, desc, *args, **kwargs)
        after_epoch.append((desc, copy.deepcopy(model.state_dict()), copy.deepcopy(optimizer.state_dict())))
        return loss, 0.0 if "prune step 2" in desc else 0.9

    monkeypatch.setattr(trainer, "run_epoch", fake)
    finished = capture_finish(model, optimizer)
    history = model.train_task(tasks[0][0], optimizer, pruning="l1", step=0.25, stop_threshold=0.01, max_epochs=2,
                               patience=1, recovery_epochs=3, progress=False)
    descs = [d for d, _, _ in after_epoch]
    assert sum("prune step 1" in d for d in descs) == 1  # back within the threshold at once
    assert sum("prune step 2" in d for d in descs) == 3  # recovery_epochs, all failing
    good_model, good_optimizer = next((m, o) for d, m, o in after_epoch if "prune step 1" in d)
    assert_same_state(finished["model"], good_model)
    assert finished["optimizer"]["param_groups"] == good_optimizer["param_groups"]
    for i, state in good_optimizer["state"].items():
        for k, v in state.items():
            assert torch.equal(finished["optimizer"]["state"][i][k], v), (i, k)
    assert history[-1]["stop_reason"] == "accuracy dropped"
    assert [r["phase"] for r in history[-2:]] == ["restore", "finish"]
    assert history[-2]["train_accuracy"] == history[-1]["train_accuracy"] == 0.9  # the state kept, not step 2's
    # step 1 pruned round(0.25 * 24) = 6 neurons per group; they are FREE again (recycled), the rest is task 0
    for name, row in model.capacity().items():
        assert row == {"task 0": 18, "free": 6, "pruned": 0}, name


def test_pruning_ends_cleanly_when_nothing_is_left(tasks):
    model, optimizer = new_model()
    history = model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=1.0, max_epochs=2,
                               patience=1, recovery_epochs=1, progress=False)
    assert history[-1]["stop_reason"] == "nothing left to prune"
    # 24 -> 12 -> 1: two steps, then nothing is left but the one FREE neuron kept per group
    assert max(r["step"] or 0 for r in history) == 2
    for row in model.capacity().values():
        assert row == {"task 0": 1, "free": 23, "pruned": 0}


def test_a_task_at_chance_is_said_before_pruning(tasks, monkeypatch):
    """Training accuracy that never rises above chance cannot fall below its best: pruning would keep almost
    nothing. train_task says so before pruning (and not for a task that learns)."""
    scripted_accuracy(monkeypatch, lambda phase, step, n: 1.0 / CLASSES)
    model, optimizer = new_model()
    with pytest.warns(UserWarning, match=r"task 0: the training accuracy never rose above chance") as record:
        model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=0.01, max_epochs=2,
                         patience=1, recovery_epochs=1, progress=False, max_prune_steps=1)
    assert any(r.filename == __file__ for r in record)  # the caller's line
    monkeypatch.undo()
    model, optimizer = new_model(seed=1)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*never rose above chance")
        model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=0.01, max_epochs=3,
                         patience=1, recovery_epochs=1, progress=False, max_prune_steps=1)


def test_chance_is_the_most_frequent_class_share(tasks, monkeypatch):
    """Chance is what always answering the most frequent training label scores: an imbalanced task whose accuracy
    sits at that share (above 1/num_classes) is said, naming the class; one above it is not."""
    x = torch.cat([xb for xb, _ in make_tasks(num_tasks=1, seed=11)[0][0]])  # its own: the shared loaders keep state
    y = torch.full((x.shape[0],), 2)
    y[: x.shape[0] // 4] = torch.arange(x.shape[0] // 4) % CLASSES  # 3/4 + 1/12 of the labels are class 2
    share = float((y == 2).float().mean())
    assert share > 1.0 / CLASSES + 0.4
    loader = [(x[i:i + 32], y[i:i + 32]) for i in range(0, x.shape[0], 32)]
    for accuracy, said in ((share, True), (share + 0.05, False)):
        scripted_accuracy(monkeypatch, lambda phase, step, n: accuracy)
        model, optimizer = new_model()
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            model.train_task(loader, optimizer, pruning="l2", step=0.5, stop_threshold=0.01, max_epochs=2,
                             patience=1, recovery_epochs=1, progress=False, max_prune_steps=1)
        messages = [str(r.message) for r in record if "never rose above chance" in str(r.message)]
        assert bool(messages) == said, messages
        if said:
            assert f"always answering class 2, the most frequent, gives {share:.3f}" in messages[0]
        monkeypatch.undo()


def test_a_restore_keeps_the_learning_rate_a_schedule_set(monkeypatch):
    """Restoring the last good state after a failed pruning step puts back weights and optimizer moments, not
    the learning rates: a schedule stepped from the callback every epoch is not rewound."""
    tasks = make_tasks(num_tasks=1, seed=11)  # its own loader: the module's keep their shuffling state
    scripted_accuracy(monkeypatch, lambda phase, step, n: 0.9 if phase == "train" else 0.1)
    model, optimizer = new_model()
    epochs = []

    def schedule(event):
        if event["event"] == "epoch":
            epochs.append(event["record"]["phase"])
            for group in optimizer.param_groups:
                group["lr"] *= 0.5

    history = model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.25, stop_threshold=0.01, max_epochs=2,
                               patience=5, recovery_epochs=1, progress=False, callback=schedule)
    assert history[-1]["stop_reason"] == "accuracy dropped" and epochs == ["train", "train", "recover"]
    assert [g["lr"] for g in optimizer.param_groups] == [LR * 0.5 ** 3] * len(optimizer.param_groups)


def test_max_prune_steps_is_checked():
    model, optimizer = new_model()
    for bad in (-1, 2.5, True, "3"):
        with pytest.raises(ValueError, match="max_prune_steps must be an int >= 0"):
            model.train_task([], optimizer, max_prune_steps=bad, progress=False)


def test_a_one_class_head_is_never_at_chance_and_none_spelled_as_in_the_config_skips_pruning(tasks):
    """A one-class task is always right: no chance warning. pruning="none" (the CLI config's spelling) is None."""
    loader = [(x, torch.zeros_like(y)) for x, y in tasks[0][0]]
    for pruning in ("none", "None", None):
        torch.manual_seed(0)
        model = EideticNetwork(*mlp_body())
        model.prepare_for_task(0, 1)
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*never rose above chance")
            history = model.train_task(loader, torch.optim.SGD(model.parameters(), lr=0.05), pruning=pruning,
                                       max_epochs=1, patience=1, recovery_epochs=1, progress=False)
        assert history[-1]["stop_reason"] == "no pruning"
    torch.manual_seed(0)
    model = EideticNetwork(*mlp_body())
    model.prepare_for_task(0, 1)
    with warnings.catch_warnings():  # pruning a one-class task: still no chance warning
        warnings.filterwarnings("error", message=".*never rose above chance")
        model.train_task(loader, torch.optim.SGD(model.parameters(), lr=0.05), pruning="l2", step=0.5,
                         max_epochs=1, patience=1, recovery_epochs=1, progress=False, max_prune_steps=1)


def test_max_prune_steps_caps_the_pruning(tasks):
    model, optimizer = new_model()
    history = model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.25, stop_threshold=1.0, max_epochs=1,
                               patience=1, recovery_epochs=1, progress=False, max_prune_steps=1)
    assert history[-1]["stop_reason"] == "max_prune_steps reached"
    for row in model.capacity().values():
        assert row["task 0"] == 18


def test_a_train_task_stopped_after_pruning_is_said_when_the_task_trains_again(tasks):
    """A train_task interrupted after a pruning step leaves PRUNED neurons in the current task: the next call
    warns, naming the groups, instead of training with less capacity silently; unpruning first is silent."""
    model, optimizer = new_model()
    model(next(iter(tasks[0][0]))[0])  # the graph
    for g in model.groups:
        g.prune([0, 1])  # what a stopped pruning step leaves
    kwargs = dict(pruning=None, max_epochs=1, patience=1, progress=False)
    with pytest.warns(UserWarning, match=r"starts training with PRUNED neurons \(body\.1: 2, body\.4: 2\)"):
        model.train_task(tasks[0][0], optimizer, **kwargs)
    model, optimizer = new_model()
    model(next(iter(tasks[0][0]))[0])
    for g in model.groups:
        g.prune([0, 1])
        g.unprune((g.task_state == PRUNED).nonzero().flatten())  # the way back the warning names
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*starts training with PRUNED")
        model.train_task(tasks[0][0], optimizer, **kwargs)


def test_a_reused_optimizer_keeps_working(tasks):
    model, optimizer = new_model()
    # stop_threshold 1: pruning goes on however the accuracy moves, so task 1 finds FREE neurons. With 0.2 whether
    # the first step kept every neuron depended on the batch order, which the module's shared loader (its own
    # generator) carries from whichever tests ran before in the same worker: it failed once in a full run
    model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=1.0, max_epochs=2, patience=1,
                     recovery_epochs=1, progress=False)
    for p, state in optimizer.state.items():  # no stale moments for the storage that shrank
        for v in state.values():
            if isinstance(v, torch.Tensor) and v.dim():
                assert v.shape == p.shape
    model.prepare_for_task(1, CLASSES)
    optimizer.add_param_group({"params": list(model.heads[1].parameters())})
    model.train_task(tasks[1][0], optimizer, pruning="l2", step=0.5, stop_threshold=0.2, max_epochs=2, patience=1,
                     recovery_epochs=1, progress=False)
    assert model.num_finished_tasks == 2


def test_taylor_scores_are_collected_during_the_call_only(tasks):
    model, optimizer = new_model()
    model.train_task(tasks[0][0], optimizer, pruning="taylor", step=0.5, stop_threshold=0.2, max_epochs=2,
                     patience=1, recovery_epochs=1, progress=False)
    assert all(not layer.taylor_enabled for g in model.groups for _, layer in g.members)


def test_never_prunes_a_frozen_neuron(tasks):
    model, optimizer = new_model()
    model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=0.2, max_epochs=2, patience=1,
                     recovery_epochs=1, progress=False)
    frozen = {g.name: (g.task_state == 0).clone() for g in model.groups}
    model.prepare_for_task(1, CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.05)
    model.train_task(tasks[1][0], optimizer, pruning="l1", step=1.0, stop_threshold=1.0, max_epochs=1, patience=1,
                     recovery_epochs=1, progress=False)
    for g in model.groups:
        s = g.task_state
        assert bool((s[frozen[g.name]] == 0).all())
        assert int((s == 1).sum()) == 1  # pruned down to the one FREE neuron kept
        assert not bool((s == PRUNED).any()) and int((s == FREE).sum()) == g.size - 1 - int(frozen[g.name].sum())


def test_progress_bars_show_loss_accuracy_and_pruned_share(tasks, capsys):
    model, optimizer = new_model()
    model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=1.0, max_epochs=1, patience=1,
                     recovery_epochs=1, progress=True)
    err = capsys.readouterr().err
    for text in ("task 0 · train 1/1", "prune step 1", "loss=", "acc=", "pruned="):
        assert text in err


def test_clear_errors(tasks):
    model, optimizer = new_model()
    loader = tasks[0][0]
    for kwargs, match in ((dict(pruning="l3"), "pruning"), (dict(step=0.0), "step"), (dict(step=1.5), "step"),
                          (dict(stop_threshold=2), "stop_threshold"), (dict(max_epochs=0), "max_epochs"),
                          (dict(patience=0), "patience"), (dict(recovery_epochs=0), "recovery_epochs")):
        with pytest.raises(ValueError, match=match):
            model.train_task(loader, optimizer, progress=False, **kwargs)
    torch.manual_seed(0)
    fresh = EideticNetwork(*mlp_body())
    with pytest.raises(ValueError, match="prepare_for_task"):
        fresh.train_task(loader, optimizer, progress=False)
    early = torch.optim.AdamW(fresh.parameters(), lr=LR)  # created before the head existed
    fresh.prepare_for_task(0, CLASSES)
    with pytest.raises(ValueError, match="head 0"):
        fresh.train_task(loader, early, progress=False)


@pytest.mark.parametrize("pruning", ["taylor", "l2"])
def test_a_checkpoint_inside_the_task_resumes_exactly(tasks, pruning):
    """Stop after pruning step 1 (model, optimizer, RNG, loader and trainer state saved through the callback),
    resume in a fresh network: the finished task is bit-identical to the uninterrupted run's."""
    kwargs = dict(pruning=pruning, step=0.25, stop_threshold=1.0, max_epochs=2, patience=1, recovery_epochs=1,
                  progress=False)
    loader = tasks[0][0]
    start = loader.state_dict()
    model, optimizer = new_model()
    saved, events = {}, []

    def callback(event):
        events.append(event["event"])
        if event["event"] == "prune_step" and event["step"] == 1:
            saved.update(model=copy.deepcopy(model.state_dict()), optimizer=copy.deepcopy(optimizer.state_dict()),
                         rng=torch.random.get_rng_state(), loader=copy.deepcopy(loader.state_dict()),
                         trainer=copy.deepcopy(event["trainer_state"]))

    full = model.train_task(loader, optimizer, callback=callback, **kwargs)
    assert events.count("epoch") == sum(r["phase"] in ("train", "recover") for r in full)
    assert events.count("prune_step") >= 3  # after training, after steps 1, 2, ...

    loader.load_state_dict(start)
    resumed_model, resumed_optimizer = new_model(seed=99)  # other init: everything comes from the checkpoint
    resumed_model.load_state_dict(saved["model"])
    resumed_optimizer.load_state_dict(saved["optimizer"])
    torch.random.set_rng_state(saved["rng"])
    loader.load_state_dict(saved["loader"])
    rest = resumed_model.train_task(loader, resumed_optimizer, resume_state=saved["trainer"], **kwargs)
    assert_same_state(resumed_model.state_dict(), model.state_dict())
    done_before = saved["trainer"]["epochs"]
    assert [r["epoch"] for r in rest] == [r["epoch"] for r in full if r["epoch"] > done_before or
                                          r["phase"] == "finish"]
    assert rest[-1]["kept"] == full[-1]["kept"] and rest[-1]["stop_reason"] == full[-1]["stop_reason"]


def test_tracing_the_graph_from_a_batch_draws_no_randomness(tasks):
    """The graph is traced from the loader's first batch; that peek must not move the loader's or torch's RNG."""
    loader = tasks[0][0]
    before_loader, before_torch = loader.state_dict()["generator"].clone(), torch.random.get_rng_state()
    x = trainer._peek(loader)
    assert x.shape[1:] == (1, 8, 8)
    assert torch.equal(loader.state_dict()["generator"], before_loader)
    assert torch.equal(torch.random.get_rng_state(), before_torch)


def test_learning_rate_is_scaled_once_when_pruning_starts():
    """prune_lr_factor: the rates halve when pruning starts, once, also through restores and a resume, and are
    back when the task finishes: an optimizer reused for the next task starts it at the same rates."""
    tasks = make_tasks(num_tasks=2, seed=11)  # its own loaders: the module's keep their shuffling state
    model, optimizer = new_model()
    for task in range(2):
        if task:
            model.prepare_for_task(task, CLASSES)
            optimizer.add_param_group({"params": list(model.heads[task].parameters())})
        states, rates = [], []

        def record(event):
            states.append(event.get("trainer_state"))
            rates.append([g["lr"] for g in optimizer.param_groups])

        # every step is kept (threshold 1), so the rates would be halved twice if the scaling were per step
        model.train_task(tasks[task][0], optimizer, pruning="l2", step=0.25, stop_threshold=1.0, max_epochs=2,
                         patience=1, recovery_epochs=1, max_prune_steps=2, progress=False, prune_lr_factor=0.5,
                         callback=record)
        saved = [i for i, s in enumerate(states) if s is not None]
        assert len(saved) == 3  # training done, then pruning steps 1 and 2
        assert states[saved[0]]["lr_scaled"] is False and states[saved[1]]["lr_scaled"] and states[saved[2]]["lr_scaled"]
        groups = len(optimizer.param_groups)
        assert rates[saved[0]] == [LR] * groups and rates[saved[2]] == [LR * 0.5] * groups
        assert [g["lr"] for g in optimizer.param_groups] == [LR] * groups  # back when the task finished
    with pytest.raises(ValueError, match="prune_lr_factor"):
        model2, opt2 = new_model()
        model2.train_task(tasks[0][0], opt2, prune_lr_factor=0.0, progress=False)


def test_the_capacity_warning_says_why_a_task_kept_every_neuron():
    """pruning=None keeps every FREE neuron: said so, not "a larger stop_threshold"; the last FREE neuron of a layer,
    which pruning always leaves, says a layer of W neurons holds at most W tasks."""
    data = make_tasks(num_tasks=2, seed=12)
    model, optimizer = new_model()
    with pytest.warns(trainer.CapacityWarning, match=r"task 0 kept every neuron left in body\.1 \(24\), body\.4 "
                                                     r"\(24\).*train_task\(pruning=None\) kept every FREE neuron: "
                                                     r"prune.*at most W tasks"):
        model.train_task(data[0][0], optimizer, pruning=None, max_epochs=1, progress=False)
    model, optimizer = new_model(width=2)
    kwargs = dict(pruning="l2", step=1.0, stop_threshold=1.0, max_epochs=1, recovery_epochs=1, progress=False)
    model.train_task(data[0][0], optimizer, **kwargs)  # keeps one neuron of each layer, one stays FREE
    assert all(int((g.task_state == FREE).sum()) == 1 for g in model.groups)
    model.prepare_for_task(1, CLASSES)
    optimizer.add_param_group({"params": model.heads[1].parameters()})
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("always")
        model.train_task(data[1][0], optimizer, **kwargs)
    message = [str(w.message) for w in said if issubclass(w.category, trainer.CapacityWarning)]
    assert len(message) == 1 and re.search(r"task 1 kept every neuron left in body\.1 \(1\), body\.4 \(1\).*These "
                                           r"were the layers' last FREE neurons.*at most W tasks", message[0]), said
    assert "larger stop_threshold prunes further" in message[0] and "A task can keep fewer" not in message[0]


def test_a_task_without_forward_transfer_that_keeps_no_neuron_of_a_layer_is_said():
    torch.manual_seed(0)
    model = EideticNetwork(*mlp_body(width=6))
    x = torch.randn(8, 64)
    model.prepare_for_task(0, CLASSES)
    model.ensure_graph(x)
    for g in model.groups:
        g.prune([0, 1, 2])
    model.finish_task()
    model.prepare_for_task(1, CLASSES, forward_transfer=False)
    first, second = model.groups
    first.prune((first.task_state == FREE).nonzero().flatten())
    second.prune([3])
    with pytest.warns(trainer.CapacityWarning, match=r"task 1 kept no neuron of body\.1 and trained without forward "
                                                     r"transfer: the layers reading it get nothing of this task there, "
                                                     r"so unless a skip connection carries its features around, its "
                                                     r"outputs no longer depend on the input"):
        model.finish_task()
    model.eval()
    out = model(x, task=1)
    assert torch.equal(out, out[:1].expand_as(out))  # what it says


def test_a_drop_of_exactly_the_threshold_is_within_it_whatever_the_rounding(tasks, monkeypatch):
    """0.8 - 0.1 is 0.7000000000000001 in floats: a recovery to 0.7 is exactly the threshold below the best, as
    0.3 after 0.4 is, and both continue pruning; 0.69 does not."""
    assert trainer.within(0.7, 0.8, 0.1) and trainer.within(0.3, 0.4, 0.1) and trainer.within(0.8, 0.8, 0.0)
    assert not trainer.within(0.69, 0.8, 0.1) and not trainer.within(0.7999, 0.8, 0.0)
    for best, recovered, stop in ((0.8, 0.7, "nothing left to prune"), (0.8, 0.69, "accuracy dropped")):
        scripted_accuracy(monkeypatch, lambda phase, step, n: best if phase == "train" else recovered)
        model, optimizer = new_model(width=6)
        history = model.train_task(tasks[0][0], optimizer, pruning="l2", step=0.5, stop_threshold=0.1,
                                   max_epochs=1, recovery_epochs=1, progress=False)
        assert history[-1]["stop_reason"] == stop


def test_the_first_pruning_step_ranks_by_the_kept_epochs_taylor_scores(tasks, monkeypatch):
    """Training keeps epoch 2's weights (the best); the first Taylor step must rank by epoch 2's scores, which the
    later epochs' passes overwrote."""
    accuracies = [0.5, 0.9, 0.8, 0.8]
    real = trainer.run_epoch
    scores = []

    def fake(*args, **kwargs):
        loss, _ = real(*args, **kwargs)
        scores.append([layer.taylor_score.clone() for layer in args[6]])
        return loss, accuracies[len(scores) - 1] if len(scores) <= len(accuracies) else 0.0

    ranked = []
    real_step = trainer.pruning_mod.prune_step

    def spy(groups, *args, **kwargs):
        ranked.append([layer.taylor_score.clone() for g in groups for _, layer in g.members])
        return real_step(groups, *args, **kwargs)

    monkeypatch.setattr(trainer, "run_epoch", fake)
    monkeypatch.setattr(trainer.pruning_mod, "prune_step", spy)
    model, optimizer = new_model()
    model.train_task(tasks[0][0], optimizer, pruning="taylor", max_epochs=4, patience=2, recovery_epochs=1,
                     progress=False)
    assert len(scores) >= 4 and ranked
    assert all(torch.equal(a, b) for a, b in zip(ranked[0], scores[1]))
    assert not all(torch.equal(a, b) for a, b in zip(scores[1], scores[3]))


def test_a_short_batchs_taylor_term_counts_its_samples_only():
    """With the batch-mean loss a batch's term |mean_b a·dL/da| scales as 1/rows: a short batch is weighted by
    (rows / first batch's rows)², so an epoch of batches [8, 2] scores term(8) + (2/8)² term(2) (weights fixed:
    lr 0)."""
    torch.manual_seed(0)
    model = EideticNetwork(*mlp_body(width=6, dropout=0.0))  # run_epoch trains: no dropout, the same passes
    model.prepare_for_task(0, CLASSES)
    x, y = torch.randn(10, 8, 8), torch.randint(0, CLASSES, (10,))
    layers = [model.body[1], model.body[4]]
    for layer in layers:
        layer.enable_taylor(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)

    def epoch_scores(batches):
        trainer.run_epoch(model, batches, optimizer, "cpu", progress=False, taylor_layers=layers)
        return [layer.taylor_score.clone() for layer in layers]

    full, short, both = (epoch_scores([(x[:8], y[:8])]), epoch_scores([(x[8:], y[8:])]),
                         epoch_scores([(x[:8], y[:8]), (x[8:], y[8:])]))
    for f, s, b in zip(full, short, both):
        torch.testing.assert_close(b, f + (2 / 8) ** 2 * s)
        assert not torch.allclose(b, f + s)
    # an empty first batch (a filter that matched nothing) adds nothing and is no reference: the next batch is
    empty_first = epoch_scores([(x[:0], y[:0]), (x[:8], y[:8]), (x[8:], y[8:])])
    for e, f, s in zip(empty_first, full, short):
        torch.testing.assert_close(e, f + (2 / 8) ** 2 * s)


def test_a_call_stopped_by_an_exception_leaves_the_task_its_own_learning_rates(tasks):
    """prune_lr_factor scales the rates when pruning starts: an exception inside pruning (a loader failing) divides
    them back, so a retry with the same optimizer prunes at factor x the task's rate and finishes at the rate."""
    model, optimizer = new_model()
    lr = optimizer.param_groups[0]["lr"]
    batches = list(tasks[0][0])
    seen = []

    class Failing:
        def __len__(self):
            return len(batches)

        def __iter__(self):
            seen.append(1)
            if len(seen) == 3:  # the first recovery epoch: after the scaling
                raise OSError("disk error")
            return iter(batches)

    with pytest.raises(OSError, match="disk error"):
        model.train_task(Failing(), optimizer, pruning="l2", max_epochs=1, recovery_epochs=1, progress=False,
                         prune_lr_factor=0.5)
    assert optimizer.param_groups[0]["lr"] == lr
    rates = []
    model.train_task(batches, optimizer, pruning="l2", max_epochs=1, recovery_epochs=1, progress=False,
                     prune_lr_factor=0.5, max_prune_steps=1,
                     callback=lambda e: rates.append(optimizer.param_groups[0]["lr"]))
    assert 0.5 * lr in rates and optimizer.param_groups[0]["lr"] == lr


def test_the_finish_record_gives_the_kept_epochs_loss_when_the_last_epoch_ties_the_best(tasks, monkeypatch):
    """Epochs 2-4 tie the best accuracy; the last one's weights are kept, so its loss is the record's."""
    seen = scripted_accuracy(monkeypatch, lambda phase, step, n: [0.5, 1.0, 1.0, 1.0][n - 1])
    model, optimizer = new_model()
    history = model.train_task(tasks[0][0], optimizer, pruning=None, max_epochs=4, patience=5, progress=False)
    epochs = [r for r in history if r["phase"] == "train"]
    assert len(seen) == 4 and history[-1]["loss"] == epochs[-1]["loss"] != epochs[1]["loss"]
