"""A small synthetic multi-task problem for the data-based merging methods (the one of test_calm's
``test_calm_beats_ta_and_ties_on_heldout``, as a reusable builder).

Four 4-class tasks on 32-d inputs; task t's inputs live in coordinates [8t, 8t+8) and its labels are a
random linear rule of them; fixed random heads on normalised features (the CLIP convention).  Each task is
fine-tuned from the same random θ0 with Adam, so its first-layer change is localised and the shared
second layer interferes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import nn

from calm_fast.models import GenericAdapter, accuracy

D, H, FD, C, T = 32, 32, 16, 4, 4


class Encoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(D, H)
        self.fc2 = nn.Linear(H, FD)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


@dataclass
class Problem:
    adapter: GenericAdapter
    names: List[str]
    pretrained: Dict[str, torch.Tensor]
    finetuned: List[Dict[str, torch.Tensor]]
    unlabeled: Dict[str, torch.Tensor]
    test: Dict[str, torch.Tensor]
    labels: Callable[[int, torch.Tensor], torch.Tensor]

    def eval_data(self):
        return {n: (self.test[n], self.labels(t, self.test[n])) for t, n in enumerate(self.names)}

    def mean_accuracy(self, sd) -> float:
        params = {k: sd[k] for k in self.adapter.param_names()}
        return sum(accuracy(self.adapter, params, n, self.test[n], self.labels(t, self.test[n]))
                   for t, n in enumerate(self.names)) / len(self.names)


def localized_tasks(seed: int = 1, finetune_steps: int = 200, unlabeled: int = 400) -> Problem:
    B = D // T
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed - 1)
    net = Encoder()
    heads = [nn.Linear(FD, C).requires_grad_(False) for _ in range(T)]
    names = [f"t{i}" for i in range(T)]

    def inputs(t, n):
        x = torch.zeros(n, D)
        x[:, t * B:(t + 1) * B] = torch.randn(n, B, generator=g)
        return x

    rules = [torch.randn(C, D, generator=g) for _ in range(T)]

    def labels(t, x):
        return (x @ rules[t].T).argmax(1)

    train = {n: inputs(t, 2000) for t, n in enumerate(names)}
    unl = {n: inputs(t, unlabeled) for t, n in enumerate(names)}
    test = {n: inputs(t, 1000) for t, n in enumerate(names)}
    pre = {k: v.detach().clone() for k, v in net.state_dict().items()}
    fts = []
    for t, n in enumerate(names):
        m = Encoder()
        m.load_state_dict(pre)
        opt = torch.optim.Adam(m.parameters(), lr=3e-3)
        x, y = train[n], labels(t, train[n])
        for _ in range(finetune_steps):
            idx = torch.randint(0, 2000, (128,), generator=g)
            f = m(x[idx])
            loss = F.cross_entropy(heads[t](f / f.norm(dim=-1, keepdim=True)), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        fts.append({k: v.detach().clone() for k, v in m.state_dict().items()})
    adapter = GenericAdapter(net, dict(zip(names, heads)), normalize_features=True)
    return Problem(adapter=adapter, names=names, pretrained=pre, finetuned=fts, unlabeled=unl, test=test,
                   labels=labels)
