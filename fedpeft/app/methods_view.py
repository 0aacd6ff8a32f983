"""What `fedpeft methods` prints: every method's capabilities in one table, and one method in full."""

from __future__ import annotations

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from fedpeft.methods.contract import MethodSpec, available_methods, method_spec


def methods_table() -> Table:
    """The registered methods with short yes/no cells (fits an 80-column terminal, every name whole)."""
    # No vertical rules and one-word cells: the reasons are too long for a table and go to `fedpeft methods NAME`.
    table = Table(title="fedpeft methods", box=box.SIMPLE_HEAD, show_edge=False,
                  caption="mean: the aggregate is a weighted mean (user-level DP and codecs.merge need one)\n"
                          "state: keeps per-client state between rounds\n"
                          "fedpeft methods NAME: a method's options and why it refuses what it does")
    for col in ("method", "client trainer", "DP-SGD", "user DP", "codecs", "mean", "state"):
        table.add_column(col, no_wrap=True)
    for method in available_methods():
        spec = method_spec(method)
        caps = spec.capabilities
        table.add_row(method, str(spec.trainer), "yes" if caps.refusal("sample_dp") is None else "no",
                      "yes" if _user_dp_refusal(spec) is None else "no", _codec_cell(caps.codecs),
                      "yes" if caps.weighted_mean is True else "no", "yes" if caps.client_state else "no")
    return table


def _user_dp_refusal(spec: MethodSpec) -> str | None:
    """Why user-level DP does not apply to a method (its own reason, or that its aggregate is not a mean)."""
    caps = spec.capabilities
    why = caps.refusal("user_dp")
    if why is None and caps.weighted_mean is not True:
        why = f"its aggregate is not a mean ({caps.weighted_mean})"
    return why


def _refusals(spec: MethodSpec) -> list[tuple[str, str]]:
    """(what, why) for every capability a method refuses."""
    caps = spec.capabilities
    out = []
    if (why := caps.refusal("sample_dp")) is not None:
        out.append(("sample-level DP", why))
    if (why := _user_dp_refusal(spec)) is not None:
        out.append(("user-level DP", why))
    missing = [d for d in ("up", "down") if d not in caps.codecs]
    if missing:
        out.append((f"codecs ({', '.join(missing)})", caps.codecs_why or "not supported"))
    if caps.weighted_mean is not True:
        out.append(("codecs.merge rules", f"its aggregate is not a mean ({caps.weighted_mean})"))
    if (why := caps.refusal("secagg")) is not None:
        out.append(("secure aggregation ([secagg])", why))
    return out


def _codec_cell(codecs: tuple[str, ...]) -> str:
    """Which `[codecs]` directions a method takes, in one short word."""
    return "both" if {"up", "down"} <= set(codecs) else (codecs[0] if codecs else "none")


def method_detail(out: Console, spec: MethodSpec) -> None:
    """Print one method: what it is, its client training, its options with defaults, and each refusal's reason."""
    out.print(f"[bold]{spec.name}[/bold]: {escape(spec.summary)}")
    out.print(f"client trainer: {spec.trainer}" + (f" ({spec.trainer.summary})" if spec.trainer.summary else ""))
    caps = spec.capabilities
    out.print(f"aggregate: {'weighted mean' if caps.weighted_mean is True else escape(str(caps.weighted_mean))}; "
              f"client state: {'yes' if caps.client_state else 'no'}; codecs: {', '.join(caps.codecs) or 'none'}")
    fields = spec.options.model_fields
    if fields:
        out.print("options ([method] keys):")
        for key, field in fields.items():
            default = "required" if field.is_required() else repr(field.default)
            out.print(f"  {key} = {escape(default)}" + (f"  {escape(field.description)}" if field.description else ""))
    refused = _refusals(spec)
    if refused:
        out.print("refuses:")
        for what, why in refused:
            out.print(f"  {what}: {escape(why)}")
