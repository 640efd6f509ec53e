"""The paper's figure from a bench result: speed-up per LLM size and sequence length."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from viq.errors import ConfigError


def plot_result(result, path, modes: Optional[list[str]] = None) -> Path:
    """Grouped bars like the paper's figure: per LLM size, one bar per sequence length, height = speed-up %.

    One panel per mode (forward, train) measured, or those in ``modes``. Needs matplotlib.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise ConfigError("plotting needs matplotlib: pip install 'viq[plot]' (or pip install matplotlib)") from None
    data = result.to_dict() if hasattr(result, "to_dict") else result
    ok = [r for r in data["runs"] if r["status"] == "ok"]
    modes = modes or [m for m in ("forward", "train") if any(r["mode"] == m for r in ok)] or ["train"]
    llms = list(dict.fromkeys(r["llm"] for r in data["runs"]))
    seqs = sorted({r["seq_len"] for r in data["runs"]})
    panel_w = max(3.2, 0.9 + 0.45 * len(llms) * len(seqs))
    fig, axes = plt.subplots(1, len(modes), figsize=(panel_w * len(modes), 3.8), dpi=150, squeeze=False,
                             sharey=True)
    width = 0.8 / max(1, len(seqs))
    for ax, mode in zip(axes[0], modes):
        for j, s in enumerate(seqs):
            xs, ys = [], []
            for i, name in enumerate(llms):
                hit = [r for r in ok if r["mode"] == mode and r["llm"] == name and r["seq_len"] == s]
                if hit:
                    xs.append(i + (j - (len(seqs) - 1) / 2) * width)
                    ys.append(100 * hit[0]["speedup"])
            label = f"{s // 1024}K" if s % 1024 == 0 else str(s)
            bars = ax.bar(xs, ys, width, label=label)
            for b, y in zip(bars, ys):
                ax.annotate(f"{y:.0f}%", (b.get_x() + b.get_width() / 2, y), ha="center",
                            va="bottom" if y >= 0 else "top", fontsize=7)
        ax.set_xticks(range(len(llms)), [n.upper() if n[0].isdigit() else n for n in llms])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title("training step" if mode == "train" else "forward only", fontsize=9)
        ax.legend(title="sequence", fontsize=7, title_fontsize=7)
    top = max([100 * r["speedup"] for r in ok] + [1.0])
    axes[0][0].set_ylim(top=1.35 * top)  # room for the legend above the bars
    axes[0][0].set_ylabel("speed-up of offline codes [%]")
    m = data["machine"]
    fig.suptitle(f"(t_online - t_offline) / t_online, {data['config']['encoder']} ViT in the loop vs codes\n"
                 f"{m['device_name']}, {m['dtype']}, {m['attn_implementation']}", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
