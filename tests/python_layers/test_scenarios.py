"""Data loaders (python_layers.scenarios) on small files written here in the standard layouts.

Each test points $EIDETIC_DATA at a temporary folder and hides ../shared/data (monkeypatched), so the files read
are the ones written here; one test reads the real shared MNIST when it is present.
"""
import gzip
import io
import pickle
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from python_layers import scenarios as sc


@pytest.fixture
def data_dir(tmp_path, monkeypatch):
    root = tmp_path / "data"
    root.mkdir()
    monkeypatch.setenv("EIDETIC_DATA", str(root))
    monkeypatch.setenv("EIDETIC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sc, "_shared_data_candidates", lambda: [tmp_path / "no-shared-data"])
    return root


def _idx_bytes(array: np.ndarray, magic_dims: int) -> bytes:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(">" + "I" * array.ndim, *array.shape)
    assert array.ndim == magic_dims
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, n_train=40, n_test=20, gz=True, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        for kind, arr, dims in (("images-idx3-ubyte", images, 3), ("labels-idx1-ubyte", labels, 1)):
            blob = _idx_bytes(arr, dims)
            name = f"{prefix}-{kind}"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(blob))
            else:
                (folder / name).write_bytes(blob)
        out[prefix] = (images, labels)
    return out


def write_cifar_pickles(folder: Path, names_sizes, label_key: bytes, num_classes: int, seed=0):
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, n in names_sizes:
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        labels = [int(v) for v in np.arange(n) % num_classes]
        with open(folder / name, "wb") as f:
            pickle.dump({b"data": data, label_key: labels, b"batch_label": name.encode()}, f)
        out[name] = (data.reshape(n, 3, 32, 32), np.asarray(labels))
    return out


# ----- MNIST ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_files_load_exactly(data_dir, gz):
    written = write_mnist(data_dir / "mnist", gz=gz)
    x, y = sc.load_mnist("train")
    assert x.dtype == torch.uint8 and x.shape == (40, 1, 28, 28)
    assert torch.equal(x[:, 0], torch.from_numpy(written["train"][0]))
    assert torch.equal(y, torch.from_numpy(written["train"][1].astype(np.int64)))
    xt, _ = sc.load_mnist("test")
    assert xt.shape == (20, 1, 28, 28)


def test_mnist_files_directly_in_the_data_folder(data_dir):
    write_mnist(data_dir)  # no mnist/ subfolder
    assert sc.load_mnist("test")[0].shape == (20, 1, 28, 28)


def test_bad_idx_header_is_a_clear_error(data_dir):
    write_mnist(data_dir / "mnist")
    (data_dir / "mnist" / "t10k-labels-idx1-ubyte.gz").write_bytes(gzip.compress(b"\x01\x02\x03\x04abcd"))
    with pytest.raises(ValueError, match="not an idx file"):
        sc.load_mnist("test")


def test_split_mnist_tasks_and_normalisation(data_dir):
    written = write_mnist(data_dir / "mnist", n_train=50, n_test=30)
    s = sc.build_scenario("split_mnist", seed=0)
    assert s.num_tasks == 5 and s.input_shape == (1, 28, 28)
    images, labels = written["train"]
    for t, task in enumerate(s.tasks):
        assert task.num_classes == 2 and task.classes == (2 * t, 2 * t + 1)
        x, y = task.train.batch(torch.arange(len(task.train)))
        rows = np.nonzero((labels == 2 * t) | (labels == 2 * t + 1))[0]
        assert torch.equal(y, torch.from_numpy(labels[rows].astype(np.int64) - 2 * t))
        expected = (torch.from_numpy(images[rows]).float().unsqueeze(1) / 255 - 0.1307) / 0.3081
        torch.testing.assert_close(x, expected, rtol=1e-6, atol=1e-6)
    assert sc.build_scenario("split_mnist", num_tasks=3).num_tasks == 3
    # the files read are named, absolute (results.json's scenario.data_files); none for synthetic data
    folder = (data_dir / "mnist").resolve()
    assert sorted(s.notes["data_files"]) == sorted(str(folder / f) for f in (
        "train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz"))
    assert sc.build_scenario("synthetic").notes["data_files"] == []
    with pytest.raises(ValueError, match="at most 5 tasks"):
        sc.build_scenario("split_mnist", num_tasks=6)


def test_permuted_mnist_task0_unpermuted_and_fixed_permutations(data_dir):
    write_mnist(data_dir / "mnist")
    s = sc.build_scenario("permuted_mnist", num_tasks=3, seed=5)
    assert s.notes["task 0"] == "unpermuted"
    rows = torch.arange(7)
    x0, y0 = s.tasks[0].test.batch(rows)
    x1, y1 = s.tasks[1].test.batch(rows)
    x2, _ = s.tasks[2].test.batch(rows)
    assert torch.equal(y0, y1)
    expected_perm = torch.randperm(784, generator=torch.Generator().manual_seed(5 * 1000 + 1))
    assert torch.equal(x1.reshape(7, -1), x0.reshape(7, -1)[:, expected_perm])
    assert not torch.equal(x1, x2) and not torch.equal(x0, x1)
    # the same seed gives the same tasks; another seed other permutations
    again = sc.build_scenario("permuted_mnist", num_tasks=3, seed=5)
    assert torch.equal(again.tasks[2].test.batch(rows)[0], x2)
    other = sc.build_scenario("permuted_mnist", num_tasks=3, seed=6)
    assert not torch.equal(other.tasks[2].test.batch(rows)[0], x2)
    all_permuted = sc.build_scenario("permuted_mnist", num_tasks=2, seed=5, unpermuted_first=False)
    assert not torch.equal(all_permuted.tasks[0].test.batch(rows)[0], x0)
    # no task count: the paper's 10 (not one task per possible id)
    assert sc.build_scenario("permuted_mnist", None, seed=5).num_tasks == 10


def test_missing_file_error_names_both_places(data_dir):
    with pytest.raises(sc.DataNotFoundError) as info:
        sc.load_mnist("train")
    msg = str(info.value)
    assert "train-images-idx3-ubyte" in msg
    assert str(data_dir) in msg and "EIDETIC_DATA" in msg
    assert "../shared/data" in msg and "no-shared-data" in msg
    assert "never downloads" in msg


def test_missing_env_says_not_set(tmp_path, monkeypatch):
    monkeypatch.delenv("EIDETIC_DATA", raising=False)
    monkeypatch.setattr(sc, "_shared_data_candidates", lambda: [tmp_path / "nothing"])
    with pytest.raises(sc.DataNotFoundError, match=r"\$EIDETIC_DATA \(not set\).*\.\./shared/data"):
        sc.load_cifar100("train")


def test_a_data_root_that_is_not_a_folder_is_an_error(data_dir, tmp_path):
    """A mistyped data_root never falls back to $EIDETIC_DATA's data silently."""
    with pytest.raises(sc.DataNotFoundError, match=r"data_root=.*typo is not a folder"):
        sc.load_mnist("train", tmp_path / "typo")


def test_an_eidetic_data_that_is_not_a_folder_is_an_error(data_dir, tmp_path, monkeypatch):
    """A mistyped $EIDETIC_DATA never falls back to ../shared/data silently."""
    monkeypatch.setenv("EIDETIC_DATA", str(tmp_path / "typo"))
    with pytest.raises(sc.DataNotFoundError, match=r"\$EIDETIC_DATA=.*typo is not a folder.*unset it"):
        sc.load_mnist("train")
    # a data_root is searched first: the variable is then only a fallback, and a stale one does not block it
    assert sc.data_roots(data_dir)[0] == data_dir


def test_shared_data_found_from_package_location(monkeypatch, tmp_path):
    monkeypatch.delenv("EIDETIC_DATA", raising=False)
    monkeypatch.chdir(tmp_path)  # the cwd does not matter: the package location finds ../shared/data
    expected = (Path(sc.__file__).resolve().parent.parent / ".." / "shared" / "data").resolve()
    assert expected in sc.data_roots()


# ----- CIFAR ------------------------------------------------------------------------------------------------------
def test_cifar10_pickles(data_dir):
    names = [(f"data_batch_{i}", 6) for i in range(1, 6)] + [("test_batch", 12)]
    written = write_cifar_pickles(data_dir / "cifar10" / "cifar-10-batches-py", names, b"labels", 10)
    x, y, source = sc.load_cifar10("train")
    assert source == "CIFAR-10" and x.shape == (30, 3, 32, 32)
    assert torch.equal(x[6:12], torch.from_numpy(written["data_batch_2"][0]))
    assert torch.equal(y[:6], torch.from_numpy(written["data_batch_1"][1]))
    s = sc.build_scenario("split_cifar10")
    assert s.num_tasks == 5 and s.source == "CIFAR-10"
    xt, yt = s.tasks[4].test.batch(torch.arange(len(s.tasks[4].test)))
    assert set(yt.tolist()) <= {0, 1} and xt.shape[1:] == (3, 32, 32)
    # per-channel normalisation with the CIFAR-10 constants
    raw = torch.from_numpy(written["test_batch"][0])[written["test_batch"][1] >= 8][0].float() / 255
    mean = torch.tensor(sc.CIFAR10_MEAN).view(3, 1, 1)
    std = torch.tensor(sc.CIFAR10_STD).view(3, 1, 1)
    torch.testing.assert_close(xt[0], (raw - mean) / std)


def _write_jpeg_tar(path: Path, per_class=(2, 1)):
    from PIL import Image
    colors = {}
    with tarfile.open(path, "w:xz") as tar:
        for split, n in zip(("train", "test"), per_class):
            for c, cls in enumerate(sc.CIFAR10_CLASSES):
                for k in range(n):
                    color = (20 * c + 5, 255 - 20 * c, 40 + 10 * k)
                    colors[(split, cls, k)] = color
                    buf = io.BytesIO()
                    Image.new("RGB", (32, 32), color).save(buf, format="JPEG", quality=95)
                    info = tarfile.TarInfo(f"cifar10/{split}/{cls}/{k:04d}.jpg")
                    info.size = len(buf.getvalue())
                    tar.addfile(info, io.BytesIO(buf.getvalue()))
    return colors


def test_cifar10_jpeg_tar_is_decoded_once_and_cached(data_dir, tmp_path, monkeypatch):
    (data_dir / "cifar10").mkdir()
    colors = _write_jpeg_tar(data_dir / "cifar10" / "cifar10_yoongikim_jpg.tar.xz")
    x, y, source = sc.load_cifar10("train")
    assert source == "CIFAR-10 (JPEG copy)"
    assert x.shape == (20, 3, 32, 32) and x.dtype == torch.uint8
    # sorted by class folder (alphabetical = CIFAR-10 label order), then file name
    assert y.tolist() == [c for c in range(10) for _ in range(2)]
    for i, (c, k) in enumerate((c, k) for c in range(10) for k in range(2)):
        color = torch.tensor(colors[("train", sc.CIFAR10_CLASSES[c], k)]).view(3, 1, 1).float()
        assert (x[i].float() - color).abs().max() <= 4  # JPEG of a flat colour: within a few levels
    assert len(list((tmp_path / "cache").rglob("*.npy"))) == 4

    def no_decoding(*_):
        raise AssertionError("the cache should have been used")
    decode = sc._decode_cifar10_jpeg_tar
    monkeypatch.setattr(sc, "_decode_cifar10_jpeg_tar", no_decoding)
    x2, y2, _ = sc.load_cifar10("train")
    assert torch.equal(x, x2) and torch.equal(y, y2)
    xt, yt, _ = sc.load_cifar10("test")
    assert xt.shape == (10, 3, 32, 32) and yt.tolist() == list(range(10))
    # a cache file emptied or cut short is decoded again, with a warning (was EOFError / a numpy error)
    monkeypatch.setattr(sc, "_decode_cifar10_jpeg_tar", decode)
    # and one changed in place, same size (a flipped byte in the pixels): the SHA-1 beside it tells
    flip = lambda b: b[:-7] + bytes([b[-7] ^ 0xFF]) + b[-6:]  # noqa: E731
    for damage in (lambda b: b"", lambda b: b[: len(b) // 2], flip):
        cached = next((tmp_path / "cache").rglob("train_x.npy"))
        cached.write_bytes(damage(cached.read_bytes()))
        with pytest.warns(UserWarning, match="cache .* cannot be read .*decoding cifar10_yoongikim_jpg.tar.xz again"):
            x3, y3, _ = sc.load_cifar10("train")
        assert torch.equal(x3, x) and torch.equal(y3, y)


def test_cifar10_missing_names_pickles_and_jpeg(data_dir):
    with pytest.raises(sc.DataNotFoundError, match="cifar-10-batches-py.*JPEG copy"):
        sc.load_cifar10("train")


def test_cifar100_pickles_and_split(data_dir):
    written = write_cifar_pickles(data_dir / "cifar-100-python", [("train", 200), ("test", 100)], b"fine_labels",
                                  100)
    x, y = sc.load_cifar100("test")
    assert torch.equal(x, torch.from_numpy(written["test"][0])) and torch.equal(y, torch.from_numpy(written["test"][1]))
    s = sc.build_scenario("split_cifar100")
    assert s.num_tasks == 10 and all(t.num_classes == 10 for t in s.tasks)
    assert s.tasks[3].classes == tuple(range(30, 40))
    _, y3 = s.tasks[3].train.batch(torch.arange(len(s.tasks[3].train)))
    assert len(y3) == 20 and sorted(set(y3.tolist())) == list(range(10))
    s20 = sc.build_scenario("split_cifar100", classes_per_task=5)
    assert s20.num_tasks == 20
    with pytest.raises(ValueError, match="divide 100"):
        sc.build_scenario("split_cifar100", classes_per_task=7)


@pytest.mark.parametrize("name, value, bound", [("split_mnist", 11, "between 2 and 10"), ("split_cifar10", 1, "between 2"),
                                                ("split_cifar100", 101, "between 2 and 100"),
                                                ("synthetic", 0, ">= 2, got 0")])
def test_classes_per_task_out_of_range_is_refused_before_any_data_loads(tmp_path, name, value, bound):
    # an empty data root: the check comes first, so no data-not-found error
    with pytest.raises(ValueError, match=f"classes_per_task for scenario {name} must be an int {bound}"):
        sc.build_scenario(name, classes_per_task=value, data_root=tmp_path)


@pytest.mark.parametrize("name, value", [("split_mnist", 3), ("split_cifar10", 4)])
def test_classes_per_task_that_leaves_classes_out_is_refused(tmp_path, name, value):
    """3 classes per task of 10 would leave class 9 in no task, silently: refused, naming the classes."""
    with pytest.raises(ValueError, match=rf"must divide 10 for scenario {name}, got {value}.*no task would hold"):
        sc.build_scenario(name, classes_per_task=value, data_root=tmp_path)


# ----- loader -----------------------------------------------------------------------------------------------------
def _epochs(loader, n):
    return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(n)]


def test_loader_is_deterministic_covers_every_sample_and_resumes():
    s = sc.build_scenario("synthetic", num_tasks=1, seed=3)
    data = s.tasks[0].train
    a = _epochs(sc.InMemoryLoader(data, 50, seed=11), 2)
    b = _epochs(sc.InMemoryLoader(data, 50, seed=11), 2)
    c = _epochs(sc.InMemoryLoader(data, 50, seed=12), 1)
    assert all(torch.equal(xa, xb) and torch.equal(ya, yb) for ea, eb in zip(a, b) for (xa, ya), (xb, yb) in
               zip(ea, eb))
    assert not torch.equal(a[0][0][0], c[0][0][0])
    assert not torch.equal(a[0][0][0], a[1][0][0])  # reshuffled each epoch
    # every sample exactly once per epoch
    full_x, _ = data.batch(torch.arange(len(data)))
    seen = torch.cat([x for x, _ in a[0]])
    assert seen.shape == full_x.shape
    assert torch.equal(seen.reshape(len(data), -1).sort(0).values, full_x.reshape(len(data), -1).sort(0).values)
    assert len(sc.InMemoryLoader(data, 50)) == -(-len(data) // 50)
    assert len(sc.InMemoryLoader(data, 50, drop_last=True)) == len(data) // 50
    # saving the generator state after one epoch reproduces the second
    loader = sc.InMemoryLoader(data, 50, seed=11)
    list(loader)
    saved = loader.state_dict()
    fresh = sc.InMemoryLoader(data, 50, seed=999)
    fresh.load_state_dict(saved)
    assert all(torch.equal(x, xa) for (x, _), (xa, _) in zip(fresh, a[1]))


@pytest.mark.parametrize("augment", [False, True], ids=["plain", "augment"])
@pytest.mark.parametrize("batch_size, world", [(10, 3), (50, 4), (4, 3), (7, 2)])
def test_shards_partition_every_batch(batch_size, world, augment):
    """The processes' shares of a global batch are the batch itself (shares differing by at most one row),
    in every epoch, augmented alike (the crops are drawn for the global batch, so the processes' generators
    stay in step); only a batch of fewer than 2 * world rows is padded, to two rows per process."""
    data = sc.build_scenario("synthetic", num_tasks=1, seed=3).tasks[0].train.subset(103, seed=0)
    one = sc.InMemoryLoader(data, batch_size, seed=4, augment=augment)
    many = [sc.InMemoryLoader(data, batch_size, seed=4, augment=augment).shard(r, world) for r in range(world)]
    whole, shares = [], [[] for _ in range(world)]
    for _ in range(3):  # epochs
        whole += [x.reshape(x.shape[0], -1) for x, _ in one]
        for r in range(world):
            shares[r] += [x.reshape(x.shape[0], -1) for x, _ in many[r]]
    assert all(len(s) == len(whole) for s in shares)
    # the processes' generators stay in step (each draws every crop of the global batch)
    assert all(torch.equal(m.generator.get_state(), many[0].generator.get_state()) for m in many)
    # a padded batch draws crops for its padded rows too: after one, one process's crops differ from theirs
    padded = any(b.shape[0] < 2 * world for b in whole)
    for i, batch in enumerate(whole):
        parts = [s[i] for s in shares]
        sizes = [p.shape[0] for p in parts]
        rows = torch.cat(parts)
        if batch.shape[0] >= 2 * world:
            assert max(sizes) - min(sizes) <= 1
            if not (augment and padded):
                assert torch.equal(rows.sort(0).values, batch.sort(0).values)
        else:
            assert sizes == [2] * world
            if not augment:
                assert torch.equal(rows.unique(dim=0), batch.unique(dim=0))


def test_loader_task_label_and_augment():
    s = sc.build_scenario("synthetic", num_tasks=1, seed=0)
    xs, ys = next(iter(sc.InMemoryLoader(s.tasks[0].train, 16, task_label=4)))
    assert ys.tolist() == [4] * 16
    aug1 = next(iter(sc.InMemoryLoader(s.tasks[0].train, 16, seed=1, augment=True)))[0]
    aug2 = next(iter(sc.InMemoryLoader(s.tasks[0].train, 16, seed=1, augment=True)))[0]
    assert torch.equal(aug1, aug2) and aug1.shape == xs.shape


def test_subsets_are_fixed_by_the_seed():
    s1 = sc.build_scenario("synthetic", num_tasks=2, seed=1, train_samples_per_task=30)
    s2 = sc.build_scenario("synthetic", num_tasks=2, seed=1, train_samples_per_task=30)
    assert len(s1.tasks[1].train) == 30
    assert torch.equal(s1.tasks[1].train.indices, s2.tasks[1].train.indices)


def test_unknown_scenario():
    with pytest.raises(ValueError, match="unknown scenario"):
        sc.build_scenario("imagenet")


@pytest.mark.skipif(not all((p / "mnist" / "t10k-images-idx3-ubyte.gz").is_file()
                            for p in sc._shared_data_candidates()[:1]), reason="shared MNIST not present")
def test_real_shared_mnist(monkeypatch):
    monkeypatch.delenv("EIDETIC_DATA", raising=False)
    x, y = sc.load_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and torch.bincount(y).tolist()[0] == 980


def test_on_epoch_end_runs_after_the_last_batch_of_full_passes_only():
    s = sc.build_scenario("synthetic", num_tasks=1, seed=0)
    events = []
    loader = sc.InMemoryLoader(s.tasks[0].train, 64, seed=0, on_epoch_end=lambda n: events.append(("end", n)))
    next(iter(loader))  # an abandoned pass does not count
    for _ in range(2):
        for _batch in loader:
            events.append("batch")
    per_epoch = len(loader)
    assert events == (["batch"] * per_epoch + [("end", 1)]) + (["batch"] * per_epoch + [("end", 2)])
    assert loader.state_dict()["epochs_completed"] == 2


def _write_imagenette(root, per_class=2):
    """A tiny imagenette2-160 tree: 10 wnid folders per split, flat-colour JPEGs of odd sizes."""
    from PIL import Image
    colors = {}
    for split, n in (("train", per_class), ("val", 1)):
        for c in range(10):
            folder = root / "imagenette2-160" / split / f"n0{c:07d}"
            folder.mkdir(parents=True)
            for k in range(n):
                color = (20 * c + 5, 200 - 15 * c, 30 + 7 * k)
                Image.new("RGB", (90 + 10 * k, 70), color).save(folder / f"img{k}.JPEG", quality=95)
                colors[(split, c, k)] = color
    return colors


def test_imagenette_class_folders_decoded_resized_and_cached(data_dir, tmp_path, monkeypatch):
    (data_dir / "imagenette").mkdir()
    colors = _write_imagenette(data_dir / "imagenette")
    x, y = sc.load_imagenette("train")
    size = sc.IMAGENETTE_SIZE
    assert x.shape == (20, 3, size, size) and x.dtype == torch.uint8
    assert y.tolist() == [c for c in range(10) for _ in range(2)]  # wnid folders sorted = labels
    for i, (c, k) in enumerate((c, k) for c in range(10) for k in range(2)):
        color = torch.tensor(colors[("train", c, k)]).view(3, 1, 1).float()
        assert (x[i].float() - color).abs().max() <= 6
    scenario = sc.build_scenario("split_imagenette", 5)
    assert scenario.input_shape == (3, size, size) and scenario.num_tasks == 5
    assert len(scenario.tasks[0].test) == 2  # val: one image per class, two classes per task
    decode = sc._decode_image_folder
    monkeypatch.setattr(sc, "_decode_image_folder", lambda *_: (_ for _ in ()).throw(AssertionError("cached")))
    x2, _ = sc.load_imagenette("train")
    assert torch.equal(x, x2)
    # a cache file changed in place (same size) or cut short is decoded again, once, with a warning
    monkeypatch.setattr(sc, "_decode_image_folder", decode)
    flip = lambda b: b[:-7] + bytes([b[-7] ^ 0xFF]) + b[-6:]  # noqa: E731
    for damage in (flip, lambda b: b[: len(b) // 2]):
        for cached in (tmp_path / "cache").rglob("x.npy"):  # train's and val's caches
            cached.write_bytes(damage(cached.read_bytes()))
        with pytest.warns(UserWarning, match="decoded cache .*imagenette_.* cannot be read .*decoding .*train again"):
            x3, y3 = sc.load_imagenette("train")
        assert torch.equal(x3, x) and y3.tolist() == y.tolist()


def test_imagenette_missing_names_the_folders(data_dir):
    with pytest.raises(sc.DataNotFoundError, match="imagenette2-160 or imagenette2-320"):
        sc.load_imagenette("train")
