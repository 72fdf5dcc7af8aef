"""Smoke tests of the `rulesearch` command line (typer.testing.CliRunner), tiny configs."""

import json
import re

import pytest
import typer
from texcheck import latex_errors
from typer.testing import CliRunner

from rulesearch.cli import app
from rulesearch.io.runs import RunDir

runner = CliRunner()

TINY = [
    "--dataset", "teacher", "--set", "task.options={n_in: 6, n_classes: 3, n_samples: 150}",
    "--sizes", "6,5,3", "-M", "3", "-K", "3", "-Q", "2", "--episodes", "3", "--dtype", "float64",
    "--threads", "1", "--no-progress",
]  # fmt: skip


def invoke(*args):
    result = runner.invoke(app, [str(a) for a in args])
    return result, result.output + (getattr(result, "stderr", "") if result.stderr_bytes is not None else "")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    result, text = invoke("discover", *TINY, "--runs", "2", "--out", out)
    assert result.exit_code == 0, text
    return out, text


def test_discover_prints_rule_accuracies_baselines_and_run_dir(run_dir):
    out, text = run_dir
    assert "Discovered rule (mean of 2 runs, 3 meta-steps)" in text
    assert "first 10%" in text and "last 10%" in text and "f0 (fa)" in text and "f0 (bp)" in text
    assert f"run directory: {out}" in text
    assert RunDir.open(out).is_finished


def _numbers(text: str, latex: bool) -> list[float]:
    """The decimal numbers of a console formula or a LaTeX one (``1.2 \\cdot 10^{-4}``), in order."""
    if latex:
        found = re.findall(r"(\d+(?:\.\d+)?)(?: \\cdot 10\^\{(-?\d+)\})?", re.sub(r"_\{\d+\}", "", text))
        return [float(f"{m}e{e or 0}") for m, e in found]
    return [float(m) for m in re.findall(r"\d+\.\d*(?:e[-+]\d+)?", text)]


def test_rule_tex_is_an_input_able_fragment_with_the_console_digits(run_dir):
    out, text = run_dir
    tex = (out / "rule.tex").read_text()
    head, _, body = tex.partition("\n\\begin{equation}\n")
    assert head.startswith("%") and all(line.startswith("%") for line in head.splitlines())
    assert r"\usepackage{booktabs}" in head and r"\usepackage{amsmath}" in head
    equation, _, table = body.partition("\n\\end{equation}\n\n")
    assert equation.startswith(r"\Delta W_{ij} = ") and "\n" not in equation and not latex_errors(equation)
    assert table.startswith(r"\begin{tabular}") and table.rstrip().endswith(r"\end{tabular}")
    cells = re.findall(r"\$([^$]*)\$", table)
    assert cells and not [c for c in cells if latex_errors(c)]
    # the equation has the console formula's digits, the table the console table's (each value to 4 digits)
    console = next(line for line in text.splitlines() if "dW_ij = " in line)
    assert sorted(_numbers(equation, latex=True)) == sorted(_numbers(console, latex=False))
    rows = [line.split() for line in text.splitlines() if re.match(r"\s+F\d\s", line)]
    values = [float(r[2]) for r in rows]
    tabled = [_numbers(line.split("&")[2], latex=True)[0] for line in table.splitlines() if re.match(r"F\d &", line)]
    assert len(values) == 10 and [abs(v) for v in values] == tabled


def test_export_formats(run_dir, tmp_path):
    out, _ = run_dir
    for fmt, marker in (("latex", r"\begin{tabular}"), ("markdown", "| term |"), ("json", '"format"')):
        result, text = invoke("export", out, "--format", fmt)
        assert result.exit_code == 0, text
        assert marker in text
    result, text = invoke("export", out, "-f", "json", "-o", tmp_path / "rule.json")
    assert result.exit_code == 0 and json.loads((tmp_path / "rule.json").read_text())["runs"]
    result, text = invoke("export", out, "--format", "html")
    assert result.exit_code == 2 and "latex, json, markdown" in text


def test_evaluate_run_and_named_rule(run_dir, tmp_path):
    out, _ = run_dir
    result, text = invoke("evaluate", out, "--seeds", "3", "--episodes", "2", "--dtype", "float64", "--feedback", "bp")
    assert result.exit_code == 0, text
    assert "rule (bp)" in text and "95% interval" in text and (out / "evaluation" / "evaluation.png").is_file()
    result, text = invoke(
        "evaluate", "f0", "--dataset", "digits", "--sizes", "64,6,10", "-M", "3", "-K", "2", "-Q", "2",
        "--seeds", "2", "--episodes", "1", "--theta0", "0.05", "--out", tmp_path / "ev",
    )  # fmt: skip
    assert result.exit_code == 0, text
    assert (tmp_path / "ev" / "evaluation.csv").is_file()


def test_terms():
    result, text = invoke("terms")
    assert result.exit_code == 0 and "F9" in text and "layer-nonlocal" in text and r"W^\top y" in text
    result, text = invoke("terms", "--grammar", "classic", "--describe")
    assert result.exit_code == 0 and "Grammar 'classic'" in text and "synapse-local" in text
    assert "no LaTeX" not in text and r"\left(W^\top y\right)_{j}^{2}" in text  # powers of operators print
    result, text = invoke("terms", "--grammar", "fancy")
    assert result.exit_code == 2 and "grammar:default" in text


def test_bad_config_value_names_key_and_allowed_values(tmp_path):
    out = tmp_path / "run"
    result, text = invoke("discover", *TINY, "--feedback", "fx", "--out", out)
    assert result.exit_code == 2
    assert "network.feedback" in text and "'fa'" in text and "'bp'" in text
    assert not out.exists()
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("meta:\n  episode: 3\n")
    result, text = invoke("discover", "--config", cfg, "--out", out)
    assert result.exit_code == 2 and "Did you mean 'episodes'" in text
    result, text = invoke("discover", *TINY, "--set", "task.M=0", "--out", out)
    assert result.exit_code == 2 and "task.M" in text
    assert not out.exists()


def test_device_recorded_and_missing_cuda_refused(tmp_path, monkeypatch):
    out = tmp_path / "a"
    result, text = invoke("discover", *TINY, "--episodes", 1, "--no-compare", "--device", "cpu", "--out", out)
    assert result.exit_code == 0, text
    manifest = RunDir.open(out).manifest()
    assert manifest["device"] == "cpu" and manifest["inner_loop"] in ("native", "adjoint")  # native: a C compiler
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    result, text = invoke("discover", *TINY, "--device", "cuda", "--out", tmp_path / "b")
    assert result.exit_code == 2 and "CUDA is not available" in text and "--device cpu" in text
    assert not (tmp_path / "b").exists()


def test_failed_run_is_not_marked_finished(tmp_path):
    out = tmp_path / "run"
    result, text = invoke(
        "discover", *TINY, "--rule", "f0", "--theta0", "1e4", "--set", "meta.max_skips=2", "--out", out
    )
    assert result.exit_code == 1 and "consecutive" in text
    assert not RunDir.open(out).is_finished


def test_config_file_resume_and_show_config(tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text("meta:\n  episodes: 2\n  l1: 0.2\nnetwork:\n  feedback: bp\n")
    result, text = invoke("discover", "--config", cfg, "--show-config", "--episodes", "5")
    assert result.exit_code == 0 and "episodes: 5" in text and "l1: 0.2" in text and "feedback: bp" in text
    out = tmp_path / "run"
    result, text = invoke("discover", *TINY, "--out", out)
    assert result.exit_code == 0, text
    result, text = invoke("discover", *TINY, "--out", out)
    assert result.exit_code == 2 and "--resume" in text
    result, text = invoke("discover", *TINY, "--out", out, "--resume")
    assert result.exit_code == 0, text
    result, text = invoke("discover", "--resume")
    assert result.exit_code == 2 and "--out" in text


@pytest.mark.parametrize("command", ["discover", "evaluate", "export", "terms"])
def test_help_explains_every_option(command):
    result, text = invoke(command, "--help")
    assert result.exit_code == 0
    group = typer.main.get_command(app)
    params = group.commands[command].params
    assert params
    for p in params:
        assert (getattr(p, "help", None) or "").strip(), f"{command}: {p.name} has no help"
        assert p.opts[0] in text or p.name.upper() in text or p.human_readable_name in text


LIGHT_COMMANDS = r"""
import sys

import rulesearch

assert not {"torch", "sympy"} & set(sys.modules), "import rulesearch"
from typer.testing import CliRunner

from rulesearch.cli import app

runner = CliRunner()
rule_file, out = sys.argv[1:]
result = runner.invoke(app, ["--help"])
assert result.exit_code == 0 and "distill" in result.output, result.output
heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "pandas", "sympy", "numpy"})
assert not heavy, f"rulesearch --help imported {heavy}"
for args in (["--help"], ["terms"], ["terms", "--rule", "bio"], ["terms", "--grammar", "default", "--describe"],
             ["export", rule_file], ["export", rule_file, "-f", "json"], ["export", rule_file, "-f", "markdown"],
             ["export", rule_file, "-o", out]):
    result = runner.invoke(app, args)
    assert result.exit_code == 0, (args, result.output)
    heavy = sorted({m.split(".")[0] for m in sys.modules} & {"torch", "pandas"})
    assert not heavy, f"rulesearch {' '.join(args)} imported {heavy}"
print("light")
"""


def test_terms_export_and_help_do_not_import_torch(tmp_path):
    """``import rulesearch`` and ``--help`` load neither SymPy nor torch, and the commands that only read and print
    rules neither torch nor pandas (checked in a fresh interpreter's ``sys.modules``)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import numpy as np

    from rulesearch import pool
    from rulesearch.train import trained_rule_json

    rule = pool
    runs = np.linspace(-1, 1, 2 * rule.n_terms).reshape(2, rule.n_terms)
    data = trained_rule_json(rule.with_values(runs.mean(0)), runs=runs, intervals=np.stack([runs[0], runs[1]], 1))
    (tmp_path / "rule.json").write_text(json.dumps(data))
    root = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    args = [sys.executable, "-c", LIGHT_COMMANDS, str(tmp_path / "rule.json"), str(tmp_path / "rule.tex")]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0 and "light" in proc.stdout, proc.stdout + proc.stderr
    assert (tmp_path / "rule.tex").read_text().startswith("%")
