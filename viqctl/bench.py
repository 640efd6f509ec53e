"""viqctl bench: MLLM training speed with offline codes vs a continuous ViT in the loop."""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from viqctl.common import DebugOpt, DeviceOpt, DtypeOpt, JsonOpt
from viqctl.console import cli_errors, err, note, out, print_json, progress_lines


def _gib(n) -> str:
    return "-" if n is None else f"{n / 2**30:.2f}"


def _ms(s: dict) -> str:
    return f"{1e3 * s['median_s']:.0f} ±{1e3 * s['iqr_s'] / 2:.0f}"


def bench(
    seq: Optional[str] = typer.Option(None, "--seq", help="Packed sequence lengths in tokens: 4k = 4096, "
                                      "16k = 16384, 16000 = 16000 (echoed before the run). Default: 4k,8k,16k on a "
                                      "GPU, 1k,2k,4k on CPU."),
    llm: Optional[str] = typer.Option(None, "--llm", help="LLM sizes from the real Qwen2.5 configs with random "
                                      "weights: 0.5b, 1.5b, 3b, 7b, or tiny (CPU). Default: 0.5b,1.5b,3b,7b on a "
                                      "GPU, tiny on CPU."),
    encoder: Optional[str] = typer.Option(None, "--encoder", help="giant (SigLIP2 g/16, the paper's), so400m, or "
                                          "tiny (CPU). Default: giant on a GPU, tiny on CPU."),
    images_per_seq: Optional[int] = typer.Option(None, "--images-per-seq", help="Images per packed sequence "
                                                 "(one per sample). Default: auto, images fill ~40% of the "
                                                 "positions (2 per 4K at 896x896)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Image size, 896 or WxH (multiples of 16). "
                                             "Default: 896 on a GPU (the reference's default resize area: 3136 "
                                             "ViT patches, 814 LLM tokens), 448 on CPU."),
    rows: int = typer.Option(1, "--rows", help="Packed sequences per step."),
    mode: str = typer.Option("both", "--mode", help="forward (no_grad), train (forward + backward + AdamW), or both."),
    repeats: Optional[int] = typer.Option(None, "--repeats", help="Timed steps per setup (default 5)."),
    warmup: Optional[int] = typer.Option(None, "--warmup",
                                         help="Untimed steps per setup first (default 2 GPU, 1 CPU)."),
    include_extraction: bool = typer.Option(False, "--include-extraction",
                                            help="Also time the one-time code extraction (ViT + head encode) per "
                                                 "image, and the epochs after which it pays off."),
    train_vit: bool = typer.Option(False, "--train-vit", help="Online setup trains the ViT too (default: frozen "
                                   "ViT under no_grad, LLM + projector trainable, as LLaVA's instruction tuning)."),
    llm_train: str = typer.Option("full", "--llm-train", help="full (whole LLM trains), lora or dora (r=64 on all "
                                  "linear layers, base frozen, as the ViQ reference)."),
    grad_ckpt: bool = typer.Option(True, "--grad-ckpt/--no-grad-ckpt", help="Gradient checkpointing in the LLM."),
    attn: str = typer.Option("auto", "--attn", help="LLM attention: auto (flash_attention_2 on CUDA when installed, "
                             "else varlen_sdpa: SDPA per packed sample), flash_attention_2, varlen_sdpa, sdpa "
                             "(one masked LxL SDPA per row), eager."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    workdir: Optional[Path] = typer.Option(None, "--workdir", help="Keep the generated conversations and code "
                                           "store here (default: a temp folder, removed)."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write grouped bars (speed-up per LLM size and "
                                        "sequence length, like the paper's figure) to this PNG (needs matplotlib)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads (default on CPU: 1, the fastest and "
                                          "steadiest for the scaled-down models; on a GPU machine: torch's)."),
    seed: int = typer.Option(0, "--seed"),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Measure the offline-codes speed-up of MLLM training, as the paper's figure does.

    Both setups train the same LLM + projector on the same packed batches: online, pixels go through a
    continuous SigLIP2 ViT (LLaVA-style); offline, codes read from a code store go through the frozen
    ViQ embedder. Speed-up = (t_online - t_offline) / t_online, from medians over alternating repeats.

    Example (CPU, tiny models: 6 configurations, 1 warm-up + 5 timed steps per setup, about a minute
    on 2 cores): viqctl bench

    Before it starts it says what it will run and roughly how long; a line per finished configuration
    follows. Ctrl-C stops it and prints (or --json writes) the configurations that finished.

    Example (GPU): viqctl bench --seq 4k,16k --llm 0.5b,1.5b --json > bench.json

    Example (the paper's figure, on a GPU): viqctl bench --include-extraction --plot speedup.png

    Exit 0 when every configuration ran, 1 when some ran out of memory (listed), 2 for usage errors.
    """
    from viq.bench import bench_config, parse_seq, plan_bench, plot_result, run_bench
    from viq.errors import ConfigError

    with cli_errors(debug):
        if mode not in ("forward", "train", "both"):
            raise ConfigError(f"--mode {mode}: use forward, train or both")
        cfg = bench_config(
            seq_lens=parse_seq(seq) if seq else None,
            llms=[s.strip().lower() for s in llm.split(",")] if llm else None,
            encoder=encoder, images_per_seq=images_per_seq, image_size=image_size, rows=rows,
            modes=["forward", "train"] if mode == "both" else [mode], repeats=repeats, warmup=warmup,
            include_extraction=include_extraction, train_vit=train_vit, llm_train=llm_train,
            grad_checkpointing=grad_ckpt, device=device, dtype=dtype, attn=attn, seed=seed, threads=threads,
            workdir=str(workdir) if workdir else None)
        if plot is not None and importlib.util.find_spec("matplotlib") is None:  # fail before the long run
            raise ConfigError("--plot needs matplotlib: pip install 'viq[plot]'")
        plan = plan_bench(cfg)
        cfg = plan.config
        _say_plan(plan)
        n = len(plan.configurations)
        start = time.perf_counter()

        def finished(r: dict) -> None:
            k = len(finished.runs) + 1
            finished.runs.append(r)
            what = f"[{k}/{n}] {r['llm']} seq {_seq(r['seq_len'])} {r['mode']}"
            if r["status"] != "ok":
                err.print(f"{what}: {r['status']} ({r['error']})", highlight=False, markup=False)
                return
            err.print(f"{what}: online {_ms(r['online'])} ms, offline {_ms(r['offline'])} ms, speed-up "
                      f"{100 * r['speedup']:.1f}% ({r['ratio']:.2f}x); {time.perf_counter() - start:.0f} s so far",
                      highlight=False, markup=False)
        finished.runs = []

        columns = [TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("{task.description}")]
        with Progress(*columns, console=err, transient=True, disable=progress_lines()) as bar:
            task = bar.add_task("", total=None)

            def progress(label, done, total):
                bar.update(task, description=label, completed=done, total=total)

            result = run_bench(cfg, progress, finished)
        data = result.to_dict()
        if plot is not None and data["runs"]:
            plot_result(result, plot)
            err.print(f"plot written to {plot}", highlight=False)
        if json_out:
            print_json(data)
        elif data["runs"]:
            _print_table(data)
        if result.interrupted:
            note(f"stopped by Ctrl-C after {len(data['runs'])} of {n} configuration(s), "
                 f"{time.perf_counter() - start:.0f} s; the finished ones are " +
                 ("in the JSON above" if json_out else "shown above"), "interrupted")
            raise typer.Exit(130)
        unsteady = [r for r in data["runs"] if r["status"] == "ok" and any(
            r[k]["iqr_s"] > 0.2 * r[k]["median_s"] for k in ("online", "offline"))]
        if unsteady and cfg.device == "cpu" and cfg.threads != 1:
            err.print(f"[yellow]warning:[/] {len(unsteady)} configuration(s) timed unsteadily (interquartile range "
                      "> 20% of the median): the CPU may be busy with other work; --threads 1 gives steadier numbers")
        failed = [r for r in data["runs"] if r["status"] != "ok"]
        for r in failed:
            err.print(f"[yellow]{r['llm']} seq {r['seq_len']} {r['mode']}: {r['status']} ({r['error']})[/]")
        if failed:
            raise typer.Exit(1)


def _seq(n: int) -> str:
    """1024 -> "1k (1024)", 16000 -> "16000": what --seq 1k and --seq 16000 each run."""
    return f"{n // 1024}k ({n})" if n % 1024 == 0 else str(n)


def _say_plan(plan) -> None:
    cfg = plan.config
    seqs = ", ".join(_seq(s) for s in cfg.seq_lens)
    images = "/".join(str(lay.n_images) for lay in plan.layouts)
    threads = f", {cfg.threads} CPU thread(s)" if cfg.device == "cpu" else ""
    extraction = " + the one-time extraction" if cfg.include_extraction else ""
    err.print(f"bench on {cfg.device} ({cfg.dtype}{threads}, attention {cfg.attn}): LLM {','.join(cfg.llms)}, "
              f"encoder {cfg.encoder}, seq {seqs} tokens, {images} image(s) of {cfg.image_size[0]}x"
              f"{cfg.image_size[1]} per sequence, modes {','.join(cfg.modes)}", highlight=False, markup=False)
    err.print(f"plan: {len(plan.configurations)} configuration(s){extraction}, each {cfg.warmup} warm-up + "
              f"{cfg.repeats} timed step(s) per setup (online and offline): {plan.steps} steps, about "
              f"{_duration(plan.estimate_s)} (rough estimate); Ctrl-C keeps the finished configurations",
              highlight=False, markup=False)


def _duration(s: float) -> str:
    if s < 90:
        return f"{max(5, round(s / 5) * 5):.0f} s"
    if s < 5400:
        return f"{s / 60:.0f} min"
    return f"{s / 3600:.1f} h"


def _print_table(data: dict) -> None:
    from rich import box

    m = data["machine"]
    table = Table(box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  title=f"online ({data['config']['encoder']} ViT in the loop) vs offline (codes)\n"
                        f"{m['device_name']} · {m['dtype']} · {m['attn_implementation']} · torch {m['torch']} · "
                        f"transformers {m['transformers']}")
    for col in ("LLM", "seq", "mode", "img", "online ms", "offline ms", "speed-up", "ratio", "GiB on|off"):
        table.add_column(col, justify="left" if col in ("LLM", "mode") else "right", no_wrap=True)
    for r in data["runs"]:
        seq = f"{r['seq_len'] // 1024}K" if r["seq_len"] % 1024 == 0 else str(r["seq_len"])
        head = [r["llm"], seq, "fwd" if r["mode"] == "forward" else r["mode"], str(r["images_per_seq"])]
        if r["status"] != "ok":
            table.add_row(*head, r["status"], "", "", "", "")
            continue
        on, off = r["online"], r["offline"]
        table.add_row(*head, _ms(on), _ms(off), f"{100 * r['speedup']:.1f}%", f"{r['ratio']:.2f}x",
                      f"{_gib(on['peak_mem_bytes'])}|{_gib(off['peak_mem_bytes'])}")
    out.print(table)
    out.print("tokens/s (online -> offline): " + ", ".join(
        f"{r['llm']} {r['seq_len']} {r['mode']} "
        f"{r['online']['tokens_per_s']:,.0f} -> {r['offline']['tokens_per_s']:,.0f}"
        for r in data["runs"] if r["status"] == "ok"), highlight=False)
    ex = data.get("extraction")
    if ex:
        out.print(f"one-time extraction ({ex['encoder']}, {ex['image_size'][0]}x{ex['image_size'][1]}): "
                  f"{1e3 * ex['per_image']['median_s']:.1f} ms per image ({ex['images_per_s']:.1f} images/s)",
                  highlight=False)
        for r in data["runs"]:
            if r.get("break_even_epochs") is not None:
                out.print(f"  {r['llm']} seq {r['seq_len']}: pays off after {r['break_even_epochs']:.2f} epoch(s)",
                          highlight=False)
    out.print("speed-up = (t_online - t_offline) / t_online, and t_online / t_offline; ms: median ± half the "
              "interquartile range; GiB: " + ("CUDA max allocated" if m["device"].startswith("cuda")
                                              else "peak process RSS") + " during the step", highlight=False)
