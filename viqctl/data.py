"""viqctl shapes: the synthetic dataset the tiny recipes train on."""

from __future__ import annotations

from pathlib import Path

import typer

from viqctl.common import DebugOpt, JsonOpt
from viqctl.console import cli_errors, out, print_json


def shapes(
    out_dir: Path = typer.Option(Path("data/shapes"), "--out", "-o", help="Where to write images and JSONL."),
    n_train: int = typer.Option(2000, "--train", help="Training samples."),
    n_val: int = typer.Option(200, "--val", help="Held-out samples."),
    seed: int = typer.Option(0, "--seed", help="Same seed, same dataset."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Write the synthetic shapes dataset the tiny recipes train on.

    Coloured shapes at varied sizes, positions and aspect ratios, with captions that state them,
    in the training data format (JSONL conversations + PNGs).

    Example: viqctl shapes --out data/shapes && viqctl train --recipe recipes/tiny.yaml --stage 1
    """
    from viq.data import make_shapes_dataset

    with cli_errors(debug):
        ds = make_shapes_dataset(out_dir, n_train=n_train, n_val=n_val, seed=seed)
        info = {"root": str(ds.root), "train": str(ds.train), "val": str(ds.val), "n_train": ds.n_train,
                "n_val": ds.n_val}
        if json_out:
            print_json(info)
        else:
            out.print(f"wrote {ds.n_train} training and {ds.n_val} held-out samples to {ds.root}", highlight=False)
