"""Frozen targets: cached values equal recomputed ones bit for bit, on the host, within a byte budget."""

import torch
import torch.nn as nn

from viq.train.targets import FrozenTargets


class CountingTeacher(nn.Module):
    """A stand-in teacher: one pooled feature per image, counting its calls."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(3, 8)
        self.calls = 0

    def forward(self, images):
        self.calls += len(images)
        return torch.stack([self.proj(im.mean(dim=(1, 2))) for im in images])


def test_cache_is_exact_on_host_and_bounded():
    torch.manual_seed(0)
    teacher = CountingTeacher()
    images = [torch.rand(3, 16, 16 + 16 * i) for i in range(3)]
    keys = [("train", i, 0) for i in range(3)]
    one = 8 * 4  # bytes of one float32 feature
    targets = FrozenTargets(teacher, None, patch=16, cache_bytes=2 * one)
    first = targets.teacher_features(images, keys)
    assert teacher.calls == 3
    again = targets.teacher_features(images, keys)
    assert teacher.calls == 4  # two came from the cache; the third did not fit the budget
    assert torch.equal(first, again)
    assert all(v.device.type == "cpu" for v in targets._teacher.values()) and len(targets._teacher) == 2
    off = FrozenTargets(teacher, None, patch=16, cache_bytes=0)
    off.teacher_features(images, keys)
    off.teacher_features(images, keys)
    assert teacher.calls == 10 and not off._teacher
