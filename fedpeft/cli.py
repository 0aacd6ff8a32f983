"""The `fedpeft` command line: simulate, report, compare, deploy, info."""

from __future__ import annotations

import functools
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from fedpeft.env import quiet_libraries, set_offline_env

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Federated PEFT simulations with exact byte accounting.",
                  pretty_exceptions_show_locals=False)
console = Console(stderr=True)

MB = 1024 * 1024


class _Command:
    """What the error handler needs to know about the command that is running."""

    verbose = False
    run_dir: Optional[Path] = None


_current = _Command()


def _guarded(fn):
    """Turn an unexpected exception into a few lines naming it, where it was raised and where its traceback is."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        _current.verbose, _current.run_dir = bool(kwargs.get("verbose", False)), None
        try:
            return fn(*args, **kwargs)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, KeyboardInterrupt):
            raise
        except Exception as err:  # anything else is a bug or an environment problem: say what and where
            _unexpected(err, logged=False)

    return wrapper


def _unexpected(err: BaseException, logged: bool) -> None:
    """Print an unexpected error in a few lines (the whole traceback with --verbose) and exit 1.

    `logged`: the traceback is already in the run's run.log (the simulation driver wrote it).
    """
    from fedpeft.runlog import error_text, origin, write_traceback

    run_dir = _current.run_dir
    if run_dir is not None and run_dir.is_dir():
        log = run_dir / "run.log"
        if not logged:
            write_traceback(log, err, header=f"fedpeft {' '.join(sys.argv[1:])}: unexpected error")
    else:
        fd, name = tempfile.mkstemp(prefix="fedpeft-error-", suffix=".log")
        with open(fd, "w", encoding="utf-8") as f:
            f.write(f"fedpeft {' '.join(sys.argv[1:])}\n")
        log = Path(name)
        write_traceback(log, err)
    if _current.verbose:
        console.print("".join(traceback.format_exception(err)).rstrip(), markup=False, highlight=False, soft_wrap=True)
    console.print(f"[red]error:[/red] unexpected {escape(error_text(err, max_lines=3, max_chars=300))}", highlight=False, soft_wrap=True)
    console.print(f"  raised at {escape(origin(err))}", highlight=False, soft_wrap=True)
    hint = "" if _current.verbose else " (--verbose prints it here)"
    console.print(f"  full traceback: {escape(str(log))}{hint}", highlight=False, soft_wrap=True)
    if run_dir is not None and _marked_failed(run_dir):
        console.print(f"  the run directory is marked failed: {escape(str(run_dir))}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _marked_failed(run_dir: Path) -> bool:
    from fedpeft.rundir import read_status

    return read_status(run_dir).get("status") == "failed"


def _expected(err: object) -> None:
    """Print an error the user can act on (config, data, model, deployment) and exit 2."""
    console.print(f"[red]error:[/red] {escape(str(err))}", highlight=False, soft_wrap=True)
    if _current.run_dir is not None and _marked_failed(_current.run_dir):
        console.print(f"  the run directory is marked failed: {escape(str(_current.run_dir))} (log: run.log)",
                      highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def _started(path: Path) -> None:
    _current.run_dir = Path(path)


@contextmanager
def _pinned_console():
    """Keep the progress display on the terminal while a run sends all other output to its run.log."""
    console.file = sys.stderr
    try:
        yield
    finally:
        console.file = None  # back to following sys.stderr


def _round_status(row: dict, sent_bytes: int, totals: dict) -> str:
    from fedpeft.runlog import round_failures

    status = f"acc {row['accuracy']:.3f}  loss {row['loss']:.3f}  sent {sent_bytes / MB:.2f} MB"
    failed, rejected = round_failures(row)
    totals["bad"] = totals.get("bad", 0) + failed + rejected
    if totals["bad"]:  # once a reply has failed or been rejected, every round shows its count
        status += f"  [yellow]failed/rejected {failed}/{rejected}[/yellow]"
        if totals["bad"] != failed + rejected:
            status += f" ({totals['bad']} in the run)"
    return status


def _run_with_progress(run_simulation, cfg, progress: Progress, verbose: bool) -> tuple[dict | None, BaseException | None]:
    """Run one simulation with a progress task per round; (summary, None) or (None, the exception it raised)."""
    task = progress.add_task("rounds", total=cfg.sim.rounds, status="preparing data and workers…")
    sent = {"bytes": 0}
    totals: dict = {}

    def on_round(row: dict) -> None:
        sent["bytes"] += row["bytes_down"] + row["bytes_up"]
        progress.update(task, completed=row["round"], status=_round_status(row, sent["bytes"], totals))

    try:
        return run_simulation(cfg, on_round=on_round, verbose=verbose, on_start=_started), None
    except BaseException as err:  # reported by the caller, once the progress display has stopped
        return None, err


@app.command()
@_guarded
def simulate(
    recipe: Annotated[Path, typer.Argument(help="TOML recipe, e.g. simulations/default.toml")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key: --set train.lr=3e-4")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs and full tracebacks")] = False,
) -> None:
    """Run a federated fine-tuning simulation from a recipe."""
    set_offline_env()
    quiet_libraries(verbose)
    from fedpeft.config import ConfigError
    from fedpeft.recipe import load

    try:
        cfg = load(recipe, set_ or [])
    except ConfigError as err:
        _expected(err)
    console.print(
        f"[bold]fedpeft[/bold] {cfg.name}: method [cyan]{cfg.method.name}[/cyan], adapter [cyan]{cfg.adapter.type}[/cyan], "
        f"model {cfg.model.source}, {cfg.sim.num_clients} clients, {cfg.sim.clients_per_round}/round, {cfg.sim.rounds} rounds"
    )
    from fedpeft.simulation import simulate as run_simulation

    with _pinned_console(), Progress(
        TextColumn("[bold]round[/bold]"),
        MofNCompleteColumn(),
        BarColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    ) as progress:
        summary, failure = _run_with_progress(run_simulation, cfg, progress, verbose)
    if isinstance(failure, KeyboardInterrupt):
        where = f" ({_current.run_dir})" if _current.run_dir else ""
        console.print(f"[yellow]interrupted[/yellow]: rounds completed so far are in the run directory{where}")
        raise typer.Exit(130)
    _run_failed(failure)
    _print_summary(summary)


def _run_failed(failure: BaseException | None, label: str = "") -> None:
    """Report a simulation's error (if any) and exit: 2 for an expected one, 1 for anything else."""
    from fedpeft.config import ConfigError
    from fedpeft.data import DataError
    from fedpeft.models import ModelLoadError

    if failure is None:
        return
    if isinstance(failure, (ConfigError, DataError, ModelLoadError)):
        _expected(f"{label}{failure}")
    if isinstance(failure, Exception):
        _unexpected(failure, logged=_current.run_dir is not None)
    raise failure


def _print_summary(s: dict) -> None:
    table = Table(title=f"fedpeft run: {s['name']}", show_header=False)
    table.add_row("method / adapter", f"{s['method']} / {s['adapter']}")
    if s.get("stopped"):
        from fedpeft.budget import describe_stop

        table.add_row("[yellow]stopped[/yellow]", escape(describe_stop(s["stopped"])))
    table.add_row("accuracy (round 0 → final)", f"{s['initial_accuracy']:.4f} → {s['final_accuracy']:.4f} (best {s['best_accuracy']:.4f})")
    table.add_row("bytes down / up", f"{s['bytes_down'] / MB:.3f} MB / {s['bytes_up'] / MB:.3f} MB")
    table.add_row("client participations", str(s["participations"]))
    table.add_row("full-model FedAvg would send", f"{s['full_model_fedavg_bytes'] / MB:.1f} MB "
                  f"({s['full_model_fedavg_bytes'] / max(s['bytes_total'], 1):.0f}x more)")
    table.add_row("trainable / total params", f"{s['trainable_params']:,} / {s['total_params']:,}")
    table.add_row("rejected replies", _rejections_text(s))
    if "epsilon_max" in s:
        table.add_row("sample-level ε (max / median)", f"{s['epsilon_max']:.3f} / {s['epsilon_median']:.3f}")
    if "user_epsilon" in s:
        table.add_row("user-level ε", f"{s['user_epsilon']:.3f} at δ = {s['user_delta']:.3g} "
                      f"({s['user_releases']} rounds, q = {s['user_sample_rate']:.3g})")
    table.add_row("wall time", f"{s['wall_s']:.1f} s")
    table.add_row("run directory", s["run_dir"])
    table.add_row("log (Flower, Ray)", str(Path(s["run_dir"]) / "run.log"))
    Console().print(table)


def _rejections_text(s: dict) -> str:
    """The run's rejected replies, counted by reason (the five most frequent)."""
    from fedpeft.rundir import RunDir
    from fedpeft.runlog import group_rejections

    total = int(s.get("rejected") or 0)
    if not total:
        return "0"
    groups = group_rejections(RunDir(Path(s["run_dir"])).metrics())
    lines = [str(total)]
    for reason, n, clients in groups[:5]:
        who = ", ".join(map(str, clients[:6])) + (", …" if len(clients) > 6 else "")
        lines.append(f"{n} × {reason} (client{'s' if len(clients) != 1 else ''} {who})")
    if len(groups) > 5:
        lines.append(f"{sum(n for _, n, _ in groups[5:])} × other reasons (see metrics.jsonl)")
    return escape("\n".join(lines))


def _report_error(err: object) -> None:
    _expected(err)


@app.command()
@_guarded
def report(
    run_dirs: Annotated[list[Path], typer.Argument(help="one or more run directories, e.g. runs/smoke-20250101-120000")],
    out: Annotated[Optional[Path], typer.Option("--out", help="output folder (default: the run directory for one run, "
                                                 "runs/report-<timestamp>/ for several)")] = None,
    target_accuracy: Annotated[float, typer.Option("--target-accuracy", help="fraction of the final accuracy for "
                                                   "'bytes to target', in (0, 1]")] = 0.9,
) -> None:
    """Write a communication-cost report (report.html, report.md, CSV tables, PNG plots) of one or more runs."""
    from fedpeft.report import ReportError, make_report

    if out is None:
        out = run_dirs[0] / "report" if len(run_dirs) == 1 else Path("runs") / f"report-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        files = make_report(run_dirs, out, target_accuracy)
    except ReportError as err:
        _report_error(err)
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
@_guarded
def compare(
    recipes: Annotated[list[Path], typer.Argument(help="TOML recipes to run one after another")],
    seed: Annotated[int, typer.Option("--seed", help="sim.seed shared by every run")] = 0,
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a key in every recipe")] = None,
    out: Annotated[Optional[Path], typer.Option("--out", help="report folder (default: runs/compare-<timestamp>/)")] = None,
    target_accuracy: Annotated[float, typer.Option("--target-accuracy", help="fraction of the final accuracy for "
                                                   "'bytes to target', in (0, 1]")] = 0.9,
    verbose: Annotated[bool, typer.Option("--verbose", "-v", help="show Flower and Ray logs and full tracebacks")] = False,
) -> None:
    """Run several recipes with a shared seed, then write their comparison report."""
    set_offline_env()
    quiet_libraries(verbose)
    from fedpeft.config import ConfigError
    from fedpeft.recipe import load
    from fedpeft.report import ReportError, make_report

    if not 0 < target_accuracy <= 1:
        _report_error(ValueError(f"--target-accuracy must be in (0, 1], got {target_accuracy} (use 0.9 for 90 %)"))
    out = out or Path("runs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    # Every recipe is validated before the first run starts, so a typo in the last one costs nothing.
    try:
        cfgs = [load(r, [*(set_ or []), f"sim.seed={seed}"]) for r in recipes]
    except ConfigError as err:
        _report_error(err)
    from fedpeft.simulation import simulate as run_simulation

    run_dirs: list[Path] = []
    for i, cfg in enumerate(cfgs, start=1):
        label = f"[{i}/{len(cfgs)}] {escape(cfg.name)}: {cfg.method.name} / {cfg.adapter.type}"
        _current.run_dir = None
        with _pinned_console(), Progress(TextColumn(label), MofNCompleteColumn(), BarColumn(),
                                         TextColumn("{task.fields[status]}"), TimeElapsedColumn(),
                                         console=console) as progress:
            summary, failure = _run_with_progress(run_simulation, cfg, progress, verbose)
        if isinstance(failure, KeyboardInterrupt):
            console.print("[yellow]interrupted[/yellow]: finished runs are in " + ", ".join(map(str, run_dirs)))
            raise typer.Exit(130)
        _run_failed(failure, label=f"{recipes[i - 1]}: ")
        run_dirs.append(Path(summary["run_dir"]))
        rejected = f", {summary['rejected']} replies rejected" if summary.get("rejected") else ""
        stopped = (f", stopped at the budget before round {summary['stopped']['before_round']}"
                   if summary.get("stopped") else "")
        console.print(f"  → {summary['run_dir']}: final accuracy {summary['final_accuracy']:.4f}, "
                      f"{summary['bytes_total'] / MB:.3f} MB{rejected}{stopped}")
    _current.run_dir = None
    try:
        files = make_report(run_dirs, out, target_accuracy)
    except ReportError as err:
        _report_error(err)
    _print_report_files(files)


@app.command()
@_guarded
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
    from fedpeft.deploy.local import DeployError
    from fedpeft.deploy.run import deploy_recipe
    from fedpeft.deploy.wirecheck import compare_with_ledger

    base = out or Path("runs") / f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    console.print(f"[bold]fedpeft deploy[/bold] {recipe} in {base}: TLS {'off' if insecure else 'on'}, "
                  f"SuperNode auth {'off' if insecure or no_auth else 'on'}")
    try:
        res = deploy_recipe(recipe, set_ or [], base, nodes=nodes, tls=not insecure, auth=not (insecure or no_auth),
                            unregistered=unregistered, relay=wire_check, node_wait_s=node_wait)
    except (ConfigError, DataError, DeployError) as err:
        _report_error(err)
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
@_guarded
def deploy_tls(
    out: Annotated[Path, typer.Argument(help="folder for ca.crt, server.pem, server.key")],
    host: Annotated[Optional[list[str]], typer.Option("--host", help="name or IP the SuperLink is reached at "
                                                      "(repeatable; default: localhost and 127.0.0.1)")] = None,
    days: Annotated[int, typer.Option("--days", help="validity in days")] = 7,
) -> None:
    """Make a throw-away CA and SuperLink certificate for trying TLS (not for production)."""
    from fedpeft.deploy.certs import make_tls_files

    files = make_tls_files(out, tuple(host) if host else ("localhost", "127.0.0.1"), days)
    console.print(f"CA certificate (give to every SuperNode and to flwr): {files.ca_cert}\n"
                  f"SuperLink certificate and key: {files.server_cert}, {files.server_key}")


@app.command("deploy-key")
@_guarded
def deploy_key(
    path: Annotated[Path, typer.Argument(help="private key path; the public key goes to PATH.pub")],
) -> None:
    """Make a SuperNode authentication key pair (ECDSA P-384, OpenSSH format, like ssh-keygen -t ecdsa -b 384)."""
    from fedpeft.deploy.keys import make_node_keys

    if path.exists():
        _report_error(f"{path} exists; not overwriting a key")
    keys = make_node_keys(path)
    console.print(f"private key (start the SuperNode with --auth-supernode-private-key): {keys.private}\n"
                  f"public key (register it: flwr supernode register {keys.public} CONNECTION): {keys.public}")


@app.command()
@_guarded
def info() -> None:
    """Print versions and whether the embedded model is available."""
    set_offline_env()
    from importlib.metadata import PackageNotFoundError, version

    table = Table(title="fedpeft environment", show_header=False)
    for pkg in ("fedpeft", "flwr", "ray", "torch", "transformers", "peft", "opacus", "datasets", "flwr-datasets"):
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
    from strategies import available_methods

    table.add_row("methods", ", ".join(available_methods()))
    table.add_row("offline", "yes" if __import__("os").environ.get("HF_HUB_OFFLINE") == "1" else "no")
    Console().print(table)


@app.command()
def methods() -> None:
    """List the registered methods and what each supports (from their registrations)."""
    from strategies import available_methods, method_spec

    table = Table(title="fedpeft methods")
    for col in ("method", "client trainer", "sample-level DP", "user-level DP", "codecs", "aggregate", "client state"):
        table.add_column(col)
    for name in available_methods():
        spec = method_spec(name)
        caps = spec.capabilities

        def cell(capability: str) -> str:
            why = caps.refusal(capability)
            return "yes" if why is None else f"no: {why}"

        aggregate = "weighted mean" if caps.weighted_mean is True else str(caps.weighted_mean)
        user = cell("user_dp")
        if user == "yes" and caps.weighted_mean is not True:
            user = f"no: its aggregate is not a mean ({aggregate})"
        table.add_row(name, spec.trainer, cell("sample_dp"), user, ", ".join(caps.codecs) or "none",
                      aggregate, "yes" if caps.client_state else "no")
    Console().print(table)


def main() -> None:
    """Console-script entry point."""
    app(sys.argv[1:])


if __name__ == "__main__":
    main()
