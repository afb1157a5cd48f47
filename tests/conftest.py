"""Shared fixtures: a tiny, fast recipe on the bundled digits."""

import copy

import pytest
import torch

TINY = {
    "name": "tiny",
    "data": {"dataset": "digits", "split": "all", "image_size": 8, "batch_size": 256,
             "augment": {"crop_scale": [0.6, 1.0], "hflip": False}},
    "model": {"backbone": "resnet18_cifar", "backbone_kwargs": {"channels": [8, 16, 16, 32]}},
    "optim": {"lr": 0.05, "lr_scaling": "none"},
    "schedule": {"epochs": 2, "warmup_epochs": 1},
    "e_step": {"k": 10},
    "run": {"seed": 0, "progress": False, "log_every": 2},
    "plugins": {
        "byol_target": {"hidden_dim": 32, "out_dim": 16},
        "kmeans_e_step": {"n_init": 1, "max_iter": 20},
        "diffused_sampling": {},
        "prototype_aggregation": {},
    },
}


@pytest.fixture
def tiny_recipe_data():
    """A plain-dict recipe that trains ProPos on digits in a few seconds per epoch."""
    return copy.deepcopy(TINY)


@pytest.fixture
def restore_threads():
    """The trainer sets process-wide torch settings: put them back for the other tests."""
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
