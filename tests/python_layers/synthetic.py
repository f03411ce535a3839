"""Small synthetic continual-learning tasks and tiny bodies for the trainer tests.

Each task t has its own random 1x8x8 pattern per class (class-dependent means); a sample is its class
pattern plus Gaussian noise. Tasks are learnable (the patterns are far apart in 64 dimensions compared with
the noise) and distinct (every task draws its own patterns), so a router can tell them apart.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from eidetic_kernels import EideticLinear

IMAGE_SHAPE = (1, 8, 8)
CLASSES = 3
CHANCE = 1 / CLASSES


@pytest.fixture(autouse=True)
def single_thread():
    """These models are tiny: one intra-op thread is faster, and on a shared 2-core machine several threads
    spin against the other processes (we measured minutes instead of seconds). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Batches:
    """An in-memory loader of (x, y) batches, reshuffled every epoch by its own generator."""

    def __init__(self, x, y, batch_size, shuffle=True, seed=0):
        self.x, self.y, self.batch_size, self.shuffle = x, y, batch_size, shuffle
        self.generator = torch.Generator().manual_seed(seed)

    def __len__(self):
        return (self.x.shape[0] + self.batch_size - 1) // self.batch_size

    def state_dict(self):
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state):
        self.generator.set_state(state["generator"])

    def __iter__(self):
        n = self.x.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        for i in range(0, n, self.batch_size):
            idx = order[i:i + self.batch_size]
            yield self.x[idx], self.y[idx]


def make_tasks(num_tasks=3, train_per_class=64, test_per_class=32, noise=1.0, seed=0, batch_size=32):
    """[(train loader, test x, test y)] per task."""
    g = torch.Generator().manual_seed(1000 + seed)
    tasks = []
    for t in range(num_tasks):
        patterns = torch.randn((CLASSES,) + IMAGE_SHAPE, generator=g)

        def draw(per_class):
            y = torch.arange(CLASSES).repeat_interleave(per_class)
            x = patterns[y] + noise * torch.randn((y.numel(),) + IMAGE_SHAPE, generator=g)
            return x, y

        x_train, y_train = draw(train_per_class)
        x_test, y_test = draw(test_per_class)
        tasks.append((Batches(x_train, y_train, batch_size, seed=seed * 10 + t), x_test, y_test))
    return tasks


def mlp_body(eidetic=True, width=24, dropout=0.1):
    """Flatten -> Linear -> ReLU -> Dropout -> Linear -> ReLU (Eidetic layers, or plain nn to be converted)."""
    linear = EideticLinear if eidetic else nn.Linear
    body = nn.Sequential(nn.Flatten(), linear(64, width), nn.ReLU(), nn.Dropout(dropout), linear(width, width),
                         nn.ReLU())
    return body, width


def cnn_body(channels=8, width=24):
    """Conv -> BN -> ReLU -> MaxPool -> Flatten -> Linear -> ReLU (plain nn layers, converted)."""
    body = nn.Sequential(nn.Conv2d(1, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(channels * 16, width), nn.ReLU())
    return body, width


class Block(nn.Module):
    """A basic residual block whose skip is a projection (1x1 conv + BN): f(x) + g(x)."""

    def __init__(self, c_in, c_out, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.proj = nn.Conv2d(c_in, c_out, 1, stride, bias=False)
        self.proj_bn = nn.BatchNorm2d(c_out)

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.proj_bn(self.proj(x)))


class TinyResNet(nn.Module):
    def __init__(self, stem=8, width=12):
        super().__init__()
        self.stem = nn.Conv2d(1, stem, 3, 1, 1, bias=False)
        self.stem_bn = nn.BatchNorm2d(stem)
        self.block = Block(stem, width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        x = torch.relu(self.stem_bn(self.stem(x)))
        return torch.flatten(self.pool(self.block(x)), 1)


def resnet_body(stem=16, width=24):
    return TinyResNet(stem, width), width


BODIES = {"mlp": mlp_body, "cnn": cnn_body, "resnet": resnet_body}


def accuracy(model, x, y, task):
    model.eval()
    with torch.no_grad():
        return float((model(x, task=task).argmax(-1) == y).float().mean())
