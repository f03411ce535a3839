"""Continual-learning scenarios from files: Permuted MNIST, Split MNIST, Split CIFAR-10, Split CIFAR-100.

Where the files come from
    ``$EIDETIC_DATA`` first, then ``../shared/data`` relative to the project root (found from this package's
    location, and from the current directory). In each of those folders a dataset may sit in its own subfolder
    (``mnist/``, ``cifar10/``, ``cifar100/``) or directly in the folder. Nothing is ever downloaded: a missing
    file is a ``DataNotFoundError`` that names every place it looked.

Layouts read (the standard ones)
    MNIST        ``train-images-idx3-ubyte(.gz)``, ``train-labels-idx1-ubyte(.gz)``, ``t10k-...`` (idx format).
    CIFAR-10     ``cifar-10-batches-py/{data_batch_1..5,test_batch}`` pickles when present (the canonical copy);
                 else ``cifar10_yoongikim_jpg.tar.xz`` (``train|test/<class>/NNNN.jpg``, class folders in
                 alphabetical order = CIFAR-10 label order), decoded once with Pillow and cached as ``.npy`` under
                 the cache folder (``$EIDETIC_CACHE``, else ``$XDG_CACHE_HOME/eidetic``, else
                 ``~/.cache/eidetic``). Results on it are "CIFAR-10 (JPEG copy)".
    CIFAR-100    ``cifar-100-python/{train,test}`` pickles (fine labels).
    The CIFAR pickles are read with Python's ``pickle``, which can run code hidden in a file: use copies from a
    trusted source (the datasets' own site, or a copy you made from it).

Tasks
    Permuted MNIST: task 0 is the UNPERMUTED MNIST (``unpermuted_first=True``, the common convention); task t >= 1
    permutes the 784 pixels with ``torch.randperm(784, generator=manual_seed(seed * 1000 + t))``: fixed by the run
    seed, the same on every machine. 10 classes per task.
    Split MNIST / Split CIFAR-10: task t holds classes (2t, 2t+1), relabelled 0, 1 (5 tasks). Split CIFAR-100: task
    t holds classes [c*t, c*(t+1)) relabelled 0..c-1 (``classes_per_task`` c, default 10: 10 tasks).
    ``synthetic``: small Gaussian clusters made from the seed (1x8x8 "images"), for tests.

Data stay in memory as uint8 (one copy per dataset, shared by all tasks); a batch is gathered, permuted and
normalised on the fly with the standard per-channel mean/std, so T permuted tasks cost no extra memory.
``InMemoryLoader`` yields ``(x, y)`` batches, shuffled by its own ``torch.Generator`` seeded from the run seed:
deterministic, and its state can be saved and restored (checkpoints).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import struct
import tarfile
import warnings
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from eidetic_kernels.cpp import cache_root

__all__ = ["DataNotFoundError", "ImageSet", "TaskData", "Scenario", "InMemoryLoader", "build_scenario",
           "data_roots", "find_data_file", "load_mnist", "load_cifar10", "load_cifar100", "load_imagenette", "SCENARIOS",
           "MNIST_MEAN", "MNIST_STD", "CIFAR10_MEAN", "CIFAR10_STD", "CIFAR100_MEAN", "CIFAR100_STD"]

DATA_ENV = "EIDETIC_DATA"

# Standard normalisation constants (training-set statistics, as torchvision examples use them).
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMAGENETTE_FOLDERS = ("imagenette2-160", "imagenette2-320", "imagenette2", "imagenette")
IMAGENETTE_SIZE = 64  # pixels per side after resizing (shorter side) and centre cropping

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


class DataNotFoundError(FileNotFoundError):
    """A dataset file is in none of the data folders."""


# the files find_data_file returned while build_scenario runs: results name the data actually read
_FILES_READ: ContextVar[list | None] = ContextVar("eidetic_data_files_read", default=None)


# ----------------------------------------------------------------------------------------------------------------
# Finding files
# ----------------------------------------------------------------------------------------------------------------
def _project_root() -> Path:
    return Path(__file__).resolve().parent.parent


def _shared_data_candidates() -> list[Path]:
    """``../shared/data`` from the project root (package location) and from the current directory."""
    seen, out = set(), []
    for base in (_project_root(), Path.cwd(), Path.cwd().parent):
        p = (base / ".." / "shared" / "data").resolve()
        if p not in seen:
            seen.add(p)
            out.append(p)
    return out


def data_roots(data_root: str | os.PathLike | None = None) -> list[Path]:
    """Folders searched, in order: ``data_root`` if given, ``$EIDETIC_DATA`` if set, then ``../shared/data``.

    Raises DataNotFoundError when ``data_root`` is given but is not a folder, or, without a ``data_root``,
    when ``$EIDETIC_DATA`` is set but is not one: a mistyped path must not fall back to other data silently."""
    roots = []
    if data_root:
        root = Path(data_root).expanduser()
        if not root.is_dir():
            raise DataNotFoundError(f"data_root={root} is not a folder; give the folder that holds the data sets "
                                    f"(or leave data_root unset to search ${DATA_ENV}, then ../shared/data)")
        roots.append(root)
    env = os.environ.get(DATA_ENV)
    if env:
        root = Path(env).expanduser()
        if not root.is_dir() and not roots:  # with a data_root, the variable is only a fallback
            raise DataNotFoundError(f"${DATA_ENV}={root} is not a folder; point it at the folder that holds the "
                                    "data sets, or unset it to search ../shared/data")
        if root.is_dir():
            roots.append(root)
    roots.extend(_shared_data_candidates())
    return roots


def _where_we_looked(data_root=None) -> str:
    env = os.environ.get(DATA_ENV)
    parts = []
    if data_root:
        parts.append(f"data_root={Path(data_root).expanduser()}")
    parts.append(f"${DATA_ENV}={Path(env).expanduser()}" if env else f"${DATA_ENV} (not set)")
    parts.append("../shared/data (" + ", ".join(str(p) for p in _shared_data_candidates()) + ")")
    return "; ".join(parts)


def find_data_file(names, subdirs, what: str, data_root=None, is_dir: bool = False) -> Path:
    """First existing ``root/subdir/name`` or ``root/name`` over the data roots; else a clear error.

    ``names`` are alternatives (e.g. with and without ``.gz``), tried in order within each root.
    """
    names = [names] if isinstance(names, str) else list(names)
    for root in data_roots(data_root):
        for sub in list(subdirs) + [""]:
            for name in names:
                p = root / sub / name if sub else root / name
                if (p.is_dir() if is_dir else p.is_file()):
                    read = _FILES_READ.get()
                    if read is not None and str(p.resolve()) not in read:
                        read.append(str(p.resolve()))
                    return p
    raise DataNotFoundError(
        f"{what}: {' or '.join(names)} not found. Looked in {_where_we_looked(data_root)}, each directly and in "
        f"the subfolder(s) {', '.join(subdirs)}/. Put the file there, or set {DATA_ENV} to the folder that holds "
        f"it (see ../shared/data/README.md). eidetic never downloads data.")


def _cache_dir() -> Path:
    return cache_root()  # the one cache folder of eidetic: $EIDETIC_CACHE, else the XDG cache


# ----------------------------------------------------------------------------------------------------------------
# Raw readers: each returns uint8 images [N, C, H, W] and int64 labels [N] as torch tensors
# ----------------------------------------------------------------------------------------------------------------
def _open_maybe_gzip(path: Path):
    with open(path, "rb") as f:
        magic = f.read(2)
    return gzip.open(path, "rb") if magic == b"\x1f\x8b" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (big-endian: 0, 0, dtype code 0x08 = uint8, ndim; then dims; then data), gzipped or not."""
    with _open_maybe_gzip(path) as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path} is not an idx file (bad magic number)")
    if data[2] != 0x08:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not uint8 (0x08)")
    ndim = data[3]
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims} = {int(np.prod(dims))} values, file holds {body.size}")
    return body.reshape(dims)


def load_mnist(split: str, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """MNIST ``split`` ("train" | "test") as (uint8 [N, 1, 28, 28], int64 [N])."""
    prefix = {"train": "train", "test": "t10k"}[split]
    files = []
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte"):
        name = f"{prefix}-{kind}"
        files.append(find_data_file([name + ".gz", name], ["mnist", "MNIST/raw", "MNIST"], f"MNIST {split}",
                                    data_root))
    images, labels = read_idx(files[0]), read_idx(files[1])
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"MNIST {split}: images {images.shape} and labels {labels.shape} do not match")
    x = torch.from_numpy(images.copy()).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def _unpickle(path: Path) -> dict:
    # The standard CIFAR pickles hold only numpy arrays, lists and bytes (python 2 pickles: encoding bytes).
    with open(path, "rb") as f:
        return pickle.load(f, encoding="bytes")


def _pickled_images(batch: dict, path: Path, label_key: bytes) -> tuple[np.ndarray, np.ndarray]:
    data = np.asarray(batch[b"data"], dtype=np.uint8)
    labels = np.asarray(batch[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar10_pickles(folder: Path, split: str):
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        path = folder / name
        if not path.is_file():
            raise DataNotFoundError(f"CIFAR-10 {split}: {path} is missing from {folder} (the standard "
                                    "cifar-10-batches-py folder holds data_batch_1..5 and test_batch)")
        x, y = _pickled_images(_unpickle(path), path, b"labels")
        xs.append(x)
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def _decode_cifar10_jpeg_tar(tar_path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every ``train|test/<class>/<file>.jpg`` in the tarball (sorted, so the order is fixed)."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dev dependency
        raise ImportError("decoding the CIFAR-10 JPEG copy needs Pillow: pip install pillow") from exc
    found: dict[str, list[tuple[str, str, bytes]]] = {"train": [], "test": []}
    with tarfile.open(tar_path, "r:*") as tar:
        for member in tar:
            if not member.isfile() or not member.name.lower().endswith((".jpg", ".jpeg", ".png")):
                continue
            parts = Path(member.name).parts
            i = len(parts) - 3  # .../<split>/<class>/<file>
            if i < 0 or parts[i] not in ("train", "test"):
                continue
            split, cls = parts[i], parts[i + 1]
            found[split].append((cls, parts[-1], tar.extractfile(member).read()))
    out = {}
    for split, items in found.items():
        if not items:
            raise ValueError(f"{tar_path}: no {split}/<class>/*.jpg images inside; expected the layout "
                             "train/<class>/NNNN.jpg and test/<class>/NNNN.jpg")
        classes = sorted({c for c, _, _ in items})
        if len(classes) != 10:
            raise ValueError(f"{tar_path}: {split} has {len(classes)} class folders, CIFAR-10 needs 10: {classes}")
        items.sort(key=lambda it: (it[0], it[1]))
        x = np.empty((len(items), 3, 32, 32), dtype=np.uint8)
        y = np.empty(len(items), dtype=np.int64)
        for k, (cls, _, blob) in enumerate(items):
            img = np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), dtype=np.uint8)
            if img.shape != (32, 32, 3):
                raise ValueError(f"{tar_path}: {split}/{cls} holds an image of shape {img.shape}, not 32x32 RGB")
            x[k] = img.transpose(2, 0, 1)
            y[k] = classes.index(cls)
        out[split] = (x, y)
    return out


def _sha1(path: Path) -> str:
    """The SHA-1 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for piece in iter(lambda: f.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()


def _save_cached(arr: np.ndarray, path: Path) -> None:
    """``arr`` as ``path`` (.npy), atomically (a concurrent reader never sees half a file), with the SHA-1 of its
    bytes beside it (``path.sha1``), which ``_load_cached`` checks."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}.npy")
    np.save(tmp, arr)
    side = path.with_name(path.name + ".sha1")
    side_tmp = side.with_name(side.name + f".tmp{os.getpid()}")
    side_tmp.write_text(_sha1(tmp))
    os.replace(tmp, path)
    os.replace(side_tmp, side)


def _load_cached(path: Path) -> np.ndarray:
    """A cached array; ValueError when its bytes differ from the SHA-1 written beside it (a file changed in place
    keeps its size: without the check its images would be read as they are). A cache written without the SHA-1
    gets it now."""
    digest = _sha1(path)
    side = path.with_name(path.name + ".sha1")
    try:
        want = side.read_text().strip()
    except OSError:
        want = None
    if want is not None and want != digest:
        raise ValueError(f"{path.name} changed since it was decoded (its SHA-1 is not the one in {side.name})")
    arr = np.load(path)
    if want is None:
        try:
            side.write_text(digest)
        except OSError:  # a read-only cache: checked from the next writable run on
            pass
    return arr


def _cached_arrays(cache: Path, wanted: list[Path], decode, source: str, retry: bool = True) -> list[np.ndarray]:
    """The arrays ``wanted`` from the cache folder ``cache``, decoded first (``decode()``: {path: array} of every
    file the cache holds) when a file is missing. A cache file that cannot be read (emptied, cut short) or whose
    bytes changed since it was written (its SHA-1, kept beside it) is decoded again, once, with a warning."""
    names = sorted(cache.glob("*.npy")) if cache.is_dir() else []
    if not all(p.is_file() for p in wanted):
        cache.mkdir(parents=True, exist_ok=True)
        for path, arr in decode().items():
            _save_cached(arr, path)
    try:
        return [_load_cached(p) for p in wanted]
    except (ValueError, EOFError, OSError) as exc:
        if not retry:
            raise ValueError(f"the decoded cache {cache} cannot be read ({exc}) even after decoding {source} "
                             f"again: delete the folder, or set $EIDETIC_CACHE to another one") from exc
        warnings.warn(f"the decoded cache {cache} cannot be read ({exc}); decoding {source} again", stacklevel=3)
        for p in set(names) | set(wanted):
            p.unlink(missing_ok=True)
            p.with_name(p.name + ".sha1").unlink(missing_ok=True)
        return _cached_arrays(cache, wanted, decode, source, retry=False)


def _cached_jpeg_cifar10(tar_path: Path, split: str):
    """The tarball decoded once; ``.npy`` arrays cached under the cache folder, keyed by the tarball's size+name
    (``_cached_arrays``: a damaged cache is decoded again, once, with a warning)."""
    st = tar_path.stat()
    key = hashlib.sha1(f"{tar_path.name}:{st.st_size}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"cifar10_jpeg_{key}"
    paths = {s: (cache / f"{s}_x.npy", cache / f"{s}_y.npy") for s in ("train", "test")}

    def decode():
        decoded = _decode_cifar10_jpeg_tar(tar_path)
        return {p: arr for s, pair in decoded.items() for p, arr in zip(paths[s], pair)}

    x, y = _cached_arrays(cache, list(paths[split]), decode, tar_path.name)
    return torch.from_numpy(x), torch.from_numpy(y)


def load_cifar10(split: str, data_root=None) -> tuple[torch.Tensor, torch.Tensor, str]:
    """CIFAR-10 ``split`` as (uint8 [N, 3, 32, 32], int64 [N], source description).

    The standard pickles win when present; else the JPEG tarball (decoded once, cached). The pickles are read
    with ``pickle.load``, which runs any code a crafted file carries: they must come from a trusted source.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        folder = find_data_file("cifar-10-batches-py", ["cifar10", "cifar-10"], "CIFAR-10", data_root, is_dir=True)
        x, y = _load_cifar10_pickles(folder, split)
        return x, y, "CIFAR-10"
    except DataNotFoundError as pickles_missing:
        try:
            tar_path = find_data_file("cifar10_yoongikim_jpg.tar.xz", ["cifar10", "cifar-10"], "CIFAR-10",
                                      data_root)
        except DataNotFoundError:
            raise DataNotFoundError(f"{pickles_missing} Nor is the JPEG copy cifar10_yoongikim_jpg.tar.xz there."
                                    ) from None
        x, y = _cached_jpeg_cifar10(tar_path, split)
        return x, y, "CIFAR-10 (JPEG copy)"


def load_cifar100(split: str, data_root=None) -> tuple[torch.Tensor, torch.Tensor]:
    """CIFAR-100 ``split`` from the standard ``cifar-100-python`` pickles: (uint8 [N,3,32,32], fine labels [N]).

    The pickles are read with ``pickle.load``, which runs any code a crafted file carries: they must come from a
    trusted source.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    folder = find_data_file("cifar-100-python", ["cifar100", "cifar-100"], "CIFAR-100", data_root, is_dir=True)
    path = folder / split
    if not path.is_file():
        raise DataNotFoundError(f"CIFAR-100 {split}: {path} is missing (the standard cifar-100-python folder holds "
                                "the pickles 'train' and 'test')")
    x, y = _pickled_images(_unpickle(path), path, b"fine_labels")
    return torch.from_numpy(x), torch.from_numpy(y)


def _decode_image_folder(folder: Path, size: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Every ``<class>/<file>`` image under ``folder`` (class folders sorted: label = position), resized so the
    shorter side is ``size`` and centre-cropped to ``size`` x ``size``: (uint8 [N, 3, size, size], int64 [N])."""
    try:
        from PIL import Image
    except ImportError as exc:  # pragma: no cover - pillow is a dev dependency
        raise ImportError("decoding Imagenette needs Pillow: pip install pillow") from exc
    classes = sorted(p.name for p in folder.iterdir() if p.is_dir())
    files = [(c, f) for c in classes for f in sorted((folder / c).iterdir())
             if f.suffix.lower() in (".jpeg", ".jpg", ".png")]
    if not files:
        raise DataNotFoundError(f"{folder}: no <class>/*.JPEG images inside (the Imagenette layout is "
                                "train/<wnid>/*.JPEG and val/<wnid>/*.JPEG)")
    x = np.empty((len(files), 3, size, size), dtype=np.uint8)
    y = np.empty(len(files), dtype=np.int64)
    for k, (c, f) in enumerate(files):
        img = Image.open(f).convert("RGB")
        w, h = img.size
        scale = size / min(w, h)
        img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
        w, h = img.size
        left, top = (w - size) // 2, (h - size) // 2
        x[k] = np.asarray(img.crop((left, top, left + size, top + size)), dtype=np.uint8).transpose(2, 0, 1)
        y[k] = classes.index(c)
    return x, y, classes


def load_imagenette(split: str, data_root=None, size: int = IMAGENETTE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Imagenette ``split`` ("train", or "test" = its ``val`` folder) as (uint8 [N, 3, size, size], int64 [N]).

    Reads the class-folder layout of the official archives (``imagenette2-160/{train,val}/<wnid>/*.JPEG``; also
    ``imagenette2-320``, ``imagenette2``, ``imagenette``), decoded once and cached as ``.npy`` under the cache
    folder. Raises DataNotFoundError naming the folders looked for when none is there.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = find_data_file(IMAGENETTE_FOLDERS, ["imagenette"], "Imagenette (class folders train/ and val/)",
                          data_root, is_dir=True)
    folder = root / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise DataNotFoundError(f"Imagenette {split}: {folder} is missing (the archive holds train/ and val/)")
    count = sum(1 for c in folder.iterdir() if c.is_dir() for _ in c.iterdir())
    key = hashlib.sha1(f"{folder.resolve()}:{count}:{size}".encode()).hexdigest()[:12]
    cache = _cache_dir() / f"imagenette_{key}"
    px, py = cache / "x.npy", cache / "y.npy"

    def decode():
        x, y, _ = _decode_image_folder(folder, size)
        return {px: x, py: y}

    x, y = _cached_arrays(cache, [px, py], decode, str(folder))
    return torch.from_numpy(x), torch.from_numpy(y)


# ----------------------------------------------------------------------------------------------------------------
# In-memory task data and loader
# ----------------------------------------------------------------------------------------------------------------
class ImageSet:
    """A view of shared uint8 images: which rows, their task-local labels, an optional pixel permutation, and the
    per-channel normalisation. ``batch(rows)`` returns (float32 [B, C, H, W], int64 [B])."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, mean, std, indices: torch.Tensor | None = None,
                 permutation: torch.Tensor | None = None):
        if images.dtype != torch.uint8 or images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {images.dtype} {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()  # already task-local, one per row of ``indices``
        self.indices = torch.arange(images.shape[0]) if indices is None else indices.long()
        if self.labels.shape[0] != self.indices.shape[0]:
            raise ValueError(f"{self.labels.shape[0]} labels for {self.indices.shape[0]} rows")
        self.permutation = permutation
        c = images.shape[1]
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def __len__(self) -> int:
        return self.indices.shape[0]

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])

    def to(self, device) -> "ImageSet":
        device = torch.device(device)
        self.images = self.images.to(device)
        self.labels = self.labels.to(device)
        self.indices = self.indices.to(device)
        self.mean, self.std = self.mean.to(device), self.std.to(device)
        if self.permutation is not None:
            self.permutation = self.permutation.to(device)
        return self

    def batch(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = rows.to(self.indices.device)
        raw = self.images[self.indices[rows]]
        if self.permutation is not None:
            n = raw.shape[0]
            raw = raw.reshape(n, -1)[:, self.permutation].reshape((n,) + self.sample_shape)
        x = (raw.float().div_(255.0) - self.mean) / self.std
        return x, self.labels[rows]

    def subset(self, n: int | None, seed: int) -> "ImageSet":
        """The first ``n`` rows of a seeded shuffle (all rows when n is None or too big): a fixed quick subset."""
        if n is None or n >= len(self):
            return self
        g = torch.Generator().manual_seed(seed)
        keep = torch.randperm(len(self), generator=g)[:n].sort().values.to(self.indices.device)
        out = ImageSet.__new__(ImageSet)
        out.__dict__.update(self.__dict__)
        out.indices, out.labels = self.indices[keep], self.labels[keep]
        return out


class InMemoryLoader:
    """Batches ``(x, y)`` of an ``ImageSet``; reshuffled each epoch by its own seeded generator.

    ``task_label=t`` yields ``(x, t)`` (a LongTensor full of t) instead: the router's meta-task data.
    ``augment=True`` adds a random 4-pixel-padded crop and a horizontal flip (CIFAR's standard augmentation),
    drawn from the same generator. ``state_dict()``/``load_state_dict()`` save and restore the generator.
    ``on_epoch_end(n)`` (optional) is called when a full pass ends, i.e. when the consumer asks for the batch after
    the last one, so after it has used the last batch; ``n`` counts the full passes (a pass abandoned early, e.g.
    ``next(iter(loader))``, does not count).
    """

    def __init__(self, data: ImageSet, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 device=None, task_label: int | None = None, augment: bool = False, on_epoch_end=None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data, self.batch_size, self.shuffle, self.drop_last = data, int(batch_size), shuffle, drop_last
        self.device = torch.device(device) if device is not None else None
        self.task_label, self.augment = task_label, augment
        self.generator = torch.Generator().manual_seed(int(seed))
        self.on_epoch_end = on_epoch_end
        self.epochs_completed = 0
        self.rank, self.world = 0, 1
        self.global_rows: int | None = None  # of the batch last yielded, over every process

    def shard(self, rank: int, world: int) -> "InMemoryLoader":
        """Read only this process's share of every batch: rows ``rank::world`` of each global batch, so the
        shares differ by at most one row when ``world`` does not divide the batch (the trainer weights each
        process's loss by its share: the step is the global batch's mean). Every process draws the same
        permutation from the same generator, so together they read each global batch exactly once and the
        global batch does not depend on ``world``. Only a batch of fewer than ``2 * world`` rows (a small last
        batch, or ``batch_size < 2 * world``) is padded with its own rows to two per process, so that no process
        gets an empty batch or a lone sample a BatchNorm cannot normalise. Returns self."""
        if not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, {world}), got {rank}")
        self.rank, self.world = int(rank), int(world)
        return self

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def dataset_size(self) -> int:
        return len(self.data)

    def __iter__(self):
        n = len(self.data)
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for start in range(0, n, self.batch_size):
            rows = order[start:start + self.batch_size]
            if self.drop_last and rows.numel() < self.batch_size:
                break
            mine = slice(None)
            if self.world > 1:
                if rows.numel() < 2 * self.world:  # two rows per process: none empty, none alone
                    rows = rows[torch.arange(2 * self.world) % rows.numel()]
                mine = slice(self.rank, None, self.world)
            # the augmentation is drawn for the whole global batch, so every process's generator stays in step
            crops = self._draw_crops(rows.numel()) if self.augment else None
            self.global_rows = rows.numel()  # the rows of this batch over every process (the trainer's weights)
            x, y = self.data.batch(rows[mine])
            if crops is not None:
                x = self._augment(x, *(c[mine] for c in crops))
            if self.task_label is not None:
                y = torch.full((x.shape[0],), self.task_label, dtype=torch.long, device=x.device)
            if self.device is not None:
                x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
            yield x, y
        self.epochs_completed += 1
        if self.on_epoch_end is not None:
            self.on_epoch_end(self.epochs_completed)

    def _draw_crops(self, b: int, pad: int = 4) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: the crop's offsets (dy, dx) in the 4-pixel padding and whether to flip."""
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=self.generator)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=self.generator)
        return dy, dx, torch.rand(b, generator=self.generator) < 0.5

    def _augment(self, x: torch.Tensor, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor,
                 pad: int = 4) -> torch.Tensor:
        b, _, h, w = x.shape
        padded = torch.nn.functional.pad(x, (pad, pad, pad, pad))
        dy, dx = dy.tolist(), dx.tolist()
        out = torch.stack([padded[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(b)])
        return torch.where(flip.view(b, 1, 1, 1).to(out.device), out.flip(3), out)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "epochs_completed": self.epochs_completed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.epochs_completed = int(state.get("epochs_completed", 0))


# ----------------------------------------------------------------------------------------------------------------
# Scenarios
# ----------------------------------------------------------------------------------------------------------------
@dataclass
class TaskData:
    name: str
    num_classes: int
    train: ImageSet
    test: ImageSet
    classes: tuple = ()  # original class ids, in task-local label order


@dataclass
class Scenario:
    name: str
    tasks: list[TaskData]
    input_shape: tuple[int, int, int]
    source: str  # the dataset as results should name it, e.g. "CIFAR-10 (JPEG copy)"
    notes: dict = field(default_factory=dict)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)

    def digest(self) -> str:
        """A SHA-1 of what the tasks read: every image array they share, and each task's rows, labels and pixel
        permutation. A resumed run compares it with its checkpoint's, so data that changed under ``data_root``
        (another copy, another decoding) are refused instead of mixed into one accuracy matrix."""
        h = hashlib.sha1()
        seen = set()

        def add(t: torch.Tensor | None) -> None:
            if t is None:
                h.update(b"-")
                return
            t = t.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")

        for task in self.tasks:
            for part in (task.train, task.test):
                if id(part.images) not in seen:
                    seen.add(id(part.images))
                    add(part.images)
                for t in (part.indices, part.labels, part.permutation):
                    add(t)
        return h.hexdigest()

    def to(self, device) -> "Scenario":
        moved = set()
        for task in self.tasks:
            for s in (task.train, task.test):
                if id(s) not in moved:
                    s.to(device)
                    moved.add(id(s))
        return self


def _split_tasks(prefix, x_train, y_train, x_test, y_test, mean, std, classes_per_task, num_tasks, max_tasks):
    tasks = []
    for t in range(num_tasks):
        classes = list(range(t * classes_per_task, (t + 1) * classes_per_task))
        sets = []
        for x, y in ((x_train, y_train), (x_test, y_test)):
            mask = torch.zeros_like(y, dtype=torch.bool)
            for c in classes:
                mask |= y == c
            rows = mask.nonzero().flatten()
            sets.append(ImageSet(x, y[rows] - classes[0], mean, std, indices=rows))
        tasks.append(TaskData(f"{prefix} {t}: classes {classes}", classes_per_task, sets[0], sets[1], tuple(classes)))
    return tasks


def _check_classes_per_task(name, classes_per_task, default, num_classes=None):
    """Classes per task of a split scenario: ``default`` for None; ValueError unless an int in [2, num_classes]
    (a task of one class has nothing to learn) that divides num_classes (else some classes would be in no task)."""
    cpt = default if classes_per_task is None else classes_per_task
    bound = ">= 2" if num_classes is None else f"between 2 and {num_classes} (its number of classes)"
    if isinstance(cpt, bool) or not isinstance(cpt, int) or cpt < 2 or (num_classes is not None and cpt > num_classes):
        raise ValueError(f"classes_per_task for scenario {name} must be an int {bound}, got {classes_per_task!r}")
    if num_classes is not None and num_classes % cpt:
        left = list(range(num_classes - num_classes % cpt, num_classes))
        raise ValueError(f"classes_per_task must divide {num_classes} for scenario {name}, got {cpt}: its classes "
                         f"would split into {num_classes // cpt} tasks and no task would hold class(es) {left}")
    return cpt


def _check_num_tasks(name, num_tasks, max_tasks, classes_per_task=None):
    if num_tasks is None:
        return max_tasks
    if not 1 <= int(num_tasks) <= max_tasks:
        per = "" if classes_per_task is None else f" of {classes_per_task} classes (classes_per_task)"
        raise ValueError(f"scenario {name} has at most {max_tasks} tasks{per}, asked for {num_tasks}")
    return int(num_tasks)


def permuted_mnist(num_tasks=10, seed=0, data_root=None, unpermuted_first=True, **_) -> Scenario:
    x_tr, y_tr = load_mnist("train", data_root)
    x_te, y_te = load_mnist("test", data_root)
    # unset: the paper's 10 tasks (there are as many permutations as one asks for, up to the task id range)
    num_tasks = _check_num_tasks("permuted_mnist", 10 if num_tasks is None else num_tasks, 32766)
    tasks = []
    for t in range(num_tasks):
        perm = None
        if t > 0 or not unpermuted_first:
            perm = torch.randperm(28 * 28, generator=torch.Generator().manual_seed(seed * 1000 + t))
        tasks.append(TaskData(f"permuted MNIST {t}" + (" (unpermuted)" if perm is None else ""), 10,
                              ImageSet(x_tr, y_tr, MNIST_MEAN, MNIST_STD, permutation=perm),
                              ImageSet(x_te, y_te, MNIST_MEAN, MNIST_STD, permutation=perm), tuple(range(10))))
    return Scenario("permuted_mnist", tasks, (1, 28, 28), "MNIST",
                    {"task 0": "unpermuted" if unpermuted_first else "permuted",
                     "permutation": "torch.randperm(784, generator=manual_seed(seed*1000 + t))"})


def split_mnist(num_tasks=5, seed=0, data_root=None, classes_per_task=2, **_) -> Scenario:
    cpt = _check_classes_per_task("split_mnist", classes_per_task, 2, 10)
    x_tr, y_tr = load_mnist("train", data_root)
    x_te, y_te = load_mnist("test", data_root)
    num_tasks = _check_num_tasks("split_mnist", num_tasks, 10 // cpt, cpt)
    tasks = _split_tasks("split MNIST", x_tr, y_tr, x_te, y_te, MNIST_MEAN, MNIST_STD, cpt, num_tasks, 10 // cpt)
    return Scenario("split_mnist", tasks, (1, 28, 28), "MNIST")


def split_cifar10(num_tasks=5, seed=0, data_root=None, classes_per_task=2, **_) -> Scenario:
    cpt = _check_classes_per_task("split_cifar10", classes_per_task, 2, 10)
    x_tr, y_tr, source = load_cifar10("train", data_root)
    x_te, y_te, _ = load_cifar10("test", data_root)
    num_tasks = _check_num_tasks("split_cifar10", num_tasks, 10 // cpt, cpt)
    tasks = _split_tasks("split CIFAR-10", x_tr, y_tr, x_te, y_te, CIFAR10_MEAN, CIFAR10_STD, cpt, num_tasks,
                         10 // cpt)
    return Scenario("split_cifar10", tasks, (3, 32, 32), source)


def split_cifar100(num_tasks=None, seed=0, data_root=None, classes_per_task=10, **_) -> Scenario:
    cpt = _check_classes_per_task("split_cifar100", classes_per_task, 10, 100)
    x_tr, y_tr = load_cifar100("train", data_root)
    x_te, y_te = load_cifar100("test", data_root)
    num_tasks = _check_num_tasks("split_cifar100", num_tasks, 100 // cpt, cpt)
    tasks = _split_tasks("split CIFAR-100", x_tr, y_tr, x_te, y_te, CIFAR100_MEAN, CIFAR100_STD, cpt, num_tasks,
                         100 // cpt)
    return Scenario("split_cifar100", tasks, (3, 32, 32), "CIFAR-100")


def split_imagenette(num_tasks=5, seed=0, data_root=None, classes_per_task=2, **_) -> Scenario:
    cpt = _check_classes_per_task("split_imagenette", classes_per_task, 2, 10)
    x_tr, y_tr = load_imagenette("train", data_root)
    x_te, y_te = load_imagenette("test", data_root)
    num_tasks = _check_num_tasks("split_imagenette", num_tasks, 10 // cpt, cpt)
    tasks = _split_tasks("split Imagenette", x_tr, y_tr, x_te, y_te, IMAGENET_MEAN, IMAGENET_STD, cpt, num_tasks,
                         10 // cpt)
    return Scenario("split_imagenette", tasks, (3, IMAGENETTE_SIZE, IMAGENETTE_SIZE), "Imagenette")


def synthetic(num_tasks=3, seed=0, classes_per_task=2, train_per_class=96, test_per_class=48, **_) -> Scenario:
    """Gaussian clusters drawn from the seed, quantised to uint8 1x8x8 images: easy, tiny, for tests."""
    g = torch.Generator().manual_seed(10_007 + seed)
    cpt = _check_classes_per_task("synthetic", classes_per_task, 2)
    tasks = []
    for t in range(3 if num_tasks is None else int(num_tasks)):
        centers = torch.rand(cpt, 1, 8, 8, generator=g) * 200 + 28
        sets = []
        for per_class in (train_per_class, test_per_class):
            y = torch.arange(cpt).repeat_interleave(per_class)
            noise = torch.randn(y.numel(), 1, 8, 8, generator=g) * 30
            x = (centers[y] + noise).round().clamp(0, 255).to(torch.uint8)
            sets.append(ImageSet(x, y, (0.5,), (0.25,)))
        tasks.append(TaskData(f"synthetic {t}", cpt, sets[0], sets[1], tuple(range(cpt))))
    return Scenario("synthetic", tasks, (1, 8, 8), "synthetic")


SCENARIOS = {"permuted_mnist": permuted_mnist, "split_mnist": split_mnist, "split_cifar10": split_cifar10,
             "split_cifar100": split_cifar100, "split_imagenette": split_imagenette, "synthetic": synthetic}
_ALIASES = {"pmnist": "permuted_mnist", "smnist": "split_mnist", "cifar10": "split_cifar10",
            "cifar100": "split_cifar100", "imagenette": "split_imagenette"}


def build_scenario(name: str, num_tasks: int | None = None, seed: int = 0, data_root=None,
                   train_samples_per_task: int | None = None, test_samples_per_task: int | None = None,
                   **options) -> Scenario:
    """The scenario ``name`` with ``num_tasks`` tasks (default: all of it; permuted_mnist: 10; synthetic: 3). ``*_samples_per_task`` keep a fixed,
    seeded subset of each task's data (quick runs). ``options``: ``classes_per_task``, ``unpermuted_first``.

    ``scenario.notes["data_files"]``: the absolute paths of the data files and folders it was read from (found
    through ``data_root``, ``$EIDETIC_DATA`` or ``../shared/data``; empty for ``synthetic``)."""
    key = _ALIASES.get(name, name)
    if key not in SCENARIOS:
        raise ValueError(f"unknown scenario {name!r}; choose one of {', '.join(SCENARIOS)}")
    token = _FILES_READ.set([])
    try:
        scenario = SCENARIOS[key](num_tasks=num_tasks, seed=seed, data_root=data_root, **options)
        scenario.notes = {**scenario.notes, "data_files": list(_FILES_READ.get())}
    finally:
        _FILES_READ.reset(token)
    for t, task in enumerate(scenario.tasks):
        task.train = task.train.subset(train_samples_per_task, seed * 1000 + t)
        task.test = task.test.subset(test_samples_per_task, seed * 1000 + 500 + t)
    return scenario
