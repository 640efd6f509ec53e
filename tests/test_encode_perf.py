"""The encode pipeline's performance knobs keep results exact: budgets, FLOP counts."""

import torch

from viq.config import tiny_config
from viq.model.viq_model import ViQModel
from viq.nn.flops import count_flops, gpu_peak_flops
from viq.packing import token_budget_for_memory


def test_token_budget_grows_with_memory_and_stays_a_power_of_two():
    small = token_budget_for_memory(1 << 28, 1536, 6144)
    large = token_budget_for_memory(80 << 30, 1536, 6144)
    assert small == 1024 and large > small and large & (large - 1) == 0 and large <= 131072
    # the estimate holds: half of 80 GiB covers the per-token peak (the head's 4 slots) of the budget it picks
    assert large * 4 * 13 * 1536 * 2 <= 40 << 30


def test_flop_count_includes_attention_and_grows_quadratically_with_one_image():
    torch.manual_seed(0)
    model = ViQModel(tiny_config(), parts=("encoder",)).eval()

    def flops(side):
        with torch.inference_mode():
            return count_flops(lambda: model.encode([torch.zeros(3, side, side)]))

    f1, f2 = flops(32), flops(64)  # 4 and 16 patches
    assert f1 > 0 and 4 * f1 < f2  # linear parts scale by 4, attention by 16


def test_known_gpu_peaks():
    assert gpu_peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert gpu_peak_flops("NVIDIA H200") == 989e12
    assert gpu_peak_flops("NVIDIA H100 PCIe") == 756e12
    assert gpu_peak_flops("Some Future GPU") is None
