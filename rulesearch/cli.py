"""The ``rulesearch`` command line: thin verbs over library calls.

``discover`` meta-learns a rule (:func:`rulesearch.train.discover`), ``evaluate`` compares a rule with the f0
baselines on fresh tasks (:func:`rulesearch.evaluate.evaluate_spec`), ``distill`` turns a trained rule into a
formula (:mod:`rulesearch.distill.cli`), ``export`` prints a trained rule as LaTeX, JSON or Markdown
(:func:`rulesearch.train.export_run`), ``terms`` lists the terms of a rule, pool or grammar
(:func:`rulesearch.train.terms_table`). Every command parses its options into a config object and calls one
library function; errors are printed as one message (what was received, what was expected) with exit code 2 for
bad input and 1 for failed runs (divergence, a full disk). ``discover`` exits with 3 when it finished but some runs
stopped on divergence: the reported rule is that of the other runs.

Precedence of settings in ``discover``: defaults < ``--config FILE`` < explicit options < ``--set key=value``.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Annotated

import typer

from .errors import DivergenceError, RuleSearchError, StorageError

app = typer.Typer(
    name="rulesearch",
    help="Discover biologically plausible synaptic plasticity rules: meta-learn, evaluate, export.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


def _fail(err: Exception) -> typer.Exit:
    typer.echo(f"Error: {err}", err=True)
    return typer.Exit(code=1 if isinstance(err, (DivergenceError, StorageError)) else 2)


def _ints(text: str | None, name: str) -> tuple[int, ...] | None:
    if text is None:
        return None
    from .errors import ConfigError

    parts = re.split(r"\s*(?:,|x|(?<=\d)-)\s*", text.strip())  # 64,170,10 or 64-170-10 or 64x170x10
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise ConfigError(
            f"Option {name}: received {text!r}, expected integers separated by commas, e.g. 64,170,130,100,70,10."
        ) from None


def _names(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _floats(text: str | None, name: str) -> tuple[float, ...] | None:
    if text is None:
        return None
    from .errors import ConfigError

    try:
        return tuple(float(p) for p in text.split(",") if p.strip())
    except ValueError:
        raise ConfigError(f"Option {name}: received {text!r}, expected numbers separated by commas.") from None


@app.command()
def discover(
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="YAML or JSON file of settings (the keys of config.yaml in a run directory)."
        ),
    ] = None,
    dataset: Annotated[
        str | None, typer.Option(help="Dataset: digits (default), emnist, mnist, fashion-mnist, teacher, lowrank.")
    ] = None,
    data_dir: Annotated[
        str | None,
        typer.Option(help="Folder of file datasets such as EMNIST (default $RULESEARCH_DATA or ../shared/data)."),
    ] = None,
    sizes: Annotated[
        str | None,
        typer.Option(
            help="Layer widths input,...,output, e.g. 64,170,130,100,70,10 (default: dataset in/out around "
            "170,130,100,70)."
        ),
    ] = None,  # fmt: skip
    feedback: Annotated[str | None, typer.Option(help="Error pathway: bp, fa (default), sign, dfa, plastic.")] = None,
    credit: Annotated[
        str | None,
        typer.Option(
            help="Where the errors come from: feedback (default: the --feedback pathway), pc-fixedpred or pc-strict "
            "(predictive-coding inference through W^T; rules then read PC prediction errors)."
        ),
    ] = None,
    pc_iters: Annotated[
        int | None,
        typer.Option(help="Under --credit pc-*: inference iterations n (default: L+1 for pc-fixedpred, 20 strict)."),
    ] = None,
    pc_eta: Annotated[
        float | None,
        typer.Option(help="Under --credit pc-*: belief step size eta (default 1.0 for pc-fixedpred, 0.1 strict)."),
    ] = None,
    feedback_rule: Annotated[
        str | None,
        typer.Option(
            help="Under --feedback plastic: the rule updating the feedback matrices, kp (default; Kolen-Pollack "
            "-e_i x_j and decay -B_ji), a named rule (f0, ...) or a rule JSON file."
        ),
    ] = None,
    feedback_init: Annotated[
        str | None,
        typer.Option(help="Initial coefficients of the feedback rule, comma-separated (default: theta0, 0, ...)."),
    ] = None,
    meta_feedback: Annotated[
        bool | None,
        typer.Option(
            "--meta-feedback/--fixed-feedback",
            help="Meta-learn the feedback rule's coefficients too (default) or keep them at their initial values.",
        ),
    ] = None,
    rule: Annotated[
        str | None,
        typer.Option(
            help="Rule to meta-learn: pool (default), pool_f5mean, f0, ehebb, oja, bio, neural, grammar:default, "
            "grammar:classic, or a rule JSON file."
        ),
    ] = None,
    grammar: Annotated[
        str | None,
        typer.Option(help="Meta-learn every term of a grammar (default or classic); same as --rule grammar:NAME."),
    ] = None,
    terms: Annotated[
        str | None, typer.Option(help="Keep only these terms of the rule, comma-separated (e.g. F0,F2,F9).")
    ] = None,
    ways: Annotated[int | None, typer.Option("--ways", "-M", help="Classes per episode M (default 5).")] = None,
    shots: Annotated[
        int | None, typer.Option("--shots", "-K", help="Training samples per class K (default 50).")
    ] = None,
    queries: Annotated[
        int | None, typer.Option("--queries", "-Q", help="Query samples per class Q (default 10).")
    ] = None,
    episodes: Annotated[int | None, typer.Option(help="Meta-steps per run (default 100).")] = None,
    meta_batch: Annotated[
        int | None, typer.Option(help="Episodes per meta-step and run B (default 1, the paper's).")
    ] = None,
    runs: Annotated[
        int | None, typer.Option(help="Independent runs (seeds) trained together as one batch (default 1).")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the first run (default 0).")] = None,
    l1: Annotated[
        float | None, typer.Option("--l1", "--lambda", help="L1 strength lambda on the coefficients.")
    ] = None,
    l1_mode: Annotated[
        str | None,
        typer.Option(
            help="L1 as a subgradient in the meta-loss (default) or a proximal soft-threshold step in Adam's metric "
            "(proximal): a coefficient then stays exactly 0 while its mean query-loss gradient is below lambda."
        ),
    ] = None,
    lr: Annotated[float | None, typer.Option(help="Adam learning rate (default 3e-4; the paper's 1e-3).")] = None,
    clip: Annotated[
        float | None, typer.Option(help="Clip each run's meta-gradient to this norm (default: none).")
    ] = None,
    term_scale: Annotated[
        str | None,
        typer.Option(
            help="Adam step per coefficient: none (one lr, the paper) or rms (lr scaled by rms(F0)/rms(F_r) of the "
            "terms' updates in a probe episode, so every coefficient's step changes dW about equally) or capped "
            "(the same, never above lr)."
        ),
    ] = None,
    theta0: Annotated[float | None, typer.Option(help="Initial value of the first coefficient (default 1e-3).")] = None,
    init: Annotated[str | None, typer.Option(help="Initial coefficients, one per term, comma-separated.")] = None,
    per_layer: Annotated[
        bool | None,
        typer.Option(
            "--per-layer/--shared", help="One coefficient vector per layer instead of one shared by all layers."
        ),
    ] = None,
    dtype: Annotated[str | None, typer.Option(help="float32 (default) or float64.")] = None,
    device: Annotated[str | None, typer.Option(help="Torch device: cpu (default), cuda, cuda:1, ...")] = None,
    threads: Annotated[
        int | None, typer.Option(help="CPU threads for torch (default 1: fastest for the small matrices of B=1).")
    ] = None,
    checkpoint_every: Annotated[
        int | None, typer.Option(help="Checkpoint every this many meta-steps (default 10).")
    ] = None,
    compare: Annotated[
        bool | None,
        typer.Option("--compare/--no-compare", help="Run f0 under fa and bp on the first/last 10% tasks (default on)."),
    ] = None,
    out: Annotated[Path | None, typer.Option(help="Run directory (default ./runs/<name>).")] = None,
    name: Annotated[
        str | None, typer.Option(help="Run name: the run goes to ./runs/NAME (default: a timestamp).")
    ] = None,
    resume: Annotated[
        bool, typer.Option(help="Continue the run in --out / --name from its newest checkpoint.")
    ] = False,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override any config key, e.g. --set task.options.per_class=400 (repeatable)."),
    ] = None,
    progress: Annotated[bool, typer.Option(help="Show a progress bar with the live meta-accuracy.")] = True,
    distributed: Annotated[
        bool | None,
        typer.Option(
            "--distributed/--no-distributed",
            help="Data-parallel over torchrun processes (default: when launched by torchrun, WORLD_SIZE > 1).",
        ),
    ] = None,
    show_config: Annotated[bool, typer.Option(help="Print the resolved configuration and exit.")] = False,
):
    """Meta-learn a plasticity rule (default: the paper's 10-term pool with L1, feedback alignment, digits).

    The paper's settings throughout, except the Adam learning rate: 3e-4 (the paper's 1e-3 diverges on digits;
    --lr 1e-3 restores it). The run directory is locked while the run lasts. Exit codes: 0 finished, 1 failed (every
    run diverged, a full disk), 2 bad input, 3 finished but some runs stopped on divergence and were left out of the
    reported rule.
    """
    from .io.config import apply_overrides, dump_yaml, load_config
    from .train import discover as run_discover
    from .train import main_job_config

    try:
        data = load_config(config) if config is not None else {}
        cfg = main_job_config(data)
        if grammar is not None and rule is not None:
            from .errors import ConfigError

            raise ConfigError("Give --rule or --grammar, not both.")
        options = {
            "rule": f"grammar:{grammar}" if grammar is not None else rule,
            "terms": _names(terms),
            "task.dataset": dataset,
            "task.data_dir": data_dir,
            "task.M": ways,
            "task.K": shots,
            "task.Q": queries,
            "network.sizes": _ints(sizes, "--sizes"),
            "network.feedback": feedback,
            "network.credit": credit,
            "network.pc_iters": pc_iters,
            "network.pc_eta": pc_eta,
            "network.feedback_rule": feedback_rule,
            "meta.feedback_init": _floats(feedback_init, "--feedback-init"),
            "meta.meta_feedback": meta_feedback,
            "meta.episodes": episodes,
            "meta.meta_batch": meta_batch,
            "meta.runs": runs,
            "meta.seed": seed,
            "meta.l1": l1,
            "meta.l1_mode": l1_mode,
            "meta.lr": lr,
            "meta.clip": clip,
            "meta.term_scale": term_scale,
            "meta.theta0": theta0,
            "meta.init": _floats(init, "--init"),
            "meta.per_layer": per_layer,
            "meta.dtype": dtype,
            "meta.device": device,
            "meta.threads": threads,
            "meta.checkpoint_every": checkpoint_every,
            "meta.compare": compare,
        }
        cfg = cfg.replace(**{k: v for k, v in options.items() if v is not None})
        cfg = apply_overrides(cfg, set_ or [])
        if show_config:
            typer.echo(dump_yaml(cfg.to_dict()), nl=False)
            return
        search = run_discover(cfg, out=out, name=name, resume=resume, progress=progress, distributed=distributed)
    except RuleSearchError as err:
        raise _fail(err) from None
    if search.world_[0] == 0:  # rank 0 of a torchrun launch speaks for all
        typer.echo(search.report())
    if search.stopped_runs_:
        typer.echo(
            f"Warning: {len(search.stopped_runs_)} of {search.n_runs_} runs stopped on divergence and are left out "
            "of the reported rule (see above); exit code 3.",
            err=True,
        )
        raise typer.Exit(code=3)


@app.command()
def evaluate(
    rule_or_run: Annotated[
        list[str],
        typer.Argument(
            help="One or more rules, compared side by side on the same episodes: run directories, rule JSON files or "
            "named rules (pool, pool_f5mean, f0, ehebb, oja, bio); NAME@v1,v2,... gives a linear rule its "
            "coefficients (f0@0.05)."
        ),
    ],
    feedback: Annotated[
        str | None, typer.Option(help="Feedback mode the rule runs under (default: the run's, or fa).")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Dataset of the tasks (default: the run's, or digits).")] = None,
    data_dir: Annotated[str | None, typer.Option(help="Folder of file datasets such as EMNIST.")] = None,
    classes: Annotated[
        str, typer.Option(help="Classes of the tasks: train (the meta-training side) or held-out.")
    ] = "train",
    split: Annotated[
        str | None,
        typer.Option(help="Class split (all, digits, letters, or a fraction like 0.8); needed for --classes held-out."),
    ] = None,
    seeds: Annotated[int, typer.Option(help="Independent evaluation seeds (the unit of the bootstrap).")] = 10,
    episodes: Annotated[int, typer.Option(help="Episodes per seed.")] = 5,
    ways: Annotated[int | None, typer.Option("--ways", "-M", help="Classes per episode M.")] = None,
    shots: Annotated[int | None, typer.Option("--shots", "-K", help="Training samples per class K.")] = None,
    queries: Annotated[int | None, typer.Option("--queries", "-Q", help="Query samples per class Q.")] = None,
    sizes: Annotated[str | None, typer.Option(help="Layer widths input,...,output (default: the run's).")] = None,
    baseline_lr: Annotated[
        float | None, typer.Option(help="Learning rate of the f0 baselines (default: the rule's -e x coefficient).")
    ] = None,
    baselines: Annotated[bool, typer.Option(help="Also evaluate f0 under fa and bp on the same episodes.")] = True,
    theta0: Annotated[float, typer.Option(help="First coefficient of a rule that carries no trained values.")] = 1e-3,
    run: Annotated[
        int | None, typer.Option(help="Use the parameters of this run of a multi-run result (default: mean).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="float32 or float64.")] = "float32",
    device: Annotated[str, typer.Option(help="Torch device: cpu, cuda, ...")] = "cpu",
    out: Annotated[
        Path | None,
        typer.Option(
            help="Directory for the table and plot (default: RUN/evaluation for a single run directory, else none)."
        ),
    ] = None,
):
    """Evaluate rules against f0 under fa and bp on fresh tasks, with 95% bootstrap intervals over seeds."""
    from .evaluate import EvalConfig, evaluate_spec

    try:
        network = {k: v for k, v in {"feedback": feedback, "sizes": _ints(sizes, "--sizes")}.items() if v is not None}
        task = {
            k: v
            for k, v in {
                "dataset": dataset,
                "data_dir": data_dir,
                "split": split,
                "M": ways,
                "K": shots,
                "Q": queries,
            }.items()
            if v is not None
        }
        cfg = EvalConfig.from_dict(
            {
                "seeds": seeds,
                "episodes": episodes,
                "classes": classes,
                "baselines": baselines,
                "baseline_lr": baseline_lr,
                "theta0": theta0,
                "dtype": dtype,
                "device": device,
            }
        )
        specs = rule_or_run[0] if len(rule_or_run) == 1 else rule_or_run
        ev, target = evaluate_spec(specs, network=network, task=task, config=cfg, run=run, out=out)
    except RuleSearchError as err:
        raise _fail(err) from None
    typer.echo(str(ev))
    if target is not None:
        typer.echo(f"results: {target}")


@app.command()
def export(
    run: Annotated[Path, typer.Argument(help="A run directory or a rule JSON file.")],
    format: Annotated[str, typer.Option("--format", "-f", help="Output format: latex, json or markdown.")] = "latex",
    precision: Annotated[int, typer.Option(help="Significant digits of the coefficients.")] = 3,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="Write to this file instead of stdout.")] = None,
):
    """Print a trained rule (mean and 95% interval per coefficient across runs) as LaTeX, JSON or Markdown."""
    from .train import export_run

    try:
        text = export_run(run, format, precision)
    except RuleSearchError as err:
        raise _fail(err) from None
    if output is not None:
        from .io.runs import atomic_write_text

        atomic_write_text(output, text + "\n")
        typer.echo(f"wrote {output}")
    else:
        typer.echo(text)


@app.command()
def terms(
    rule: Annotated[
        str, typer.Option(help="A named rule (pool, pool_f5mean, f0, ehebb, oja, bio) or a rule JSON file.")
    ] = "pool",
    grammar: Annotated[
        str | None, typer.Option(help="List the terms of a grammar instead: default or classic (overrides --rule).")
    ] = None,
    describe: Annotated[
        bool, typer.Option(help="Also print the grammar's summary (counts by degree and locality).")
    ] = False,
):
    """List the terms of a pool, rule or grammar with their LaTeX and locality class."""
    from .train import terms_table

    try:
        spec = f"grammar:{grammar}" if grammar is not None else rule
        if describe and grammar is not None:
            from .lang.grammar import Grammar

            g = {"default": Grammar.default, "classic": Grammar.classic}.get(grammar)
            if g is not None:
                typer.echo(g().describe())
        typer.echo(terms_table(spec))
    except RuleSearchError as err:
        raise _fail(err) from None


def _register_distill() -> None:
    from .distill.cli import distill_command  # a thin verb over rulesearch.distill.pipeline.distill_run

    app.command("distill")(distill_command)


_register_distill()


def main() -> None:  # pragma: no cover - console entry point alternative
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
