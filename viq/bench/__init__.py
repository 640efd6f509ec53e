"""How much faster MLLM training gets on offline codes: the paper's speed-up, measured.

Two setups train the same LLM + projector on the same packed batches (same text, same number and
sizes of images, same positions):

* online  (LLaVA-style): pixels -> continuous any-res SigLIP2 ViT -> projector -> LLM;
* offline (ViQ): codes read from a code store -> frozen ViQ embedder -> projector -> LLM.

The offline side is the real training path of ``viq.mllm.offline``: a conversation file and a code
store are written to a work folder, read back through ``OfflineConversationDataset`` and packed by
``pack_items``. Optionally the one-time extraction (ViT + head encode) is timed per image, so its
cost can be amortised (``break_even_epochs``).

Honest timing: the same process times both setups alternately (ABBA order, so drift and ordering
hit both), after warm-up steps, with device synchronisation around every step; the median and the
spread over repeats, the peak memory and tokens/s are reported. LLMs are built from the real
Qwen2.5 configurations with random weights (no downloads): timing does not depend on the values.
"""

from viq.bench.config import (LLM_NAMES, QWEN25, SCHEMA, BenchConfig, bench_config, encoder_config, parse_seq,
                              parse_size, qwen2_config)
from viq.bench.plot import plot_result
from viq.bench.run import BenchPlan, BenchResult, ProgressFn, plan_bench, run_bench
from viq.bench.workload import SeqLayout, bench_tokenizer, build_batches, plan_layout, template_overhead

__all__ = ["LLM_NAMES", "QWEN25", "SCHEMA", "BenchConfig", "BenchPlan", "BenchResult", "ProgressFn", "SeqLayout",
           "bench_config", "bench_tokenizer", "plan_bench", "build_batches", "encoder_config", "parse_seq", "parse_size", "plan_layout",
           "plot_result", "qwen2_config", "run_bench", "template_overhead"]
