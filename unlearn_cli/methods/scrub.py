"""`scrub`: SCRUB, a student that obeys the original model on retain and disobeys it on forget.

The student starts as the original model, which stays frozen as the teacher. Each epoch may begin
with a max-pass over the forget set that pushes the student's predictions away from the teacher's
(ascent on their KL divergence), then always makes a min-pass over the retain set that pulls them
back together while fitting the labels:

    max-step (forget):  minimise  -KL(teacher || student)
    min-step (retain):  minimise  alpha * KL(teacher || student) + gamma * CE(student, y)

with both KLs between temperature-softened softmaxes (times T^2, as in knowledge distillation).
Max-passes stop after `max_epochs`; the remaining min-passes repair the utility the ascent cost.
At the start the student equals the teacher, where the KL has zero gradient: the first max-pass
does almost nothing, and forgetting starts once the min-pass has moved the student.

Source: Kurmanji, Triantafillou, Hayes and Triantafillou, "Towards Unbounded Machine Unlearning",
NeurIPS 2023 (arXiv:2302.09880), Algorithm 1. Defaults: the authors' large-scale CIFAR-10
notebook (SGD with momentum 0.9, weight decay 5e-4, 3 epochs with max-passes in the first 2,
alpha 0.001, gamma 0.99, T = 4, constant learning rate), the learning rate adapted to digits.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.nn import functional as F

from ..training import SGD
from .api import UnlearnData, logits


@dataclasses.dataclass(frozen=True)
class Params:
    epochs: int = 3  # min-passes over the retain set (authors: 3)
    max_epochs: int = 2  # of those, how many are preceded by a max-pass over forget (authors: 2)
    alpha: float = 0.001  # weight of KL(teacher || student) on retain (authors: 0.001)
    gamma: float = 0.99  # weight of the retain cross-entropy (authors: 0.99)
    temperature: float = 4.0  # softmax temperature of both KL terms (authors: 4)
    batch_size: int = 64  # examples per step, both passes (authors: 256 retain, 512 forget)
    # Constant learning rate. The authors' 5e-4 over ~470 ResNet-18 steps does not move the
    # digits MLP in its ~60 steps; 0.06 is the digits calibration (see methods/__init__.py).
    lr: float = 0.06
    momentum: float = 0.9  # plain (heavy-ball) momentum, as the authors' torch.optim.SGD
    weight_decay: float = 5e-4


def distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float
               ) -> torch.Tensor:
    """KL(teacher || student) of softened softmaxes, mean over the batch, times T^2.

    Logits [B, C]. The T^2 keeps gradient magnitudes comparable across temperatures (Hinton et
    al., 2015), as in the authors' DistillKL.
    """
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    log_t = F.log_softmax(teacher_logits / temperature, dim=1)
    kl = (log_t.exp() * (log_t - log_s)).sum(dim=1).mean()
    return kl * temperature**2


def unlearn(model: nn.Module, data: UnlearnData, params: Params, *, device, seed: int) -> nn.Module:
    # The teacher is the frozen original (in eval mode): its logits are computed once.
    teacher_forget = logits(model, data.forget_x)
    teacher_retain = logits(model, data.retain_x)
    opt = SGD(list(model.parameters()), lr=params.lr, momentum=params.momentum,
              weight_decay=params.weight_decay, nesterov=False)
    gen = torch.Generator().manual_seed(seed)
    t = params.temperature

    def steps(n: int):
        order = torch.randperm(n, generator=gen).to(data.forget_x.device)
        return (order[i : i + params.batch_size] for i in range(0, n, params.batch_size))

    model.train()
    for epoch in range(params.epochs):
        if epoch < params.max_epochs:
            for idx in steps(len(data.forget_y)):
                loss = -distill_kl(model(data.forget_x[idx]), teacher_forget[idx], t)
                opt.zero_grad()
                loss.backward()
                opt.step()
        for idx in steps(len(data.retain_y)):
            out = model(data.retain_x[idx])
            loss = (params.gamma * F.cross_entropy(out, data.retain_y[idx])
                    + params.alpha * distill_kl(out, teacher_retain[idx], t))
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.eval()
    return model
