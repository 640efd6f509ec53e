"""`viqctl download`: fetch weights by name into the models directory, list them, or import a local copy."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape
from rich.table import Table

from viqctl.console import cli_errors, err, out, print_json, progress_lines


def _say(line: str) -> None:
    err.print(line, highlight=False, markup=False, soft_wrap=True)


def _human(n: int | None) -> str:
    from viq.hub_progress import human_bytes

    return human_bytes(n)


def download(
    names: list[str] = typer.Argument(None, help="Known names (see --list) or Hub repos as org/repo.",
                                      show_default=False),
    dir: Path = typer.Option(None, "--dir", "--models-dir", envvar="VIQ_MODELS_DIR",
                             help="Models directory (default ~/.cache/viq/models)."),
    revision: str = typer.Option(None, "--revision", help="Branch, tag or commit, instead of the pinned one."),
    include: list[str] = typer.Option(None, "--include", help="Allow pattern (repeatable); replaces the name's own."),
    dry_run: bool = typer.Option(False, "--dry-run", help="List the files and bytes to fetch; download nothing."),
    list_: bool = typer.Option(False, "--list", help="Show the known and registered names and whether they are here."),
    offline: bool = typer.Option(False, "--offline", help="Never touch the network (as HF_HUB_OFFLINE=1)."),
    import_: Path = typer.Option(None, "--import", help="Register weights you already have (file or folder)."),
    name: str = typer.Option(None, "--name", help="With --import: the name to register them under."),
    link: bool = typer.Option(False, "--link", help="With --import: symlink instead of copying."),
    json_: bool = typer.Option(False, "--json", help="Print a machine-readable summary on stdout."),
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks."),
) -> None:
    """Download source and ViQ weights by name (resumable), list them, or import a local copy.

    Example: viqctl download viq-16k siglip2-g qwen2.5-0.5b qwen-image-vae --dir /data/models

    More: `viqctl download viq-16k --dry-run` (files and bytes, nothing downloaded);
    `viqctl download Qwen/Qwen2.5-14B --include '*.json' --include '*.safetensors'`;
    `viqctl download --list --json`; `viqctl download --import ./converted_16k --name viq-16k --link`.

    Each transfer first says its files and total size; in a log or pipe, a line per finished file.
    Transfers resume where they stopped; HF_TOKEN, HF_HOME, HF_ENDPOINT and HF_HUB_OFFLINE are honoured.
    Exit codes: 0 all done, 1 some names failed (the others are still done), 2 usage errors.
    """
    from viq import hub
    from viq.errors import ConfigError, HubError

    with cli_errors(debug):
        names = names or []
        if sum(bool(x) for x in (names, list_, import_)) != 1:
            raise ConfigError("give NAME..., or --list, or --import PATH --name NAME (exactly one); see --help")
        if (name or link) and not import_:
            raise ConfigError("--name and --link go with --import PATH")
        if import_ and (dry_run or include or revision):
            raise ConfigError("--import takes only --name, --link, --dir and --json")
        if list_:
            return _list(hub.list_models(dir), json_)
        if import_:
            if not name:
                raise ConfigError("--import needs --name NAME (a known name, see --list, or your own)")
            result = hub.import_weights(import_, name, dir, link=link)
            return _report([result], [], hub.default_models_dir(dir), json_)
        plans = [hub.plan_download(n, dir, revision, include) for n in names]  # unknown names fail here: exit 2
        done, failed = [], []
        for plan in plans:
            try:
                if dry_run:
                    done.append(hub.dry_run(plan, offline=True if offline else None))
                else:
                    if offline or hub.hub_offline():
                        err.print(f"{plan.name}: {plan.repo_id}@{plan.revision} -> {plan.folder} (offline: "
                                  "checking the local copy)", highlight=False, markup=False)
                    # first a line with the files and bytes to fetch; on a log or pipe, where the hub's
                    # bars are off, a line per finished file too
                    done.append(hub.download(plan, offline=True if offline else None, say=_say,
                                             file_lines=progress_lines()))
            except HubError as exc:
                err.print(f"[bold red]failed:[/] {escape(str(exc))}", highlight=False)
                failed.append({"name": plan.name, "error": str(exc)})
        root = hub.default_models_dir(dir)
        _report_dry(done, failed, json_) if dry_run else _report(done, failed, root, json_)
        if failed:
            raise typer.Exit(1)


def _list(rows, json_: bool) -> None:
    if json_:
        return print_json([r.__dict__ for r in rows])
    from rich import box

    # fits 80 columns with every name and repo id whole; the file patterns are in --json and NAME --dry-run
    table = Table(title="models", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True,
                  caption="files each name fetches: viqctl download NAME --dry-run (or --list --json)")
    table.add_column("name", no_wrap=True)
    table.add_column("kind", no_wrap=True)
    table.add_column("repo", overflow="fold")
    table.add_column("size", justify="right", no_wrap=True)
    table.add_column("here", no_wrap=True)
    for r in rows:
        table.add_row(r.name, r.kind, r.repo_id, _human(r.size_bytes), "[green]yes[/]" if r.present else "no")
    out.print(table)


def _report(done, failed, root: Path, json_: bool) -> None:
    if json_:
        return print_json({"models_dir": str(root), "results": [r.to_dict() for r in done], "failed": failed})
    table = Table(title=f"models in {root}")
    for col in ("name", "status", "path", "size", "next step"):
        table.add_column(col, overflow="fold")
    for r in done:
        table.add_row(r.name, r.status, str(r.path), _human(r.bytes), r.next_step or "")
    for f in failed:
        table.add_row(f["name"], "[red]failed[/]", "", "", "")
    out.print(table)


def _report_dry(done, failed, json_: bool) -> None:
    if json_:
        return print_json({"dry_run": [d.to_dict() for d in done], "failed": failed})
    for d in done:
        table = Table(title=f"{d.name}: {d.repo_id}@{d.revision} (commit {d.commit or '?'}) -> {d.folder}")
        for col in ("file", "size", "here"):
            table.add_column(col, overflow="fold")
        for f in d.files:
            table.add_row(f.path, _human(f.size), "yes" if f.present else "no")
        table.caption = f"{len(d.files)} files, {_human(d.total_bytes)}; to download {_human(d.missing_bytes)}"
        out.print(table)
