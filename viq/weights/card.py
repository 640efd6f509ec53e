"""A model card (README.md) for every weights folder viq writes, like ``save_pretrained`` output:
what the weights are, where they came from (the source checkpoint's digest), the FSQ levels, and
how to load them. Built only from the metadata that ``config.json`` records."""

from __future__ import annotations

import json
import math
import os
import tempfile
from pathlib import Path

from viq.weights.io import publish

CARD = "README.md"


def _cell(value) -> str:
    text = value if isinstance(value, str) else json.dumps(value)
    return text.replace("|", "\\|").replace("\n", " ")


def model_card(meta: dict, folder_name: str = "path/to/this-folder") -> str:
    """The card's Markdown for a ``config.json`` dict (``format: viq-weights``)."""
    model = meta.get("model") or {}
    head, vit = model.get("head") or {}, model.get("vit") or {}
    levels = list(head.get("levels") or [])
    size = math.prod(levels) if levels else None
    source = meta.get("source") or {}
    name = model.get("name") or "viq"
    lines = [
        "---", "library_name: viq", "tags:", "- image-tokenizer", "- fsq", "- viq", "---", "",
        f"# {name}", "",
        "ViQ visual tokenizer weights (any-resolution SigLIP2 ViT + FSQ head), written by "
        f"viq {(meta.get('versions') or {}).get('viq', '?')} on {meta.get('created', '?')}.", "",
        "## How to load", "",
        "```python",
        "import viq",
        f'tok = viq.load_tokenizer("{folder_name}")  # or a Hub repo: load_tokenizer("REPO_ID", subfolder="...")',
        'codes = tok.encode(["image.jpg"])            # (h, w, 4) integer grid per image',
        "features = tok.embed(codes)                   # LLM-ready (h * w, C) features",
        "```", "",
        "```bash",
        f"viqctl encode images/ --model {folder_name} --out codes/",
        f"viqctl verify {folder_name}",
        "```", "",
        "## Quantizer", "",
        f"- FSQ levels: `{levels}`" + (f" (codebook size {size})" if size else ""),
        f"- codes per {vit.get('patch', 16)}x{vit.get('patch', 16)} patch: {head.get('slots', 4)}",
        f"- ViT: width {vit.get('width')}, depth {vit.get('depth')}, heads {vit.get('heads')}", "",
        "## Source", "",
        "| field | value |", "|---|---|",
    ]
    shown = dict(source) if source else {"kind": "unknown"}
    if "sha256" in shown:
        lines.append(f"| source checkpoint sha256 | `{shown.pop('sha256')}` |")
    lines += [f"| {_cell(k)} | {_cell(v)} |" for k, v in shown.items()]
    lines += ["", "## Files", "", "| part | file | parameters | dtype | sha256 |", "|---|---|---|---|---|"]
    for part, info in (meta.get("parts") or {}).items():
        lines.append(f"| {part} | {info.get('file')} | {info.get('parameters')} | {info.get('dtype')} | "
                     f"`{info.get('sha256')}` |")
    lines += ["", "`config.json` records every part's sha256; loading checks them.", "",
              "## Config", "", "```json", json.dumps(model, indent=2), "```", ""]
    return "\n".join(lines)


def write_card(meta: dict, out_dir) -> Path:
    """Write ``README.md`` into ``out_dir`` atomically (temp file, then rename)."""
    out = Path(out_dir)
    text = model_card(meta)  # the folder may still have its temporary name here
    fd, tmp = tempfile.mkstemp(prefix=f".{CARD}.", suffix=".tmp", dir=out)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        publish(tmp, out / CARD)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out / CARD
