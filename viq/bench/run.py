"""One bench run: every (LLM, sequence length, mode) of a config, online against offline."""

from __future__ import annotations

import json
import statistics
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from viq.bench.config import SCHEMA, BenchConfig, encoder_config
from viq.bench.measure import free_memory, machine_info, oom_types, stats, time_pair
from viq.bench.workload import (SeqLayout, bench_tokenizer, build_batches, build_llm, n_params, plan_layout, step,
                                template_overhead)


ProgressFn = Callable[[str, int, int], None]  # (what is running, steps done, steps total)
RunFn = Callable[[dict], None]  # one finished configuration's record, as it lands in ``runs``


@dataclass
class BenchPlan:
    """What a resolved config will run, said before it starts."""

    config: BenchConfig  # resolved
    layouts: list[SeqLayout]
    configurations: list[tuple[str, int, str]]  # (llm, seq_len, mode), in run order
    steps: int  # timed + warm-up steps, both setups
    estimate_s: float  # rough wall time (a speed probe times FLOPs per step)


def plan_bench(cfg: BenchConfig, probe: bool = True) -> BenchPlan:
    """Resolve ``cfg`` and lay out its run: configurations, steps and a rough wall time."""
    from viq.bench.estimate import estimate_seconds, probe_flops_per_s
    from viq.mllm.model import Projector
    from viq.tokenizer import resolve_dtype

    cfg = cfg.resolved()
    counter = Projector(8, 8)
    overhead = template_overhead(bench_tokenizer())
    layouts = [plan_layout(s, cfg.image_size, counter.num_tokens, overhead, cfg.images_per_seq) for s in cfg.seq_lens]
    confs = [(name, lay.seq_len, mode) for name in cfg.llms for lay in layouts for mode in cfg.modes]
    steps = len(confs) * 2 * (cfg.warmup + cfg.repeats)
    estimate = 0.0
    if probe:
        with _threads(cfg.threads):
            speed = probe_flops_per_s(cfg.device, resolve_dtype(cfg.dtype, cfg.device))
        estimate = estimate_seconds(cfg, layouts, speed)
    return BenchPlan(cfg, layouts, confs, steps, estimate)


@contextmanager
def _threads(n: Optional[int]):
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@dataclass
class BenchResult:
    machine: dict
    config: dict
    runs: list[dict] = field(default_factory=list)
    extraction: Optional[dict] = None
    #: stopped by Ctrl-C: ``runs`` holds the configurations that finished before it
    interrupted: bool = False

    def to_dict(self) -> dict:
        return {"schema": SCHEMA, "machine": self.machine, "config": self.config, "runs": self.runs,
                "extraction": self.extraction, "interrupted": self.interrupted}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def run_bench(cfg: BenchConfig, progress: Optional[ProgressFn] = None, on_run: Optional[RunFn] = None) -> BenchResult:
    """Measure online vs offline MLLM training for every (LLM, sequence length, mode) of ``cfg``.

    ``progress(label, done, total)`` is called as steps complete, ``on_run(record)`` as each
    configuration finishes. A configuration that runs out of device memory is recorded with
    ``status: "oom"`` and the others still run. Ctrl-C (KeyboardInterrupt) stops the run and returns
    what finished, with ``interrupted`` set, so a long run is never lost whole.
    """
    cfg = cfg.resolved()
    with _threads(cfg.threads):
        return _run_bench(cfg, progress, on_run or (lambda record: None))


def _run_bench(cfg: BenchConfig, progress: Optional[ProgressFn], on_run: RunFn) -> BenchResult:
    from viq.tokenizer import resolve_dtype

    device, dtype = cfg.device, resolve_dtype(cfg.dtype, cfg.device)
    result = BenchResult(machine_info(device, cfg.dtype, cfg.attn), cfg.model_dump(mode="json"))
    try:
        _measure(cfg, progress, on_run, result)
    except KeyboardInterrupt:
        result.interrupted = True
    free_memory(device)
    return result


def _measure(cfg: BenchConfig, progress: Optional[ProgressFn], on_run: RunFn, result: BenchResult) -> None:
    from viq.mllm.model import Projector
    from viq.mllm.offline import OfflineImageEncoder, OnlineImageEncoder, PackedMLLM, collate_packed
    from viq.model.viq_model import ViQModel
    from viq.tokenizer import resolve_dtype

    device, dtype = cfg.device, resolve_dtype(cfg.dtype, cfg.device)
    vcfg = encoder_config(cfg.encoder)
    width = vcfg.vit.width
    counter = Projector(8, 8)  # only for token counts: they depend on the grid alone
    tok = bench_tokenizer()
    overhead = template_overhead(tok)
    layouts = [plan_layout(s, cfg.image_size, counter.num_tokens, overhead, cfg.images_per_seq) for s in cfg.seq_lens]

    steps_per_mode = 2 * (cfg.warmup + cfg.repeats)
    total = len(cfg.llms) * len(layouts) * len(cfg.modes) * steps_per_mode
    total += steps_per_mode // 2 if cfg.include_extraction else 0
    done = [0]

    def tick(label):
        def f():
            done[0] += 1
            if progress:
                progress(label, done[0], total)
        return f

    with torch.random.fork_rng(devices=[]), _workdir(cfg.workdir) as work:
        torch.manual_seed(cfg.seed)
        if progress:
            progress("building data and encoder", 0, total)
        batches = {}
        for lay in layouts:
            rows, report = build_batches(Path(work) / f"seq{lay.seq_len}", lay, cfg.rows, vcfg.head.levels,
                                         counter.num_tokens, cfg.seed)
            g = torch.Generator().manual_seed(cfg.seed)
            w, h = lay.image_size
            pixels = {k: (torch.rand(3, h, w, generator=g) * 2 - 1) for r in rows for k in r.image_keys}
            offline = collate_packed(rows).to(device)
            online = collate_packed(rows, images=[pixels[k] for r in rows for k in r.image_keys]).to(device, dtype)
            batches[lay.seq_len] = (rows, offline, online, report)

        with torch.device(device):  # two models: the online graph must not hold the embedder, nor vice versa
            encoder = ViQModel(vcfg, parts=("encoder",))
            embedder = ViQModel(vcfg, parts=("decoder",))
        encoder = encoder.to(device=device, dtype=dtype).eval().requires_grad_(False)
        embedder = embedder.to(device=device, dtype=dtype).eval().requires_grad_(False)

        if cfg.include_extraction:
            lay = layouts[0]
            imgs = batches[lay.seq_len][2].images

            def extract():
                with torch.inference_mode():
                    encoder.encode(list(imgs))

            label = "extraction (ViT + head encode)"
            t = time_pair({"extract": extract}, device, cfg.warmup, cfg.repeats, tick(label))["extract"]
            per = [x / len(imgs) for x in t["times"]]
            result.extraction = {"encoder": cfg.encoder, "image_size": list(lay.image_size),
                                 "images_per_call": len(imgs), "per_image": stats(per),
                                 "images_per_s": 1.0 / statistics.median(per), "peak_mem_bytes": t["peak"]}

        for name in cfg.llms:
            free_memory(device)
            label = f"LLM {name}: building"
            if progress:
                progress(label, done[0], total)
            try:
                llm = build_llm(name, device, dtype, cfg.attn, max(cfg.seq_lens), cfg.seed, cfg.llm_train,
                                cfg.grad_checkpointing)
            except oom_types() as exc:
                for lay in layouts:
                    for mode in cfg.modes:
                        result.runs.append(_failed(cfg, name, lay, mode, "oom", exc))
                        on_run(result.runs[-1])
                        done[0] += steps_per_mode
                continue
            hidden = llm.get_input_embeddings().embedding_dim
            with torch.device(device):
                projector = Projector(width, hidden, "oryx_mlp_v2", "2x").to(dtype)
            online_model = PackedMLLM(llm, OnlineImageEncoder(encoder.vit, projector, cfg.train_vit)).train()
            offline_model = PackedMLLM(llm, OfflineImageEncoder(embedder, projector)).train()
            params = {id(p): p for m in (online_model, offline_model) for p in m.parameters() if p.requires_grad}
            fused = device.startswith("cuda")
            opt = torch.optim.AdamW(list(params.values()), lr=cfg.lr, fused=fused) if fused else \
                torch.optim.AdamW(list(params.values()), lr=cfg.lr)
            sizes = {"llm_params": n_params(llm), "trainable_params": sum(p.numel() for p in params.values()),
                     "vit_params": n_params(encoder.vit), "embedder_params": n_params(embedder)}
            for lay in layouts:
                rows, off_b, on_b, report = batches[lay.seq_len]
                for mode in cfg.modes:
                    train = mode == "train"
                    label = f"LLM {name}, seq {lay.seq_len}, {mode}"
                    outs = {}

                    def run(model, b, key, optimizer=opt, train=train):  # bound now, not at call time
                        def f():
                            outs[key] = step(model, b, optimizer, train)
                        return f

                    failed = None
                    try:
                        t = time_pair({"online": run(online_model, on_b, "online"),
                                       "offline": run(offline_model, off_b, "offline")},
                                      device, cfg.warmup, cfg.repeats, tick(label))
                    except oom_types() as exc:
                        failed = _failed(cfg, name, lay, mode, "oom", exc)
                    if failed is not None:  # outside the except block: its frames no longer hold tensors
                        opt.zero_grad(set_to_none=True)
                        outs.clear()
                        free_memory(device)
                        result.runs.append(failed)
                        on_run(failed)
                        done[0] = min(total, done[0] + steps_per_mode)
                        continue
                    result.runs.append(_run_record(cfg, name, lay, mode, rows, t, outs, sizes, report,
                                                   result.extraction))
                    on_run(result.runs[-1])
                    outs.clear()
            del online_model, offline_model, opt, params, projector, llm


@contextmanager
def _workdir(path: Optional[str]):
    if path:
        Path(path).mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="viq-bench-") as tmp:
        yield tmp


def _base_record(cfg: BenchConfig, name: str, lay: SeqLayout, mode: str) -> dict:
    return {"llm": name, "seq_len": lay.seq_len, "mode": mode, "encoder": cfg.encoder, "rows": cfg.rows,
            "images_per_seq": lay.n_images, "image_size": list(lay.image_size),
            "vit_tokens_per_image": lay.vit_tokens, "llm_tokens_per_image": lay.image_tokens}


def _failed(cfg, name, lay, mode, status, exc) -> dict:
    rec = _base_record(cfg, name, lay, mode)
    rec.update(status=status, error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
               online=None, offline=None, speedup=None, ratio=None)
    return rec


def _run_record(cfg, name, lay, mode, rows, t, outs, sizes, report, extraction) -> dict:
    rec = _base_record(cfg, name, lay, mode)
    n_tokens = sum(r.length for r in rows)
    rec.update(status="ok", tokens_per_step=n_tokens,
               image_tokens_per_step=sum(r.n_image_tokens for r in rows),
               text_tokens_per_step=sum(r.n_text_tokens for r in rows),
               pad_tokens_per_step=sum(r.n_pad for r in rows),
               supervised_tokens_per_step=outs["offline"].n_supervised,
               same_inputs=outs["online"].n_supervised == outs["offline"].n_supervised
               and outs["online"].n_tokens == outs["offline"].n_tokens)
    kind = "cuda_max_allocated" if cfg.device.startswith("cuda") else "cpu_peak_rss"
    for setup in ("online", "offline"):
        s = stats(t[setup]["times"])
        s.update(tokens_per_s=n_tokens / s["median_s"], peak_mem_bytes=t[setup]["peak"],
                 mem_before_bytes=t[setup]["before"], mem_kind=kind,
                 loss=float(outs[setup].loss.detach().float()))
        rec[setup] = s
    on, off = rec["online"]["median_s"], rec["offline"]["median_s"]
    rec["speedup"] = (on - off) / on  # the paper's definition
    rec["ratio"] = on / off
    rec.update(sizes)
    rec.update(report)
    rec["break_even_epochs"] = None
    if extraction and mode == "train" and on > off:
        saved_per_image = (on - off) / (lay.n_images * cfg.rows)
        rec["break_even_epochs"] = extraction["per_image"]["median_s"] / saved_per_image
    return rec
