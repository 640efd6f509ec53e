"""viqctl convert / viqctl verify: trustworthy weights."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from viqctl.common import DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, ModelsDirOpt, device_of, models_dir_of
from viqctl.console import cli_errors, err, out, print_json


def _config(path: Optional[Path]):
    """--config: a viq config file of any name, or a folder holding config.json; read before any weights."""
    if path is None:
        return None
    import json

    from viq.errors import ConfigError
    from viq.weights.formats import parse_config

    file = path / "config.json" if path.is_dir() else path
    try:
        meta = json.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file" + (" (the folder has no config.json)"
                                                              if path.is_dir() else "")) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"--config {file}: not valid JSON ({exc})") from None
    if not isinstance(meta, dict) or "model" not in meta:
        raise ConfigError(f"--config {file}: not a viq config (no 'model' section, as in a viq config.json)")
    return parse_config(meta, str(file))


def _levels(values: Optional[List[str]]) -> Optional[list[int]]:
    if not values:
        return None
    parts = [x for v in values for x in v.replace(",", " ").split()]
    if not all(x.isdigit() and int(x) >= 2 for x in parts):
        from viq.errors import ConfigError

        raise ConfigError(f"--levels {' '.join(values)}: give integers >= 2, e.g. --levels 8 8 8 6 5")
    return [int(x) for x in parts]


def convert(
    checkpoint: Path = typer.Argument(..., help="vision_tower.pth of a reference training run, a viq training "
                                                "run folder or one of its checkpoints/step-N, or a weights "
                                                "directory to re-export."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Output viq weights directory."),
    size: Optional[str] = typer.Option(None, "--size", help="FSQ preset: 2k, 4k, 8k, 16k or 64k."),
    levels: Optional[List[str]] = typer.Option(None, "--levels", help="FSQ levels, e.g. --levels 8 8 8 6 5 "
                                                                     "(or 8,8,8,6,5)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A viq config.json naming a non-preset architecture."),
    reference_layout: bool = typer.Option(False, "--reference-layout",
                                          help="Also write model_viq_fsq_<size>.pth, embedder.pth, index_drawer.pth."),
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Convert training weights into inference weights (config.json + safetensors), strictly.

    Example: viqctl convert run/vision_tower.pth --size 16k --out weights/viq-16k

    Every tensor must come from the checkpoint (missing keys fail, listed); the keys dropped on
    purpose (teacher, projector, LPIPS, VAE copies, high branch, buffers) are listed by group.
    """
    from viq.train.export import convert_step as run_convert

    with cli_errors(debug):
        report = run_convert(checkpoint, out_dir, levels=_levels(levels), size=size, config=_config(config),
                             reference_layout=reference_layout)
        if json_out:
            print_json(report.as_dict())
            return
        out.print(f"[bold]{report.kind}[/] {report.source} -> {out_dir} (levels {report.levels}, "
                  f"architecture: {report.recognised})", highlight=False)
        for note in report.adaptations:
            out.print(f"adapted: {note}", highlight=False)
        table = Table(title="written")
        for col in ("part", "parameters", "dtype", "bytes"):
            table.add_column(col, justify="right" if col != "part" else "left")
        for p, info in report.parts.items():
            table.add_row(p, f"{info['parameters']:,}", info["dtype"], f"{info['bytes']:,}")
        out.print(table)
        if report.dropped:
            dropped = Table(title="dropped on purpose")
            dropped.add_column("group")
            dropped.add_column("keys", justify="right")
            dropped.add_column("example")
            for g, ks in report.dropped.items():
                dropped.add_row(g, str(len(ks)), ks[0])
            out.print(dropped)
        out.print(f"{report.bytes_written:,} bytes in {len(report.written)} files", highlight=False)


def _step(what: str, quiet: bool):
    """One long step: a spinner on a terminal, a line with its duration on a pipe or in a log."""
    import time
    from contextlib import contextmanager

    @contextmanager
    def step():
        start = time.perf_counter()
        if quiet:
            yield
        elif err.is_terminal:
            with err.status(what):
                yield
        else:
            err.print(f"{what} ...", highlight=False, markup=False)
            yield
        if not quiet:
            err.print(f"{what.split(':')[0]}: done in {time.perf_counter() - start:.1f} s", highlight=False,
                      markup=False)
    return step()


def verify(
    model_dir: Optional[str] = typer.Argument(None, help="Weights to check: a viq or reference-layout folder, a "
                                              "name placed by `viqctl download`, or demo. Default: the bundled "
                                              "demo model.", show_default=False),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Images to use (default: the bundled photos)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Second weights (a directory, or a training "
                                                                   "vision_tower.pth) that must give identical "
                                                                   "fingerprints."),
    resize: str = typer.Option("native", "--resize", help="Preprocessing policy (see `viqctl encode --help`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A viq config.json naming a non-preset architecture."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    models_dir: Optional[Path] = ModelsDirOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Check that a model is lossless end to end, and print its fingerprints.

    Example: viqctl verify weights/viq-16k --against downloads/converted_16k

    Without an argument it checks the bundled demo model (`viqctl verify`).

    The full forward path and the split path (encode -> codes -> embed / draw, packed and one
    image at a time) must agree bit for bit. Exit 1 with the differences otherwise.
    """
    from viq.errors import ConfigError, ImageError
    from viq.images import prepare
    from viq.tokenizer import resolve_source
    from viq.weights.verify import compare_fingerprints, compare_weights, example_images, verify_source

    with cli_errors(debug):
        paths = images or example_images()
        try:
            named = [(p.name, prepare(p, resize)[0]) for p in paths]
        except ImageError as exc:  # here a bad input is a usage error (exit 2), not a verify failure
            raise ConfigError(f"--images: {exc}") from None
        arch = _config(config)
        model_dir = str(resolve_source(model_dir, models_dir_of(models_dir)))
        steps = f"files, then the full vs the split path on {len(named)} image(s), packed and one by one"
        with _step(f"verify {model_dir}: {steps}", False):
            result = verify_source(model_dir, named, device_of(device), dtype, arch)
        diffs = list(result.mismatches)
        other = None
        if against is not None:
            with _step(f"verify {against}: the same, to compare fingerprints", False):
                other = verify_source(against, named, device_of(device), dtype, arch)
            diffs += [f"{against}: {m}" for m in other.mismatches]
            diffs += compare_fingerprints(result.fingerprints, other.fingerprints, str(model_dir), str(against))
            diffs += compare_weights(result.weights, other.weights, str(model_dir), str(against))
        payload = {"ok": not diffs, "model": str(model_dir), "against": str(against) if against else None,
                   "fingerprints": result.fingerprints, "environment": result.environment, "differences": diffs}
        if json_out:
            print_json(payload)
        else:
            from rich import box

            table = Table(title=f"fingerprints ({result.environment['dtype']}, {result.environment['device']})",
                          caption="codes, pixels: the first 8 hex digits of their sha256 (all 64 in --json)",
                          box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
            table.add_column("image", overflow="fold")  # the one column that may wrap: numbers never do
            for col in ("grid", "codes sum", "distinct", "codes", "|latent|", "pixels"):
                table.add_column(col, no_wrap=True, justify="right" if col != "grid" else "left")
            for f in result.fingerprints:
                table.add_row(f["image"], "x".join(map(str, f["grid"])), str(f["codes_sum"]), str(f["distinct_codes"]),
                              f["codes_sha256"][:8], f"{f['latent_abs_sum']:.4f}", f["pixels_sha256"][:8])
            if result.fingerprints:  # a folder whose parts fail their digest never ran: no empty table
                out.print(table)
            if diffs:
                for d in diffs:
                    out.print(f"[red]mismatch[/] {d}", highlight=False, soft_wrap=True)
            else:
                what = f"and {against} agree" if against else "is lossless: full path == split path, bit for bit"
                out.print(f"[green]ok[/] {model_dir} {what}", highlight=False)
        if diffs:
            raise typer.Exit(1)
