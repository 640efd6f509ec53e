"""viqctl convert / viqctl verify: trustworthy weights."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from viqctl.common import DebugOpt, DeviceOpt, DtypeOpt, JsonOpt, device_of
from viqctl.console import cli_errors, out, print_json


def _config(path: Optional[Path]):
    if path is None:
        return None
    from viq.weights.formats import parse_config, read_viq_config

    folder = path.parent if path.is_file() else path
    return parse_config(read_viq_config(folder), str(folder / "config.json"))


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
    from viq.weights.convert import convert as run_convert

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


def verify(
    model_dir: Path = typer.Argument(..., help="Weights to check (viq or reference layout)."),
    images: Optional[List[Path]] = typer.Option(None, "--images", help="Images to use (default: the bundled photos)."),
    against: Optional[Path] = typer.Option(None, "--against", help="Second weights (a directory, or a training "
                                                                   "vision_tower.pth) that must give identical "
                                                                   "fingerprints."),
    resize: str = typer.Option("native", "--resize", help="Preprocessing policy (see `viqctl encode --help`)."),
    config: Optional[Path] = typer.Option(None, "--config", help="A viq config.json naming a non-preset architecture."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    json_out: bool = JsonOpt,
    debug: bool = DebugOpt,
):
    """Check that a model is lossless end to end, and print its fingerprints.

    Example: viqctl verify weights/viq-16k --against downloads/converted_16k

    The full forward path and the split path (encode -> codes -> embed / draw, packed and one
    image at a time) must agree bit for bit. Exit 1 with the differences otherwise.
    """
    from viq.errors import ConfigError, ImageError
    from viq.images import prepare
    from viq.weights.verify import compare_fingerprints, example_images, verify_source

    with cli_errors(debug):
        paths = images or example_images()
        try:
            named = [(p.name, prepare(p, resize)[0]) for p in paths]
        except ImageError as exc:  # here a bad input is a usage error (exit 2), not a verify failure
            raise ConfigError(f"--images: {exc}") from None
        result = verify_source(model_dir, named, device_of(device), dtype, _config(config))
        diffs = list(result.mismatches)
        other = None
        if against is not None:
            other = verify_source(against, named, device_of(device), dtype, _config(config))
            diffs += [f"{against}: {m}" for m in other.mismatches]
            diffs += compare_fingerprints(result.fingerprints, other.fingerprints, str(model_dir), str(against))
        payload = {"ok": not diffs, "model": str(model_dir), "against": str(against) if against else None,
                   "fingerprints": result.fingerprints, "environment": result.environment, "differences": diffs}
        if json_out:
            print_json(payload)
        else:
            table = Table(title=f"fingerprints of {model_dir} ({result.environment['dtype']}, "
                                f"{result.environment['device']})")
            for col in ("image", "grid", "codes sum", "distinct", "codes", "|latent|", "pixels"):
                table.add_column(col, no_wrap=True)
            for f in result.fingerprints:
                table.add_row(f["image"], "x".join(map(str, f["grid"])), str(f["codes_sum"]), str(f["distinct_codes"]),
                              f["codes_sha256"][:8], f"{f['latent_abs_sum']:.4f}", f["pixels_sha256"][:8])
            out.print(table)
            if diffs:
                for d in diffs:
                    out.print(f"[red]mismatch[/] {d}", highlight=False, soft_wrap=True)
            else:
                what = f"and {against} agree" if against else "is lossless: full path == split path, bit for bit"
                out.print(f"[green]ok[/] {model_dir} {what}", highlight=False)
        if diffs:
            raise typer.Exit(1)
