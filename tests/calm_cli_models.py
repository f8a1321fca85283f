"""Small models built in code for tests/test_cli_calm.py, and the module:function entry points its configs
name (the generic adapter; data)."""
from pathlib import Path

import torch
from torch import nn

from calm_fast.io import load_state_dict, save_state_dict
from calm_fast.models import GenericAdapter, LoadedModels

TASKS = ("a", "b", "c")
CLASSES = {"a": 3, "b": 4, "c": 3}
DIM_IN, DIM_H, DIM_F = 6, 16, 8


def encoder() -> nn.Module:
    return nn.Sequential(nn.Linear(DIM_IN, DIM_H), nn.Tanh(), nn.Linear(DIM_H, DIM_F)).eval()


def write_problem(root: Path, n: int = 40, seed: int = 0) -> dict:
    """base.safetensors (the encoder), per task ft_<t>.safetensors (encoder + head.weight), data_<t>.pt (an
    [n, 6] tensor), eval_<t>.pt ({x, labels}).  Returns the paths."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    enc = encoder()
    base = {k: v.detach().clone() for k, v in enc.state_dict().items()}
    save_state_dict(base, root / "base.safetensors")
    paths = {"base": str(root / "base.safetensors")}
    for i, t in enumerate(TASKS):
        ft = {k: v + 0.3 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        ft["head.weight"] = torch.randn(CLASSES[t], DIM_F, generator=g) * 3
        save_state_dict(ft, root / f"ft_{t}.safetensors")
        torch.save(torch.randn(n, DIM_IN, generator=g), root / f"data_{t}.pt")
        torch.save({"x": torch.randn(20, DIM_IN, generator=g),
                    "labels": torch.randint(0, CLASSES[t], (20,), generator=g)}, root / f"eval_{t}.pt")
        paths[t] = str(root / f"ft_{t}.safetensors")
    return paths


def build(base, models, tasks, device=None):
    """Adapter entry point: the generic adapter over the encoder, each task's head from its checkpoint."""
    enc = encoder()
    enc.load_state_dict(load_state_dict(base))
    sds = {t: load_state_dict(models[t]) for t in tasks}
    heads = {t: sds[t].pop("head.weight") for t in tasks}
    adapter = GenericAdapter(enc, heads)
    names = adapter.param_names()
    pre = {k: enc.state_dict()[k].clone() for k in names}
    return LoadedModels(adapter, pre, [{k: sds[t][k] for k in names} for t in tasks])


def adapter_only(base, models, tasks):
    """Adapter entry point returning only the adapter (the CLI reads the tensors from the checkpoints)."""
    return build(base, models, tasks).adapter


def unlabeled(task, n=30):
    """Data entry point: deterministic unlabeled inputs per task."""
    g = torch.Generator().manual_seed(100 + TASKS.index(task))
    return torch.randn(n, DIM_IN, generator=g)


def broken(task):
    raise RuntimeError("the data server is down")
