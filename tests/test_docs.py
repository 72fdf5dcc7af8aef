"""The documentation is generated from the code and stays in step with it."""

import importlib.util
from pathlib import Path

import rulesearch

ROOT = Path(__file__).resolve().parents[1]


def _make_api():
    spec = importlib.util.spec_from_file_location("make_api", ROOT / "docs" / "make_api.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_api_reference_lists_every_public_name_and_is_current():
    make_api = _make_api()
    text = make_api.render()
    for name in rulesearch.__all__:
        if not name.startswith("__") and callable(getattr(rulesearch, name)):
            assert f"- `{name}" in text, name
    assert make_api.main(["--check"]) == 0, "docs/api.md is out of date: run python docs/make_api.py"


def test_readme_links_resolve():
    import re

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", readme):
        if not target.startswith("http"):
            assert (ROOT / target).exists(), target
