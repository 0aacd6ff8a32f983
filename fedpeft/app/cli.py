"""The `fedpeft` command line: simulate, report, compare, deploy, info."""

from __future__ import annotations

import gc
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpeft.app.errors import console, current, exit_expected, guarded, run_failed, started
from fedpeft.env import quiet_libraries, set_offline_env

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated PEFT simulations with exact byte accounting.",
                  pretty_exceptions_show_locals=False)

TARGET_HELP = ("fraction of each run's final primary metric (accuracy; Rouge-L for causal-LM runs) that "
               "'bytes to target' waits for, in (0, 1]")


@contextmanager
def _pinned_console():
    """Keep the progress display on the terminal while a run sends all other output to its run.log."""
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # back to following sys.stderr


def _run_with_progress(cfg, progress: Progress, verbose: bool,
                       resume: Path | None = None) -> tuple[dict | None, BaseException | None]:
    """Run one simulation with a progress task per round; (summary, None) or (None, the exception it raised)."""
    from fedpeft.app.display import ProgressLine
    from fedpeft.scores import primary_for_kind

    task = progress.add_task("rounds", total=cfg.sim.rounds, status="preparing data and workers…")
    line = ProgressLine(primary_for_kind(cfg.model.kind))

    def on_round(row: dict) -> None:
        progress.update(task, completed=row["round"], status=line.update(row))

    from fedpeft.app import api

    try:
        if resume is not None:
            run = api.resume(resume, on_round=on_round, verbose=verbose, on_start=started,
                             ray_address=cfg.sim.ray_address)
        else:
            run = api.simulate(cfg, on_round=on_round, verbose=verbose, on_start=started)
        return run.summary(), None
    except BaseException as err:  # reported by the caller, once the progress display has stopped
        return None, err


@app.command()
@guarded
def simulate(
    recipe: Annotated[Optional[Path], typer.Argument(help="TOML recipe, e.g. simulations/default.toml")] = None,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.lr=3e-4")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs and full tracebacks")] = False,
    ray_address: Annotated[Optional[str], typer.Option(
        "--ray-address", help="attach to a running Ray cluster (HOST:PORT) instead of starting Ray")] = None,
    resume: Annotated[Optional[Path], typer.Option(
        "--resume", help="go on with a killed or interrupted run from its last completed round (its run directory)")] = None,
) -> None:
    """Run a federated fine-tuning simulation from a recipe (or resume one: --resume RUN_DIR)."""
    if (recipe is None) == (resume is None):
        exit_expected("give a recipe to start a run, or --resume RUN_DIR to go on with one (not both)")
    if resume is not None and set_:
        exit_expected("a resumed run keeps the config it was started with: drop --set")
    if ray_address:
        set_ = [*(set_ or []), f"sim.ray_address={ray_address}"]
    set_offline_env()
    quiet_libraries(verbose)
    from fedpeft.config import ConfigError
    from fedpeft.app.api import load_recipe
    from fedpeft.app.server.resume import ResumeError
    from fedpeft.models import device_for, model_label
    from fedpeft.precision import resolve as resolve_precision

    try:
        if resume is not None:
            from fedpeft.app.simulate import resume_config

            cfg = resume_config(resume)
            if ray_address:
                cfg = cfg.model_copy(update={"sim": cfg.sim.model_copy(update={"ray_address": ray_address})})
        else:
            cfg = load_recipe(recipe, set_ or [])
    except (ConfigError, ResumeError) as err:
        exit_expected(err)
    console.print(
        f"[bold]fedpeft[/bold] {cfg.name}: method [cyan]{cfg.method.name}[/cyan], adapter [cyan]{cfg.adapter.type}[/cyan], "
        f"model {model_label(cfg.model)}{' causal LM' if cfg.model.kind == 'causal-lm' else ''}, {cfg.sim.num_clients} clients, {cfg.sim.clients_per_round}/round, {cfg.sim.rounds} rounds"
    )
    precision, why = resolve_precision(cfg.train.precision, device_for(cfg))
    console.print(f"compute precision [cyan]{precision}[/cyan] ({why}); adapters, optimizer state and uploads stay fp32")
    if cfg.dp.enabled or cfg.dp.user.enabled:
        from fedpeft.app.display import privacy_header

        console.print(privacy_header(cfg))
    with _pinned_console(), Progress(
        TextColumn("[bold]round[/bold]"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        summary, failure = _run_with_progress(cfg, progress, verbose, resume)
    if isinstance(failure, KeyboardInterrupt):
        where = f" ({current.run_dir})" if current.run_dir else ""
        console.print(f"[yellow]interrupted[/yellow]: rounds completed so far are in the run directory{where}")
        raise typer.Exit(130)
    run_failed(failure)
    _print_summary(summary)


def _print_summary(s: dict) -> None:
    from fedpeft.app.display import summary_table

    Console().print(summary_table(s))


@app.command()
@guarded
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories, e.g. runs/smoke-20250101-120000")],
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: the run directory for one run, "
                                                 "runs/report-<timestamp>/ for several)")] = None,
    target: Annotated[float, typer.Option("--target", "--target-accuracy", help=TARGET_HELP)] = 0.9,
) -> None:
    """Write a communication-cost report (report.html, report.md, CSV tables, PNG plots) of one or more runs."""
    from fedpeft.app.api import write_report
    from fedpeft.report import ReportError

    try:
        files = write_report(run_dirs, out, target)
    except ReportError as err:
        exit_expected(err)
    _print_incomplete(run_dirs)
    _print_report_files(files)


def _print_incomplete(run_dirs: list[Path]) -> None:
    from fedpeft.rundir import describe_status, read_status

    for d in run_dirs:
        why = describe_status(read_status(d))
        if why:
            console.print(f"[yellow]note:[/yellow] {escape(str(d))}: the run {escape(why)}", highlight=False)


def _print_report_files(files: dict[str, Path]) -> None:
    out = files["report.html"].parent
    plots = sum(1 for k in files if k.startswith("plot:"))
    console.print(f"[green]report written[/green] to {out}: report.html, report.md, runs.csv, rounds.csv, "
                  f"clients.csv, {plots} plots")
    Console().print(str(files["report.html"]))


@app.command()
@guarded
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="TOML recipes to run one after another")],
    seed: Annotated[int, typer.Option("--seed", help="sim.seed shared by every run")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key in every recipe")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder (default: runs/compare-<timestamp>/)")] = None,
    target: Annotated[float, typer.Option("--target", "--target-accuracy", help=TARGET_HELP)] = 0.9,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs and full tracebacks")] = False,
) -> None:
    """Run several recipes with a shared seed, then write their comparison report."""
    set_offline_env()
    quiet_libraries(verbose)
    from fedpeft.app.display import result_line
    from fedpeft.config import ConfigError
    from fedpeft.app.api import load_recipe, write_report
    from fedpeft.report import ReportError

    if not 0 < target <= 1:
        exit_expected(ValueError(f"--target must be in (0, 1], got {target} (use 0.9 for 90 %)"))
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    # Every recipe is validated before the first run starts, so a typo in the last one costs nothing.
    try:
        cfgs = [load_recipe(r, [*(set_ or []), f"sim.seed={seed}"]) for r in recipes]
    except ConfigError as err:
        exit_expected(err)
    run_dirs: list[Path] = []
    for i, cfg in enumerate(cfgs, start=1):
        label = f"[{i}/{len(cfgs)}] {escape(cfg.name)}: {cfg.method.name} / {cfg.adapter.type}"
        current.run_dir = None
        with _pinned_console(), Progress(TextColumn(label), MofNCompleteColumn(), BarColumn(),
                                         TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                         console=console) as progress:
            summary, failure = _run_with_progress(cfg, progress, verbose)
        if isinstance(failure, KeyboardInterrupt):
            console.print("[yellow]interrupted[/yellow]: finished runs are in " + ", ".join(map(str, run_dirs)))
            raise typer.Exit(130)
        run_failed(failure, label=f"{recipes[i - 1]}: ")
        run_dirs.append(Path(summary["run_dir"]))
        console.print(result_line(summary))
    current.run_dir = None
    try:
        files = write_report(run_dirs, out, target)
    except ReportError as err:
        exit_expected(err)
    _print_report_files(files)


@app.command()
@guarded
def deploy(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe; each of its clients becomes a SuperNode")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set sim.rounds=2")] = None,
    nodes: Annotated[Optional[int], typer.Option("--nodes", help="SuperNodes to start (default: sim.num_clients)")] = None,
    out: Annotated[Optional[Path], typer.Option("--dir", help="deployment folder: certificates, keys, shards, "
                                                "logs, FLWR_HOME, runs/ (default: runs/deploy-<timestamp>)")] = None,
    insecure: Annotated[bool, typer.Option("--insecure", help="no TLS (and so no SuperNode authentication)")] = False,
    no_auth: Annotated[bool, typer.Option("--no-auth", help="TLS without SuperNode authentication")] = False,
    unregistered: Annotated[int, typer.Option("--unregistered", help="also start this many SuperNodes whose keys "
                                              "are not registered (they must be refused)")] = 0,
    wire_check: Annotated[bool, typer.Option("--wire-check", help="route SuperNodes through a counting relay and "
                                             "compare its byte counts with the ledger")] = False,
    node_wait: Annotated[float, typer.Option("--node-wait", help="seconds the server waits for the nodes")] = 60.0,
) -> None:
    """Run a recipe on a real SuperLink and SuperNodes on this machine (TLS and SuperNode auth on), then stop them all."""
    set_offline_env()
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError
    from fedpeft.app.deploy.local import DeployError
    from fedpeft.app.deploy.run import deploy_recipe
    from fedpeft.app.deploy.wirecheck import compare_with_ledger

    base = out or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]fedpeft deploy[/bold] {recipe} in {base}: TLS {'off' if insecure else 'on'}, "
                  f"SuperNode auth {'off' if insecure or no_auth else 'on'}")
    try:
        res = deploy_recipe(recipe, set_ or [], base, nodes=nodes, tls=not insecure, auth=not (insecure or no_auth),
                            unregistered=unregistered, relay=wire_check, node_wait_s=node_wait)
    except (ConfigError, DataError, DeployError) as err:
        exit_expected(err)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted[/yellow]: every started process was stopped")
        raise typer.Exit(130) from None
    table = Table(title="fedpeft deployment", show_header=False)
    table.add_row("flwr run exit code", str(res.returncode))
    table.add_row("nodes online at submit", str(res.online))
    if res.refused:
        table.add_row("refused (unregistered)", ", ".join(res.refused))
    table.add_row("processes started / left running", f"{len(res.pids)} / {len(res.alive_after)}")
    table.add_row("run directory", str(res.run_dir))
    table.add_row("logs", str(res.log_dir))
    if res.wire and res.run_dir:
        for k, v in compare_with_ledger(res.wire, res.run_dir).items():
            table.add_row(k, str(v))
    Console().print(table)
    if res.returncode != 0 or res.run_dir is None:
        if res.run_dir is not None:
            from fedpeft.rundir import RunDir

            rd = RunDir(res.run_dir)
            if rd.status().get("status") in ("running", "stopped", "unknown"):
                rd.mark_failed(f"the deployed run failed (flwr run exit code {res.returncode}); the processes' logs "
                               f"are in {res.log_dir}")
        console.print(f"[red]error:[/red] the run failed; see {res.log_dir}")
        raise typer.Exit(1)


@app.command("deploy-tls")
@guarded
def deploy_tls(
    out: Annotated[Path, typer.Argument(help="folder for ca.crt, server.pem, server.key")],
    host: Annotated[Optional[list[str]], typer.Option("--host", help="name or IP the SuperLink is reached at "
                                                      "(repeatable; default: localhost and 127.0.0.1)")] = None,
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 7,
) -> None:
    """Make a throw-away CA and SuperLink certificate for trying TLS (not for production)."""
    from fedpeft.app.deploy.certs import make_tls_files

    files = make_tls_files(out, tuple(host) if host else ("localhost", "127.0.0.1"), days)
    console.print(f"CA certificate (give to every SuperNode and to flwr): {files.ca_cert}\n"
                  f"SuperLink certificate and key: {files.server_cert}, {files.server_key}")


@app.command("deploy-key")
@guarded
def deploy_key(
    path: Annotated[Path, typer.Argument(help="private key path; the public key goes to PATH.pub")],
) -> None:
    """Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH format, like ssh-keygen -t ecdsa -b 384)."""
    from fedpeft.app.deploy.keys import make_node_keys

    if path.exists():
        exit_expected(f"{path} exists; not overwriting a key")
    keys = make_node_keys(path)
    console.print(f"private key (start the SuperNode with --auth-supernode-private-key): {keys.private}\n"
                  f"public key (register it: flwr supernode register {keys.public} CONNECTION): {keys.public}")


@app.command()
@guarded
def info() -> None:
    """Print versions, whether the embedded models are available, and the CPU's bf16 units."""
    set_offline_env()
    from importlib.metadata import PackageNotFoundError, version

    table = Table(title="fedpeft environment", show_header=False)
    for pkg in ("fedpeft", "flwr", "ray", "torch", "transformers", "peft", "opacus", "datasets", "flwr-datasets", "gguf"):
        try:
            table.add_row(pkg, version(pkg))
        except PackageNotFoundError:
            table.add_row(pkg, "[red]not installed[/red]")
    from fedpeft.models import ModelLoadError, embedded_model_path

    try:
        path = embedded_model_path()
        ok = (path / "config.json").is_file()
        table.add_row("embedded model", f"{'[green]available[/green]' if ok else '[red]incomplete[/red]'} ({path})")
    except ModelLoadError as err:
        table.add_row("embedded model", f"[red]missing[/red]: {err}")
    import fedpeft.gguf as gguf
    from fedpeft.precision import cpu_bf16_units

    try:
        table.add_row("embedded causal LM", f"[green]available[/green] ({gguf.smollm2_file()}); dequantized cache: "
                      f"{gguf.cache_root() / 'gguf'}")
    except gguf.GGUFError as err:
        table.add_row("embedded causal LM", f"[red]missing[/red]: {err}")
    table.add_row("CPU bf16 units", cpu_bf16_units() or "none (train.precision = 'auto' stays fp32 on the CPU)")
    from strategies import available_methods

    table.add_row("methods", ", ".join(available_methods()))
    table.add_row("offline", "yes" if __import__("os").environ.get("HF_HUB_OFFLINE") == "1" else "no")
    Console().print(table)


@app.command()
def methods(name: Annotated[Optional[str], typer.Argument(help="one method: its options and the reasons")] = None,
            ) -> None:
    """List the registered methods and what each supports; with NAME, one method's options and refusals."""
    from fedpeft.app.methods_view import method_detail, methods_table
    from fedpeft.config import ConfigError
    from strategies import method_spec

    if name is None:
        Console().print(methods_table())
        return
    try:
        spec = method_spec(name)
    except ConfigError as err:
        exit_expected(err)
    method_detail(Console(), spec)


def main() -> None:
    """Console-script entry point."""
    try:
        app(sys.argv[1:])
    finally:
        # The interpreter's last garbage collection walks every object torch, transformers and
        # peft created at import (over a second on 2 cores); frozen objects are skipped. Exit
        # handlers and finalizers still run.
        gc.freeze()


if __name__ == "__main__":
    main()
