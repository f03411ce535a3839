"""Bodies for the experiments: MLP, ConvNet, ResNet with projection skips.

Each builder returns ``(body, feature_dim)``: ``body`` maps images [B, C, H, W] to features [B, feature_dim] and is
built from plain ``torch.nn`` layers; ``EideticNetwork`` converts them to their Eidetic twins and traces the
layer graph (so these bodies also exercise the tracer). Per-task heads are added by the network, not here.

* ``mlp``: Flatten -> [Linear(width) -> ReLU -> Dropout] per entry of ``widths``; features = widths[-1].
  The paper's Permuted MNIST net is ``widths=[2000, 2000]``, dropout 0.1.
* ``convnet``: per entry of ``widths[:-1]`` a block Conv3x3 -> BatchNorm -> ReLU -> MaxPool2; then
  Flatten -> Linear(widths[-1]) -> ReLU -> Dropout. (Conv -> Flatten -> Linear: each channel feeds its H*W inputs.)
* ``resnet``: a CIFAR-style ResNet (3x3 stem, no stem pooling). ``widths`` = channels per stage (ResNet-18:
  [64, 128, 256, 512]), ``blocks`` = basic blocks per stage ([2, 2, 2, 2]). Every block's skip is a projection
  (1x1 conv + BN) so that each residual sum ``f(x) + g(x)`` couples just the two branches of one block (paper
  Section 3.1, "Residual connections"); stages after the first downsample by stride 2. Global average pooling;
  features = widths[-1]; dropout before the heads.
* ``resnet50``: the same CIFAR-style stem with bottleneck blocks (1x1 -> 3x3 -> 1x1 convs, 4x expansion), a
  projection on every skip; ``widths`` = bottleneck widths per stage ([64, 128, 256, 512]), ``blocks`` =
  blocks per stage (ResNet-50: [3, 4, 6, 3]); features = 4 * widths[-1]. The paper's Split CIFAR-100 net
  (Section 6.1: 3x3 first conv, no first max-pool).

A body of your own (``eidetic train``'s ``model: MODULE:FUNCTION`` or ``model: FILE.py:FUNCTION``, see
``load_factory``): ``FUNCTION(input_shape, **model_args)`` returns ``(body, feature_dim)`` or the body alone,
called with ``widths=``, ``blocks=`` and ``dropout=`` as well where the config sets them.
"""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import os
import sys
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn as nn

__all__ = ["BodyFactoryError", "body_fingerprint", "build_body", "check_model_args", "load_factory", "is_custom_model", "resolve_model", "mlp_body", "convnet_body", "resnet_body", "resnet50_body", "BasicBlock", "BottleneckBlock",
           "MODELS"]


def _widths(widths, name) -> list[int]:
    widths = [int(w) for w in (widths if isinstance(widths, (list, tuple)) else [widths])]
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"{name}: widths must be a non-empty list of positive ints, got {widths}")
    return widths


def mlp_body(input_shape: Sequence[int], widths=(400, 400), dropout: float = 0.0, **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "mlp")
    layers: list[nn.Module] = [nn.Flatten()]
    n_in = 1
    for d in input_shape:
        n_in *= int(d)
    for w in widths:
        layers += [nn.Linear(n_in, w), nn.ReLU()]
        if dropout:
            layers.append(nn.Dropout(dropout))
        n_in = w
    return nn.Sequential(*layers), widths[-1]


def convnet_body(input_shape: Sequence[int], widths=(32, 64, 256), dropout: float = 0.0, **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "convnet")
    if len(widths) < 2:
        raise ValueError("convnet: widths needs at least one conv width and the final fully connected width, "
                         f"e.g. [32, 64, 256]; got {widths}")
    c, h, w = (int(d) for d in input_shape)
    layers: list[nn.Module] = []
    for out in widths[:-1]:
        if min(h, w) < 2:
            raise ValueError(f"convnet: {len(widths) - 1} pooling blocks shrink a {tuple(input_shape)} input to "
                             "nothing; use fewer conv widths")
        layers += [nn.Conv2d(c, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)]
        c, h, w = out, h // 2, w // 2
    layers += [nn.Flatten(), nn.Linear(c * h * w, widths[-1]), nn.ReLU()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    return nn.Sequential(*layers), widths[-1]


class BasicBlock(nn.Module):
    """relu(bn(conv(relu(bn(conv(x))))) + bn(conv1x1(x))): a ResNet basic block whose skip is a projection."""

    def __init__(self, c_in: int, c_out: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut_bn(self.shortcut_conv(x)))


class BottleneckBlock(nn.Module):
    """relu(bn(conv1x1(relu(bn(conv3x3(relu(bn(conv1x1(x)))))))) + bn(conv1x1(x))): a ResNet bottleneck block
    (4x expansion) whose skip is a projection."""

    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int = 1):
        super().__init__()
        c_out = width * self.expansion
        self.conv1 = nn.Conv2d(c_in, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, c_out, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(c_out)
        self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + self.shortcut_bn(self.shortcut_conv(x)))


class ResNetBody(nn.Module):
    def __init__(self, in_channels: int, widths: list[int], blocks: list[int], dropout: float, block=BasicBlock):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
        self.stem_bn = nn.BatchNorm2d(widths[0])
        stages, c = [], widths[0]
        expansion = getattr(block, "expansion", 1)
        for s, (w, n) in enumerate(zip(widths, blocks)):
            for b in range(n):
                stages.append(block(c, w, stride=2 if (s > 0 and b == 0) else 1))
                c = w * expansion
        self.blocks = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten()
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem_bn(self.stem(x)))
        x = self.blocks(x)
        return self.dropout(self.flatten(self.pool(x)))


def resnet_body(input_shape: Sequence[int], widths=(64, 128, 256, 512), dropout: float = 0.0, blocks=None,
                **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "resnet")
    blocks = [2] * len(widths) if blocks is None else [int(b) for b in blocks]
    if len(blocks) != len(widths) or any(b < 1 for b in blocks):
        raise ValueError(f"resnet: blocks needs one positive count per stage width; widths={widths}, "
                         f"blocks={blocks}")
    return ResNetBody(int(input_shape[0]), widths, blocks, dropout), widths[-1]


def resnet50_body(input_shape: Sequence[int], widths=(64, 128, 256, 512), dropout: float = 0.0, blocks=None,
                  **_) -> tuple[nn.Module, int]:
    widths = _widths(widths, "resnet50")
    blocks = [3, 4, 6, 3] if blocks is None else [int(b) for b in blocks]
    if len(blocks) != len(widths) or any(b < 1 for b in blocks):
        raise ValueError(f"resnet50: blocks needs one positive count per stage width; widths={widths}, "
                         f"blocks={blocks}")
    body = ResNetBody(int(input_shape[0]), widths, blocks, dropout, block=BottleneckBlock)
    return body, widths[-1] * BottleneckBlock.expansion


MODELS = {"mlp": mlp_body, "convnet": convnet_body, "resnet": resnet_body, "resnet50": resnet50_body}


class BodyFactoryError(RuntimeError):
    """A ValueError raised by a body factory of the user's, or by its body's forward: not a config mistake, so it
    keeps the traceback into the user's code (``__cause__``)."""


def is_custom_model(model: str) -> bool:
    """Whether ``model`` names a body factory of the user's (``MODULE:FUNCTION`` or ``FILE.py:FUNCTION``) rather
    than one of ``MODELS``."""
    return model not in MODELS and ":" in model


def resolve_model(model: str) -> str:
    """``model`` with a relative ``FILE.py`` made absolute (from the current directory), so that a run's config
    names the same file wherever it is resumed from. Built-in names and ``MODULE:FUNCTION`` are returned as
    they are."""
    if not is_custom_model(model):
        return model
    where, _, name = model.rpartition(":")
    if where.endswith(".py"):
        return f"{Path(where).expanduser().resolve()}:{name}"
    return model


def load_factory(model: str) -> Callable:
    """The body factory ``model`` names: ``"package.module:function"`` (imported as Python imports it, with the
    current directory searched first) or ``"path/to/file.py:function"`` (that file, run as a module; relative
    to the current directory). ``function`` may be dotted (``module:Class.build``).

    Raises ValueError (with what to change) for a malformed name, a module or file that cannot be found, and a
    name the module does not define or that is not callable. Errors raised by importing the module itself
    propagate as they are (their traceback points into the user's code)."""
    where, _, name = model.rpartition(":")
    if not where or not name:
        raise ValueError(f"model {model!r}: a body of your own is MODULE:FUNCTION or FILE.py:FUNCTION (e.g. "
                         f"my_bodies:small_cnn or bodies.py:small_cnn); the built-in models are "
                         f"{', '.join(MODELS)}")
    if where.endswith(".py"):
        path = Path(where).expanduser().resolve()
        if not path.is_file():
            raise ValueError(f"model {model!r}: the file {path} does not exist (a relative path is taken from the "
                             f"current directory, {os.getcwd()})")
        if str(path.parent) not in sys.path:
            sys.path.insert(0, str(path.parent))  # as `python file.py`: the file imports the modules beside it
        # run anew on every call: the file as it is now (an edit is then seen, by the run's body check too)
        module_name = f"eidetic_user_body_{path.stem}"
        spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(spec)
        previous = sys.modules.get(module_name)
        sys.modules[module_name] = module  # classes defined there pickle by this name (torch.save of a body)
        try:
            spec.loader.exec_module(module)
        except BaseException:
            if previous is None:
                del sys.modules[module_name]
            else:
                sys.modules[module_name] = previous
            raise
    else:
        if os.getcwd() not in sys.path and "" not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `python -m`: the console script's path lacks the current directory
        try:
            module = importlib.import_module(where)
        except ModuleNotFoundError as exc:
            if exc.name is None or not (where == exc.name or where.startswith(exc.name + ".")):
                raise  # the module was found; something it imports was not
            raise ValueError(f"model {model!r}: no module named {exc.name!r} (searched the current directory, "
                             f"{os.getcwd()}, then Python's path): run from the folder that holds it (for a run: the "
                             f"folder it was started in) or add that folder to PYTHONPATH; or name its file, "
                             f"path/to/file.py:{name}, which a run finds from anywhere") from None
    target = module
    for part in name.split("."):
        if not hasattr(target, part):
            defined = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_")
                             and getattr(v, "__module__", None) == module.__name__)
            found = "" if where.endswith(".py") else f" ({getattr(module, '__file__', None) or 'built in'})"
            raise ValueError(f"model {model!r}: {where}{found} defines no {name!r}"
                             + (f" (it defines {', '.join(defined)})" if defined else "")
                             + ("" if where.endswith(".py") else "; a module of yours named like one Python already "
                                "imported (json, random, ...) is passed over: rename it, or name its file "
                                f"({where}.py:{name})"))
        target = getattr(target, part)
    if not callable(target):
        raise ValueError(f"model {model!r}: {name} is a {type(target).__name__}, not a function that builds "
                         "the body")
    return target


def _build_custom(model: str, input_shape: tuple, kwargs: dict) -> tuple[nn.Module, int]:
    factory = load_factory(model)
    try:
        inspect.signature(factory).bind(input_shape, **kwargs)
    except TypeError as exc:
        raise ValueError(f"model {model!r} cannot be called as {model.rpartition(':')[2]}(input_shape"
                         + "".join(f", {k}=..." for k in kwargs) + f"): {exc}. It is called with the input "
                         "shape, model_args, and widths/blocks/dropout where the config sets them") from None
    except ValueError:  # no signature to read (a builtin): call it and let it say
        pass
    try:
        built = factory(input_shape, **kwargs)
    except ValueError as exc:  # raised by the user's code: its traceback, not a one-line config error
        raise BodyFactoryError(f"model {model!r}: the factory raised {type(exc).__name__}: {exc}") from exc
    from .network import EideticNetwork
    if isinstance(built, EideticNetwork):  # a body the tracer cannot follow, its graph declared by hand
        if built.num_finished_tasks or built.current_task is not None or len(built.heads):
            raise ValueError(f"model {model!r} returned an EideticNetwork that already has tasks or heads: return "
                             "a fresh one (the run prepares, trains and finishes every task)")
        return built, built.feature_dim
    if isinstance(built, tuple) and len(built) == 2 and isinstance(built[0], nn.Module):
        body, feature_dim = built
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"model {model!r} returned feature_dim={feature_dim!r}: the number of features the "
                             "body returns per sample, an int >= 1")
        return body, feature_dim
    if not isinstance(built, nn.Module):
        raise ValueError(f"model {model!r} returned a {type(built).__name__}: return the body (an nn.Module "
                         "mapping a batch [B, *input_shape] to features [B, F]) or (body, F)")
    body = built
    modes = [(m, m.training) for m in body.modules()]
    body.eval()  # a probe batch of two: no batch-norm statistics move, no dropout drawn
    try:
        with torch.no_grad():
            out = body(torch.zeros((2,) + tuple(input_shape)))
    except ValueError as exc:
        raise BodyFactoryError(f"model {model!r}: the body's forward on a probe batch of 2 inputs "
                               f"{tuple(input_shape)} raised {type(exc).__name__}: {exc}") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    if not isinstance(out, torch.Tensor) or out.dim() != 2:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"model {model!r}: the body returns {shape} for a batch of 2 inputs {tuple(input_shape)}; "
                         "it must return features [B, F] (flatten or pool before returning), or return "
                         "(body, F) from the factory")
    return body, int(out.shape[1])


_LIBRARY = tuple(Path(__file__).resolve().parents[1] / package for package in ("python_layers", "eidetic_kernels"))


def _users_file(obj) -> str | None:
    """The source file of ``obj`` (a class or function) when it is the user's: not torch's, not this library's, not
    an installed package's nor the standard library's (their changes come with versions, which a run records)."""
    try:
        file = inspect.getsourcefile(obj)
    except TypeError:  # built in
        return None
    return None if file is None else _users_path(file)


def _users_path(file: str) -> str | None:
    """``file`` resolved, when it is the user's (see ``_users_file``); None otherwise."""
    path = Path(file).resolve()
    installed = {"site-packages", "dist-packages"} & set(path.parts)
    standard = Path(sys.base_prefix).resolve() / "lib"
    if installed or any(path.is_relative_to(p) for p in _LIBRARY) or path.is_relative_to(standard):
        return None
    return str(path)


def _plain(value, files: set):
    """A stable description of an attribute's value (no memory address): numbers, strings and sequences of them
    as they are, a function or class by its qualified name (its file, when the user's, joins ``files``); None for
    anything else (tensors and modules are in the state dict and the repr)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (tuple, list)):
        items = [_plain(v, files) for v in value]
        return None if any(i is None and v is not None for i, v in zip(items, value)) else (type(value).__name__, items)
    if inspect.isfunction(value) or inspect.isclass(value) or inspect.isbuiltin(value):
        file = _users_file(value)
        if file is not None:
            files.add(file)
        return f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', repr(value))}"
    return None


def body_fingerprint(body: nn.Module, model: str | None = None, sources: dict | None = None) -> str:
    """SHA-256 of what a body of the user's computes, as far as its code says: its modules' repr (types, sizes,
    options), the plain attributes of the user's module classes (a gain, a flag, an activation function), and the
    bytes of every source file of the user's it comes from (the factory ``model`` names, the files of the user's
    module classes and of functions they hold, and the user's files these import, transitively): helper functions
    and module constants included, comments too. A run records it, so a resume or export with an edited body file
    is refused instead of changing finished tasks' outputs. (Code reached otherwise, such as a module imported
    inside a function, is not followed.) ``sources``: a dict to fill with {source file path: SHA-256 of its bytes},
    which lets a refusal name the files that changed."""
    h = hashlib.sha256(repr(body).encode())
    files = set()
    if model is not None and is_custom_model(model):
        where = model.rpartition(":")[0]
        if where.endswith(".py"):
            files.add(str(Path(where).expanduser().resolve()))
        else:
            module = sys.modules.get(where)  # imported by build_body
            file = _users_file(module) if module is not None else None
            if file is not None:
                files.add(file)
    for name, module in body.named_modules():
        file = _users_file(type(module))
        if file is None:
            continue
        files.add(file)
        plain = sorted((k, _plain(v, files)) for k, v in vars(module).items() if not k.startswith("_")
                       and k != "training")
        h.update(f"{name}: {plain}".encode())
    files = _imported_users_files(files)
    # the files' contents, not their paths: a project moved or cloned elsewhere is the same body
    digests = {file: hashlib.sha256(Path(file).read_bytes()).hexdigest() for file in files}
    if sources is not None:
        sources.update(digests)
    for digest in sorted(digests.values()):
        h.update(digest.encode())
    return h.hexdigest()


def _imported_users_files(files: set) -> set:
    """``files`` and, transitively, the user's files their modules import (``import helpers``, ``from blocks import
    act``): code a body's forward may call without holding it in an attribute. Modules are those imported in this
    process (``sys.modules``), found by their file."""
    modules_of: dict[str, list] = {}
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str):
            modules_of.setdefault(str(Path(file).resolve()), []).append(module)
    seen, todo = set(files), list(files)
    while todo:
        for module in modules_of.get(todo.pop(), ()):
            for value in list(vars(module).values()):
                if inspect.ismodule(value):
                    file = getattr(value, "__file__", None)
                    file = _users_path(file) if isinstance(file, str) else None
                elif inspect.isfunction(value) or inspect.isclass(value):
                    file = _users_file(value)
                else:
                    continue
                if file is not None and file not in seen:
                    seen.add(file)
                    todo.append(file)
    return seen


def check_model_args(model: str, model_args: dict | None) -> None:
    """ValueError for ``model_args`` given to a built-in model (they are for a factory of the user's)."""
    if model in MODELS and model_args:
        raise ValueError(f"model_args ({', '.join(map(str, model_args))}) are for a body of your own (model: "
                         f"MODULE:FUNCTION); the built-in {model} takes widths, blocks and dropout")


def build_body(model: str, input_shape: Sequence[int], widths=None, dropout: float = 0.0, blocks=None,
               model_args: dict | None = None) -> tuple[nn.Module, int]:
    """``(body, feature_dim)`` for ``model``: one of ``MODELS`` (``widths=None`` takes its default) or a factory of
    the user's (``MODULE:FUNCTION`` / ``FILE.py:FUNCTION``, see ``load_factory``), called as
    ``factory(input_shape, **model_args)`` plus ``widths``/``blocks``/``dropout`` where they are set (not None,
    dropout not 0). A factory may return the body alone (its feature count is read from a probe batch of 2), or
    a fresh ``EideticNetwork`` (for a body whose graph is declared by hand: ``EideticNetwork(body, F,
    graph=declare_graph(...))``), returned as ``(network, F)``.

    Raises ValueError for an unknown model, ``model_args`` given to a built-in model, a factory that cannot be
    called with these arguments or that returns something else than a body."""
    kwargs = {}
    if widths is not None:
        kwargs["widths"] = widths
    if blocks is not None:
        kwargs["blocks"] = blocks
    check_model_args(model, model_args)
    if model in MODELS:
        return MODELS[model](tuple(input_shape), dropout=float(dropout or 0.0), **kwargs)
    if not is_custom_model(model):
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}, or a body of your own: "
                         "MODULE:FUNCTION or FILE.py:FUNCTION")
    if dropout:
        kwargs["dropout"] = float(dropout)
    clash = sorted(set(kwargs) & set(model_args or {}))
    if clash:
        raise ValueError(f"model_args sets {', '.join(clash)}, which the config sets as its own key: set it once")
    return _build_custom(model, tuple(int(d) for d in input_shape), {**kwargs, **(model_args or {})})
