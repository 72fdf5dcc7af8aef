r"""A small structural check of LaTeX math (no TeX installation needed): what TeX would reject in a formula.

:func:`latex_errors` reports unbalanced braces, ``\left``/``\right`` and ``\begin``/``\end``; double super- or
subscripts (a prime is a superscript: ``e'_{j}^{2}`` fails in TeX, ``{e'_{j}}^{2}`` does not); commands outside
the ones rule formulas use; and Python left in the text (``**``, operator class names).
"""

from __future__ import annotations

import re

KNOWN_COMMANDS = {
    # structure and spacing
    "left", "right", "frac", "sqrt", "begin", "end", "text", "mathrm", "textstyle", "quad", "cdot", "top", "le",
    "sum", "bar", "prime", "Delta", " ", "infty", ":", ",", "\\", "_", "{", "}", "|", "operatorname",
    # glyphs of signals and functions
    "ell", "theta", "max", "min", "exp", "log", "tanh", "sinh", "cosh", "sin", "cos", "pi",
}  # fmt: skip
PYTHON_LEFTOVERS = ("**", "Contract", "LayerSum", "Bilinear", "OrderedContract", "Piecewise", "Heaviside")
_TOKEN = re.compile(r"\\[A-Za-z]+|\\.|[{}^_']|\s+|[^\\{}^_'\s]")


def latex_errors(tex: str) -> list[str]:
    """What is wrong with the math-mode LaTeX ``tex`` (empty when it looks valid)."""
    errors = [f"Python left in the LaTeX: {p!r}" for p in PYTHON_LEFTOVERS if p in tex]
    # a frame per open group: its closing token, and the script state of the atom being built in it
    stack = [{"close": None, "sup": False, "sub": False, "prime": False}]
    envs: list[str] = []
    script_arg = False  # the next token or group is the argument of ^ or _
    prev = ""
    tokens = _TOKEN.findall(tex)
    k = 0
    while k < len(tokens):
        tok = tokens[k]
        k += 1
        top = stack[-1]
        if tok.isspace():
            continue
        if tok.startswith("\\") and tok[1:] not in KNOWN_COMMANDS:
            errors.append(f"unknown command {tok}")
        if tok in ("^", "_"):
            key = "sup" if tok == "^" else "sub"
            if script_arg:
                errors.append(f"{tok} as the argument of a script")
            elif key == "sup" and top["sup"] and not (prev == "'" and top["prime"]):
                errors.append(f"double superscript at token {k}: ...{''.join(tokens[max(0, k - 8) : k])}")
            elif key == "sub" and top["sub"]:
                errors.append(f"double subscript at token {k}: ...{''.join(tokens[max(0, k - 8) : k])}")
            top[key] = True
            top["prime"] = False
            script_arg = True
        elif tok == "'":
            if top["sup"] and prev != "'":
                errors.append(f"prime after a superscript at token {k}")
            top["sup"] = top["prime"] = True
        elif tok in (r"\left", r"\right") and k >= len(tokens):
            errors.append(f"{tok} without a delimiter")
        elif tok in ("{", r"\left"):
            if tok == r"\left":
                k += 1  # the delimiter
            stack.append({"close": "}" if tok == "{" else r"\right", "arg": script_arg, "env": len(envs)}
                         | {"sup": False, "sub": False, "prime": False})  # fmt: skip
            script_arg = False
        elif tok in ("}", r"\right"):
            if tok == r"\right":
                k += 1
            if top["close"] != tok:
                errors.append(f"unbalanced {tok} at token {k}")
                prev = tok
                continue
            stack.pop()
            if not top["arg"]:  # a group or \left...\right is a new atom; a script argument keeps its atom
                stack[-1].update(sup=False, sub=False, prime=False)
        elif tok in (r"\begin", r"\end"):
            close = tokens.index("}", k) if "}" in tokens[k:] else -1
            name = "".join(tokens[k + 1 : close])
            if close < 0 or tokens[k] != "{" or not re.fullmatch(r"\w+\*?", name):
                errors.append(f"{tok} without an environment name")
                break
            k = close + 1
            if tok == r"\begin":
                envs.append(name)
            elif not envs or envs.pop() != name:
                errors.append(rf"\end{{{name}}} does not close the open environment")
            top.update(sup=False, sub=False, prime=False)
        elif script_arg:
            script_arg = False  # a one-token argument: the atom keeps its scripts
        else:
            top.update(sup=False, sub=False, prime=False)  # a new atom
        prev = tok
    if len(stack) > 1:
        errors.append(f"{len(stack) - 1} unclosed group(s)")
    if envs:
        errors.append(f"unclosed environments {envs}")
    if script_arg:
        errors.append("a script without an argument at the end")
    return errors
