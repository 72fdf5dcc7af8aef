"""Write docs/api.md: the public API of rulesearch from its docstrings.

Every name in ``__all__`` of the package and its public subpackages, with its signature and the first paragraph of
its docstring, grouped by module. Run from the repository root: ``python docs/make_api.py`` (``--check`` exits 1 if
docs/api.md is out of date).
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import re
import sys
from pathlib import Path

MODULES = (
    ("rulesearch", "Rules, grammars, the compiler and the learning side's main objects"),
    ("rulesearch.lang", "The rule language"),
    ("rulesearch.compile", "Compiling rules to torch (and to C)"),
    ("rulesearch.native", "C kernels built on first use"),
    ("rulesearch.networks", "Networks"),
    ("rulesearch.credit", "Predictive coding"),
    ("rulesearch.tasks", "Tasks and datasets"),
    ("rulesearch.inner", "The inner loop"),
    ("rulesearch.fixedpoint", "Recurrent networks at fixed points"),
    ("rulesearch.reservoir", "Reward-modulated reservoirs"),
    ("rulesearch.train", "Meta-training"),
    ("rulesearch.distill", "Distillation"),
    ("rulesearch.io", "Configs, run directories, figures, statistics"),
    ("rulesearch.io.summary", "Per-run summaries of a meta-training history"),
)


def _summary(obj) -> str:
    doc = inspect.getdoc(obj) or ""
    para = doc.split("\n\n")[0].strip()
    return " ".join(para.split())


def _signature(name: str, obj) -> str:
    """``name(params)``; defaults whose repr carries a memory address are shown as ``...``."""
    if inspect.isclass(obj) or inspect.isfunction(obj):
        try:
            sig = str(inspect.signature(obj))
        except (TypeError, ValueError):
            return name
        return name + re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "...", sig)
    return name


def render() -> str:
    """The text of docs/api.md."""
    lines = [
        "# API reference",
        "",
        "Generated from the docstrings by `python docs/make_api.py`; the full docstrings are in the code",
        "(`help(rulesearch.RuleSearch)`). Each name is listed under the first module that exports it.",
        "",
    ]
    seen: set[int] = set()
    for modname, title in MODULES:
        mod = importlib.import_module(modname)
        rows = []
        for name in mod.__all__:
            obj = getattr(mod, name)
            if name.startswith("__") or id(obj) in seen or not (inspect.isclass(obj) or callable(obj)):
                continue
            seen.add(id(obj))
            rows.append(f"- `{_signature(name, obj)}`" + (f": {_summary(obj)}" if _summary(obj) else ""))
        if rows:
            lines += [f"## {title} (`{modname}`)", "", _summary(mod), "", *rows, ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/api.md differs from the docstrings")
    args = parser.parse_args(argv)
    path = Path(__file__).with_name("api.md")
    text = render()
    if args.check:
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        if current != text:
            print(f"{path} is out of date; run python docs/make_api.py", file=sys.stderr)
            return 1
        return 0
    path.write_text(text, encoding="utf-8")
    print(f"wrote {path} ({len(text.splitlines())} lines)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
