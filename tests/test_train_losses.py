"""Loss terms, codebook statistics, optimizer groups and the LR schedule."""

import math

import torch

from viq.train.optim import make_scheduler, param_groups
from viq.train.losses import CodebookUsage, distill_loss, latent_mse, weighted_total
from viq.train.recipe.sections import ScheduleSection


def test_distill_is_one_minus_cosine():
    s = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    t = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(distill_loss(s, t), torch.tensor(0.5))  # (0 + 1) / 2
    distill_loss(s, t).backward()
    assert s.grad is not None


def test_latent_mse_averages_per_image():
    p = [torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 4, 4)]
    t = [torch.ones(1, 2, 2, 2), torch.full((1, 2, 4, 4), 3.0)]
    assert torch.allclose(latent_mse(p, t), torch.tensor((1.0 + 9.0) / 2))


def test_weighted_total_skips_zero_weights():
    terms = {"a": torch.tensor(2.0), "b": torch.tensor(5.0)}
    assert float(weighted_total(terms, {"a": 10.0, "b": 0.0})) == 20.0


def test_codebook_usage_and_perplexity():
    u = CodebookUsage(8)
    u.update(torch.tensor([0, 1, 2, 3]))
    s = CodebookUsage.stats(u.counts)
    assert s["codebook_used"] == 0.5 and math.isclose(s["codebook_perplexity"], 4.0)
    u.update(torch.tensor([0, 0, 0, 0]))
    assert CodebookUsage.stats(u.counts)["codebook_perplexity"] < 4.0
    u.reset()
    assert CodebookUsage.stats(u.counts) == {"codebook_used": 0.0, "codebook_perplexity": 0.0}


def test_no_weight_decay_on_biases_norms_and_vectors():
    model = torch.nn.Module()
    model.lin = torch.nn.Linear(4, 4)
    model.norm = torch.nn.LayerNorm(4)
    model.pos_embed = torch.nn.Parameter(torch.zeros(1, 9, 4))
    model.frozen = torch.nn.Linear(4, 4).requires_grad_(False)
    decay, no_decay = param_groups(model, 0.1)
    assert decay["weight_decay"] == 0.1 and [p.shape for p in decay["params"]] == [(4, 4)]
    assert no_decay["weight_decay"] == 0.0 and len(no_decay["params"]) == 4  # bias, LN weight+bias, pos_embed


def test_schedule_warmup_cosine_floor():
    s = ScheduleSection(warmup_steps=2, min_lr_ratio=0.1)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = make_scheduler(opt, s, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:])) and lrs[-1] >= 0.1
