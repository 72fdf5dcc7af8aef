"""``rulesearch distill RUN``: a thin verb over :func:`rulesearch.distill.pipeline.distill_run`.

Register it on the app with ``app.command("distill")(distill_command)``.
"""

from pathlib import Path
from typing import Annotated

import typer

from ..errors import RuleSearchError

__all__ = ["distill_command", "parse_layers", "parse_settings"]


def parse_layers(text: str | None) -> tuple[int, ...] | None:
    """``"0,2"`` -> ``(0, 2)``; None or empty -> None."""
    if not text:
        return None
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"--layers takes comma-separated integers such as 0,2; received {text!r}.") from None


def parse_settings(items: list[str] | None) -> dict:
    """``["max_time=20", "selection=knee"]`` -> ``{"max_time": 20, "selection": "knee"}`` (values read as YAML)."""
    import yaml

    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise typer.BadParameter(f"--set takes KEY=VALUE (a backend parameter); received {item!r}.")
        out[key.strip()] = yaml.safe_load(value)
    return out


def distill_command(
    run: Annotated[Path, typer.Argument(help="Run directory made by `rulesearch discover` (config.yaml, rule.json).")],
    backend: Annotated[
        str, typer.Option(help="Symbolic-regression backend: sparse (default, numpy only), operon or pysr.")
    ] = "sparse",
    grammar: Annotated[
        str,
        typer.Option(
            help="Term library: classic (default grammar + traces) or default, fitted to the rule: atoms reading a "
            "signal the rule never reads (e.g. the reward of a supervised rule) left out, the rule's own operators in."
        ),
    ] = "classic",
    rule: Annotated[
        Path | None,
        typer.Option(help="Distill this rule JSON instead of RUN/rule.json (network, tasks from RUN)."),
    ] = None,
    run_index: Annotated[
        int | None, typer.Option(help="Which run of a multi-run result (default: mean coefficients).")
    ] = None,
    episodes: Annotated[int, typer.Option(help="Fresh episodes whose updates are sampled for the fit.")] = 8,
    test_episodes: Annotated[
        int, typer.Option(help="Further fresh episodes for the held-out error and the closed-loop check.")
    ] = 16,
    per_step: Annotated[int, typer.Option(help="Synapses sampled per layer and step (stratified).")] = 32,
    layers: Annotated[
        str | None, typer.Option(help="Comma-separated layer indices to distill (default: all layers).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the fresh episodes and of the sampling.")] = 0,
    check: Annotated[
        bool, typer.Option("--check/--no-check", help="Run the closed-loop check (distilled vs original rule).")
    ] = True,
    out: Annotated[str, typer.Option(help="Sub-directory of RUN for the outputs.")] = "distill",
    settings: Annotated[
        list[str] | None,
        typer.Option("--set", help="Backend parameter KEY=VALUE, repeatable (e.g. --set selection=knee)."),
    ] = None,
    threads: Annotated[
        int, typer.Option(help="CPU threads for torch (default 1: fastest for the small tensors of online steps).")
    ] = 1,
    progress: Annotated[
        bool,
        typer.Option(
            "--progress/--no-progress",
            " /--quiet",
            " /-q",
            help="Stage messages with time estimates and progress bars on stderr (default); --quiet: none.",
        ),
    ] = True,
) -> None:
    """Distill a run's learned rule into a compact formula, check it in the loop, and write LaTeX.

    Samples fresh episodes, fits, selects on the Pareto front, re-runs the formula, writes RUN/<out>/.
    """
    from ..train.runtime import threads as torch_threads
    from .pipeline import distill_run

    try:
        with torch_threads(threads):
            res = distill_run(
                run,
                backend=backend,
                grammar=grammar,
                rule=rule,
                run_index=run_index,
                out=out,
                seed=seed,
                n_episodes=episodes,
                test_episodes=test_episodes,
                n_per_step=per_step,
                layers=parse_layers(layers),
                check=check,
                progress=progress,
                **parse_settings(settings),
            )
    except RuleSearchError as err:
        typer.echo(f"error: {err}", err=True)
        raise typer.Exit(code=2) from None
    for k, r in enumerate(res if isinstance(res, list) else [res]):
        prefix = f"[group {k}] " if isinstance(res, list) else ""
        typer.echo(f"{prefix}dW_ij = {r.rule.sympy()}")
        typer.echo(r.backend.equations())
        if r.identities:
            typer.echo(f"{len(r.identities)} identities on the data (simplest member kept), e.g. {r.identities[0]}")
        typer.echo(f"held-out relative error: {r.heldout_error:.3e}")
        if r.closed_loop is not None:
            typer.echo(f"closed loop: {r.closed_loop}")
    typer.echo(f"wrote {Path(run) / out}/")
