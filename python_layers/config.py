"""The experiment config of ``eidetic train``: one schema, read from a YAML file and ``key=value`` overrides.

``Config`` is the schema: every key with its type, default and help text (``eidetic --help`` prints it through
``keys_help``). ``load_config`` merges the schema's defaults, the file and the overrides with OmegaConf (types
checked and converted on merge), applies each key's range check and returns a plain dict, the form the run, its
``config.yaml`` and its checkpoints hold. Every problem is a ``ConfigError`` naming the key.
"""
import dataclasses
import math
import json
import re
import textwrap
import typing
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Literal, Optional

import torch
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException, ValidationError

from .models import MODELS, check_model_args, load_factory, resolve_model

__all__ = ["Config", "ConfigError", "OPTIONS", "KEYS", "RESUME_MAY_CHANGE", "default_config", "load_config",
           "parse_overrides", "keys_help"]


class ConfigError(ValueError):
    """A config key or value that cannot be used."""


def _key(default, help: str, check: Optional[tuple[str, Callable]] = None):
    """A schema field: ``default``, ``help`` (shown by ``eidetic --help``) and an optional range check
    ``(words, predicate)``: a value for which ``predicate`` is false is the ConfigError "KEY must be WORDS, got
    VALUE" (None, where the key allows it, is not checked)."""
    return dataclasses.field(default=default, metadata={"help": help, "check": check})


_AT_LEAST_ONE = (">= 1", lambda v: v >= 1)
_POSITIVE_LIST = ("a non-empty list of positive integers", lambda v: len(v) > 0 and all(n >= 1 for n in v))


def _device_string(value: str) -> bool:
    if value == "auto":
        return True
    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


_DEVICE = ("auto or a torch device (cpu, cuda, cuda:1, ...)", _device_string)


@dataclass
class Config:
    """Every config key of ``eidetic train`` (a YAML mapping of these keys, or ``key=value`` overrides)."""

    scenario: Literal["permuted_mnist", "split_mnist", "split_cifar10", "split_cifar100", "split_imagenette",
                      "synthetic"] = _key(
        "split_mnist",
        "the task sequence: permuted_mnist (task 0 unpermuted), split_mnist (5 x 2 digits), split_cifar10 "
        "(5 x 2 classes), split_cifar100 (100/classes_per_task tasks), split_imagenette (5 x 2 classes, 64x64), "
        "synthetic (tiny Gaussian clusters, for tests)")
    tasks: Optional[int] = _key(None, "how many tasks of the scenario to train, in order (default: all of them; "
                                      "permuted_mnist: 10; synthetic: 3)",
                                _AT_LEAST_ONE)
    classes_per_task: Optional[int] = _key(None, "classes per task of the split scenarios (default 2; "
                                                 "split_cifar100: 10; a divisor of the scenario's classes)",
                                           (">= 2 (a task of one class has nothing to learn)", lambda v: v >= 2))
    train_samples_per_task: Optional[int] = _key(
        None, "keep a fixed, seeded subset of each task's training set (quick runs; default: all)", _AT_LEAST_ONE)
    test_samples_per_task: Optional[int] = _key(None, "the same for each task's test set (default: all)",
                                                _AT_LEAST_ONE)
    augment: bool = _key(False, "random 4-pixel crop + horizontal flip of training images (CIFAR, Imagenette; "
                                "refused for the MNIST scenarios)")
    data_root: Optional[str] = _key(
        None, "folder searched first for the data files (then $EIDETIC_DATA, then ../shared/data)")
    model: str = _key(
        "mlp",
        "the body: mlp (Flatten, Linear-ReLU-Dropout per width), convnet (Conv3x3-BN-ReLU-MaxPool per width but the "
        "last, then Linear(last width)), resnet (CIFAR ResNet, basic blocks, projection skip in every block), "
        "resnet50 (CIFAR ResNet, bottleneck blocks, projection skip in every block); or a body of your own: "
        "MODULE:FUNCTION or FILE.py:FUNCTION (relative to the current directory), FUNCTION(input_shape, "
        "**model_args) returning the body (an nn.Module, batch -> features [B, F]) or (body, F), called with "
        "widths, blocks and dropout too where they are set",
        (f"{', '.join(MODELS)}, or MODULE:FUNCTION / FILE.py:FUNCTION",
         lambda v: v in MODELS or (":" in v and all(v.rpartition(":")[::2]))))
    model_args: Dict[str, Any] = dataclasses.field(default_factory=dict, metadata={
        "help": "keyword arguments for a body of your own (model: MODULE:FUNCTION), e.g. {depth: 4, act: gelu}",
        "check": None})
    widths: Optional[List[int]] = _key(
        None,
        "layer widths: mlp hidden widths (default [400, 400]); convnet conv channels then the fully connected width "
        "(default [32, 64, 256]); resnet and resnet50 channels per stage (default [64, 128, 256, 512]; resnet50's "
        "features are 4 x the last)", _POSITIVE_LIST)
    blocks: Optional[List[int]] = _key(None, "resnet: basic blocks per stage (default 2 each, ResNet-18); resnet50: "
                                             "bottleneck blocks per stage (default [3, 4, 6, 3])", _POSITIVE_LIST)
    dropout: float = _key(0.0, "dropout probability (0: none): mlp after each hidden layer; convnet after its fully connected "
                                 "layer; resnet/resnet50 before the heads",
                          ("in [0, 1)", lambda v: 0 <= v < 1))
    forward_transfer: bool = _key(
        True, "new tasks may read the frozen neurons of earlier tasks (false: disjoint subnetworks)")
    pruning: Literal["l1", "l2", "taylor", "none"] = _key(
        "l2",
        "neuron importance for iterative pruning: l1 / l2 (norm of incoming weights) or taylor (first-order Taylor "
        "score from the backward passes); none: no pruning, every free neuron freezes for the task")
    step: float = _key(0.05, "share of the task's free neurons pruned per pruning step, in every layer",
                       ("in (0, 1]", lambda v: 0 < v <= 1))
    stop_threshold: float = _key(
        0.01, "stop pruning once training accuracy stays more than this (absolute, 0.01 = 1 point) below the best",
        ("in [0, 1]", lambda v: 0 <= v <= 1))
    max_epochs: int = _key(50, "cap on training epochs per task before pruning", _AT_LEAST_ONE)
    patience: int = _key(5, "stop training a task after this many epochs without a better training accuracy",
                         _AT_LEAST_ONE)
    recovery_epochs: int = _key(5, "cap on recovery epochs after each pruning step", _AT_LEAST_ONE)
    max_prune_steps: Optional[int] = _key(None, "cap on pruning steps per task (default: until nothing is left)",
                                          (">= 0", lambda v: v >= 0))
    optimizer: Literal["adamw", "adam"] = _key(
        "adamw", "the optimizer, a fresh one per task: adamw (decoupled weight decay) or adam (weight decay added "
                 "to the gradient, as torch.optim.Adam)")
    lr: float = _key(1e-3, "learning rate", ("finite and > 0", lambda v: math.isfinite(v) and v > 0))
    prune_lr_factor: float = _key(
        1.0, "multiplies the learning rate once, when a task's pruning starts (the paper's Permuted MNIST setting "
             "halves it: 0.5)", ("in (0, 1]", lambda v: 0 < v <= 1))
    weight_decay: float = _key(0.01, "weight decay of the optimizer (0: none)", (">= 0", lambda v: v >= 0))
    batch_size: int = _key(256, "training batch size", _AT_LEAST_ONE)
    eval_batch_size: int = _key(1000, "batch size for test-set evaluation", _AT_LEAST_ONE)
    seed: int = _key(0, "seeds the weights, the batch order, dropout and the permutations")
    device: str = _key("auto", "auto (cuda when available, else cpu), cpu, cuda, cuda:1, ...", _DEVICE)
    threads: Optional[int] = _key(None, "torch CPU threads (default: torch's choice)", _AT_LEAST_ONE)
    router: Literal["learned", "entropy", "none"] = _key(
        "learned",
        "task routing for the no-task-id accuracy: learned (a task classifier on what router_input names, fitted after "
        "every task on router_samples_per_task training inputs of each finished task), entropy (the head with the "
        "least normalised entropy), none")
    router_samples_per_task: int = _key(2000, "training inputs per finished task for the learned router",
                                        _AT_LEAST_ONE)
    router_epochs: int = _key(30, "epochs of the learned router's training", _AT_LEAST_ONE)
    router_flip: bool = _key(
        False, "the learned router also trains on each input mirrored left-right and averages its task "
               "probabilities over an input and its mirror (two body passes per prediction; images whose class "
               "survives a mirror, e.g. CIFAR, not digits)")
    router_input: Literal["body", "input", "both"] = _key(
        "body", "what the learned router reads: body (the body's features and every layer's activations, in the "
                "view of all finished tasks), input (the raw input images through the router's own small CNN, "
                "conv 16-32 5x5 + FC 128; images [C, H, W] only), both (the two trained apart, their task "
                "log-probabilities added)")
    router_input_epochs: int = _key(3, "epochs of the learned router's CNN on the raw input (router_input: input or "
                                       "both)", _AT_LEAST_ONE)
    router_input_crop: int = _key(
        0, "the learned router's CNN trains on a random crop of each router input padded by this many zero pixels "
           "per side (a new position every epoch; 0: the inputs as they are)", (">= 0", lambda v: v >= 0))
    router_input_epochs_last: Optional[int] = _key(
        None, "epochs of the CNN's fit after the scenario's last task, the router the final routed ACC comes from "
              "(default: router_input_epochs); the fits after earlier tasks, whose routers give the earlier rows "
              "of routed_accuracy_matrix, train router_input_epochs", _AT_LEAST_ONE)
    router_warm_start: bool = _key(
        False, "the learned router fitted after task t starts from the one fitted after task t-1 (its weights; the "
               "new task's output row fresh) and trains on every finished task's router inputs again; none of them "
               "reaches the body")
    eval_every_epoch: bool = _key(
        True, "measure the task in training on its test set after every epoch (for the task-accuracy figure)")
    progress: bool = _key(True, "progress bars while training")


OPTIONS = dataclasses.fields(Config)  # the schema's fields in order: .name, .type, .default, .metadata["help"]
KEYS = tuple(f.name for f in OPTIONS)
_FIELD = {f.name: f for f in OPTIONS}
# keys that may change on --resume without changing the results
RESUME_MAY_CHANGE = frozenset({"progress", "device", "threads", "data_root"})


def default_config() -> dict:
    """Every key with its default, as a plain dict."""
    return OmegaConf.to_container(OmegaConf.structured(Config))


def parse_overrides(pairs) -> dict:
    """``["lr=2e-4", "widths=[100,100]", "tasks="]`` -> ``{"lr": 0.0002, "widths": [100, 100], "tasks": None}``.

    Values are YAML (OmegaConf's dotlist); an empty value is null. Raises ConfigError for a pair without ``=``
    and for an unknown key. Types are checked by ``load_config``.
    """
    pairs = list(pairs or [])
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"override {pair!r} is not key=value (e.g. lr=2e-4 or widths=[100,100]); a value "
                              f"with spaces must be quoted as one shell word: \"widths=[16, 16]\"")
        key = pair.split("=", 1)[0].strip()
        if key not in _FIELD:
            raise ConfigError(f"unknown config key {key!r} in override {pair!r}; valid keys: {', '.join(KEYS)}")
    try:
        return OmegaConf.to_container(OmegaConf.from_dotlist([p.strip() for p in pairs]))
    except (OmegaConfBaseException, yaml.YAMLError) as exc:
        # the parser's message spans lines (with a caret under the column): one line is enough here
        reason = " ".join(line.strip() for line in str(exc).splitlines() if line.strip() and line.strip() != "^")
        raise ConfigError(f"overrides {' '.join(pairs)}: {reason}") from None


def load_config(path=None, overrides=None) -> dict:
    """The config of a run: the schema's defaults, then the YAML file at ``path`` (if any), then ``overrides``
    (a dict, e.g. from ``parse_overrides``; an override of a mapping such as ``model_args`` replaces it whole, the
    file's mapping is merged into the defaults). Returns a plain dict of every key.

    Raises ConfigError for a missing or unreadable file, a file that is not a mapping, an unknown key, a value of
    the wrong type, a value outside its choices or its range.
    """
    cfg = OmegaConf.structured(Config)
    if path is not None:
        cfg = _merge(cfg, _read(Path(path)), f" (in {path})")
    if overrides:
        overrides = OmegaConf.create(dict(overrides))
        for key in overrides:
            if key in _FIELD and isinstance(cfg.get(key), DictConfig) and isinstance(overrides[key], DictConfig):
                # an override replaces a mapping (model_args={} empties it), as it replaces every other value
                OmegaConf.update(cfg, key, {}, merge=False)
        cfg = _merge(cfg, overrides, "")
    try:
        out = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"config key {exc.full_key}: {exc.msg}") from None
    for key, value in out.items():
        check = _FIELD[key].metadata["check"]
        if check is not None and value is not None and not check[1](value):
            raise ConfigError(f"{key} must be {check[0]}, got {value}")
    squeezed = [k for k, v in out["model_args"].items() if ":" in str(k) and v is None]
    if squeezed:  # YAML reads {width:8} as the key "width:8" with no value
        raise ConfigError(f"model_args {{{squeezed[0]}}}: write {{{str(squeezed[0]).replace(':', ': ', 1)}}}, with a "
                          "space after the colon (YAML reads 'name:value' as one key)")
    try:
        check_model_args(out["model"], out["model_args"])
        if out["model"] not in MODELS:
            out["model"] = resolve_model(out["model"])
            load_factory(out["model"])  # a missing module, file or function is a config error, said before any work
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if out["pruning"] == "none" and out["tasks"] != 1:
        raise ConfigError("pruning=none freezes every free neuron for the first task and leaves none for the next: "
                          "use tasks=1, or a pruning method (l1, l2, taylor)")
    if out["augment"] and _ALIASES_MNIST.get(out["scenario"], out["scenario"]) in ("permuted_mnist", "split_mnist"):
        raise ConfigError(f"augment=true is the crop and horizontal flip of natural images (CIFAR, Imagenette): "
                          f"on {out['scenario']} a flipped digit is another shape (and a permuted image has no "
                          "neighbourhoods); leave augment=false")
    if out["max_prune_steps"] == 0 and out["tasks"] != 1:
        raise ConfigError("max_prune_steps=0 prunes nothing: the first task freezes every free neuron and leaves "
                          "none for the next; use tasks=1, or max_prune_steps >= 1 (unset: until nothing is left)")
    _warn_unused_router_keys(out)
    return out


_INPUT_READER_KEYS = ("router_input_epochs", "router_input_crop", "router_input_epochs_last")


def _warn_unused_router_keys(cfg: dict) -> None:
    """Router keys set (away from their defaults) that the chosen router does not read: said, not silently
    ignored (a typo in a key's name is an error; a key of another router was silently nothing)."""
    if cfg["router"] != "learned":
        unused = [k for k in KEYS if k.startswith("router_") and cfg[k] != _FIELD[k].default]
        why = f"router={cfg['router']} fits no learned router"
    elif cfg["router_input"] == "body":
        unused = [k for k in _INPUT_READER_KEYS if cfg[k] != _FIELD[k].default]
        why = "router_input=body: the learned router has no CNN on the raw input (router_input: input or both)"
    else:
        unused = []
    if unused:
        warnings.warn(f"{', '.join(f'{k}={cfg[k]}' for k in unused)} take(s) no effect: {why}", stacklevel=3)


_ALIASES_MNIST = {"pmnist": "permuted_mnist", "smnist": "split_mnist"}


def _read(path: Path) -> DictConfig:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        loaded = OmegaConf.load(path)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(loaded, DictConfig):
        found = type(OmegaConf.to_container(loaded)).__name__
        raise ConfigError(f"{path} must hold a mapping of config keys, got {found}")
    if not loaded:  # all defaults, as asked; said, since the defaults are a long run (all of split MNIST)
        warnings.warn(f"{path} holds no config keys: running every default (eidetic train --help lists them)",
                      stacklevel=2)
    return loaded


def _merge(cfg: DictConfig, source: DictConfig, where: str) -> DictConfig:
    # every unknown key at once, with the valid ones (OmegaConf would name only the first)
    unknown = sorted(str(k) for k in source if k not in _FIELD)
    if unknown:
        raise ConfigError(f"unknown config key(s) {', '.join(unknown)}{where}; valid keys: {', '.join(KEYS)} "
                          "(see eidetic --help)")
    try:
        return OmegaConf.merge(cfg, source)
    except TypeError:  # OmegaConf's merge of a list or scalar into a mapping field (model_args) names no key
        for key in source:
            try:
                OmegaConf.merge(cfg, {key: source[key]})
            except (TypeError, ValidationError):
                raise ConfigError(_type_error(_FIELD[key], OmegaConf.to_container(source)[key]) + where) from None
        raise
    except ValidationError as exc:
        key = re.split(r"[.\[]", str(exc.full_key or ""))[0]
        if key not in _FIELD:
            raise ConfigError(f"config{where}: {exc.msg}") from None
        raise ConfigError(_type_error(_FIELD[key], OmegaConf.to_container(source)[key]) + where) from None


def _type_error(field: dataclasses.Field, value) -> str:
    kind, optional = _unwrap_optional(field.type)
    if value is None and not optional:
        default = field.default_factory() if field.default is dataclasses.MISSING else field.default
        return f"{field.name} may not be empty (null); default is {default!r}"
    if typing.get_origin(kind) is Literal:
        return f"{field.name} must be one of {', '.join(typing.get_args(kind))}; got {value!r}"
    return f"{field.name} must be {_kind_words(kind)}, got {value!r}"


def _unwrap_optional(kind) -> tuple[object, bool]:
    args = typing.get_args(kind)
    if typing.get_origin(kind) is typing.Union and type(None) in args:
        return next(a for a in args if a is not type(None)), True
    return kind, False


def _kind_words(kind) -> str:
    if typing.get_origin(kind) in (list, List):
        return "a list of integers"
    if typing.get_origin(kind) in (dict, Dict):
        return "a mapping of names to values (e.g. {depth: 4})"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}[kind]


def keys_help(width: int = 110) -> str:
    """The config keys for ``eidetic --help``: name, default and help text of every field of ``Config``."""
    lines = ["config keys (in FILE.yaml, or as key=value overrides on the command line; overrides win):"]
    for f in OPTIONS:
        value = f.default_factory() if f.default is dataclasses.MISSING else f.default
        default = "unset" if value is None else json.dumps(value)
        lines.append(f"  {f.name} (default {default})")
        lines.append(textwrap.fill(f.metadata["help"], width, initial_indent=" " * 6, subsequent_indent=" " * 6))
    return "\n".join(lines)
