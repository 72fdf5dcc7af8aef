"""Tests for rulesearch.io.config: strict, serializable, documented nested frozen dataclasses."""

from __future__ import annotations

import dataclasses
import enum
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import pytest

from rulesearch.errors import ConfigError
from rulesearch.io.config import (
    Config,
    apply_overrides,
    dump_yaml,
    field_docs,
    from_dict,
    load_config,
    load_yaml,
    option,
    parse_overrides,
    replace,
    save_config,
    to_dict,
    undocumented_fields,
)


class Mode(enum.Enum):
    HEBB = "hebb"
    OJA = "oja"


@dataclass(frozen=True)
class InnerExample(Config):
    lr: float = option(0.01, help="Inner-loop learning rate.")
    n_steps: int = option(100, help="Online steps per episode.")
    feedback: str = option("fa", help="Feedback pathway.", choices=("bp", "fa", "dfa", "sign"))
    sizes: tuple[int, ...] = option((784, 100, 10), help="Layer sizes, input first.")


@dataclass(frozen=True)
class MetaExample(Config):
    lr: float = option(1e-3, help="Meta learning rate.")
    l1: float | None = option(None, help="L1 penalty on theta (None: off).")
    terms: tuple[str, ...] = option(("F0", "F1"), help="Pool terms.", choices=("F0", "F1", "F2", "F9"))
    clip: tuple[float, float] = option((-1.0, 1.0), help="Coefficient range.")

    _renamed: ClassVar[dict[str, str]] = {"learning_rate": "lr"}


@dataclass(frozen=True)
class RunExample(Config):
    name: str = option(help="Run name (required).")
    inner: InnerExample = option(default_factory=InnerExample, help="Inner loop.")
    meta: MetaExample = option(default_factory=MetaExample, help="Meta-training.")
    seed: int = option(0, help="Seed of every generator.")
    verbose: bool = option(False, help="Log every step.")
    out: Path | None = option(None, help="Run directory (default ./runs/<name>).")
    mode: Mode = option(Mode.HEBB, help="A rule family.")
    precision: Literal["float32", "float64"] = option("float32", help="Dtype of the inner loop.")
    extra: dict[str, float] = option(default_factory=dict, help="Free-form numeric tags.")


@dataclass(frozen=True)
class Undocumented:
    a: int = 1
    b: int = dataclasses.field(default=2, metadata={"help": "documented"})
    c: InnerExample = dataclasses.field(default_factory=InnerExample, metadata={"help": "   "})


@dataclass(frozen=True)
class Plain:  # no mixin: the module-level functions still validate
    x: int = option(1, help="x.")
    inner: InnerExample = option(default_factory=InnerExample, help="Inner loop.")


def full() -> RunExample:
    return RunExample(
        name="demo",
        inner=InnerExample(lr=0.5, n_steps=3, feedback="dfa", sizes=(4, 3, 2)),
        meta=MetaExample(lr=0.1, l1=1e-4, terms=("F9",), clip=(-2.0, 2.0)),
        seed=7,
        verbose=True,
        out=Path("/tmp/x"),
        mode=Mode.OJA,
        precision="float64",
        extra={"a": 1.5},
    )


# ------------------------------------------------------------------------------------------------- round trip


def test_to_dict_is_plain_and_round_trips():
    cfg = full()
    d = cfg.to_dict()
    assert d["inner"] == {"lr": 0.5, "n_steps": 3, "feedback": "dfa", "sizes": [4, 3, 2]}
    assert d["meta"]["clip"] == [-2.0, 2.0] and d["meta"]["terms"] == ["F9"]
    assert d["out"] == "/tmp/x" and d["mode"] == "oja"
    assert json.loads(json.dumps(d)) == d
    assert load_yaml(dump_yaml(d)) == d
    assert RunExample.from_dict(d) == cfg
    assert from_dict(RunExample, json.loads(json.dumps(d))) == cfg


def test_partial_dict_uses_defaults_and_required_key_is_enforced():
    cfg = RunExample.from_dict({"name": "x", "inner": {"lr": 0.2}})
    assert cfg.inner == InnerExample(lr=0.2) and cfg.meta == MetaExample()
    with pytest.raises(ConfigError, match="'name' is required"):
        RunExample.from_dict({})


def test_construction_normalizes_and_stays_hashable():
    cfg = RunExample(name="x", inner={"sizes": [1, 2]}, meta=MetaExample(lr=1, clip=[0, 1]))
    assert cfg.inner.sizes == (1, 2) and isinstance(cfg.inner, InnerExample)
    assert cfg.meta.lr == 1.0 and isinstance(cfg.meta.lr, float) and cfg.meta.clip == (0.0, 1.0)
    hash(InnerExample(sizes=[1, 2]))
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3


def test_plain_dataclass_without_mixin():
    cfg = from_dict(Plain, {"x": 3, "inner": {"n_steps": 4}})
    assert cfg.inner.n_steps == 4
    assert to_dict(cfg)["inner"]["n_steps"] == 4
    assert replace(cfg, **{"inner.lr": 0.3}).inner.lr == 0.3
    with pytest.raises(ConfigError, match="'inner.n_steps'"):
        from_dict(Plain, {"inner": {"n_steps": "4"}})


# --------------------------------------------------------------------------------------------- strictness


def test_unknown_key_names_key_section_and_suggestion():
    with pytest.raises(ConfigError) as err:
        RunExample.from_dict({"name": "x", "inner": {"n_step": 5}})
    msg = str(err.value)
    assert "'n_step'" in msg and "section 'inner' (InnerExample)" in msg and "Did you mean 'n_steps'?" in msg
    assert "Valid keys: lr, n_steps, feedback, sizes" in msg
    with pytest.raises(ConfigError, match=r"Unknown key 'sed' in config RunExample\. Did you mean 'seed'\?"):
        RunExample.from_dict({"name": "x", "sed": 1})


def test_unknown_key_without_close_match_lists_valid_keys():
    with pytest.raises(ConfigError) as err:
        InnerExample.from_dict({"zzzzzz": 1})
    assert "Did you mean" not in str(err.value) and "Valid keys:" in str(err.value)


@pytest.mark.parametrize(
    "data, key, expected",
    [
        ({"inner": {"lr": "fast"}}, "inner.lr", "expected float"),
        ({"inner": {"n_steps": 1.5}}, "inner.n_steps", "expected int"),
        ({"inner": {"n_steps": True}}, "inner.n_steps", "expected int"),
        ({"verbose": 1}, "verbose", "expected bool"),
        ({"seed": "0"}, "seed", "expected int"),
        ({"inner": {"sizes": [1, "a"]}}, "inner.sizes", "element [1]"),
        ({"meta": {"clip": [1.0]}}, "meta.clip", "expected 2 elements"),
        ({"meta": {"l1": "x"}}, "meta.l1", "expected float | None"),
        ({"precision": "float16"}, "precision", "expected one of 'float32', 'float64'"),
        ({"mode": "hebbian"}, "mode", "expected one of 'hebb', 'oja'"),
        ({"extra": {"a": "b"}}, "extra", "entry 'a'"),
        ({"inner": 3}, "inner", "expected InnerExample (a section: give a mapping of its keys)"),
    ],
    ids=["float", "int-float", "int-bool", "bool", "int-str", "tuple-elem", "tuple-len", "optional",
         "literal", "enum", "dict", "section"],
)  # fmt: skip
def test_wrong_type_names_key_value_and_expected_type(data, key, expected):
    with pytest.raises(ConfigError) as err:
        RunExample.from_dict({"name": "x", **data})
    msg = str(err.value)
    assert repr(key) in msg and expected in msg and "received" in msg


def test_wrong_type_at_construction_names_class_and_field():
    with pytest.raises(ConfigError, match=r"'InnerExample.lr': received 'a' \(str\), expected float"):
        InnerExample(lr="a")


def test_choices_list_allowed_values_and_suggest():
    with pytest.raises(ConfigError) as err:
        RunExample.from_dict({"name": "x", "inner": {"feedback": "dfx"}})
    msg = str(err.value)
    assert "'inner.feedback'" in msg and "'bp', 'fa', 'dfa', 'sign'" in msg and "Did you mean 'dfa'?" in msg
    # choices apply to each element of a tuple field
    assert MetaExample(terms=("F0", "F9")).terms == ("F0", "F9")
    with pytest.raises(ConfigError, match="received 'F7', expected one of 'F0', 'F1', 'F2', 'F9'"):
        MetaExample(terms=("F0", "F7"))


def test_renamed_key_warns_and_maps():
    with pytest.warns(FutureWarning, match="'learning_rate' was renamed to 'lr'"):
        cfg = MetaExample.from_dict({"learning_rate": 0.5})
    assert cfg.lr == 0.5
    with pytest.raises(ConfigError, match="both 'learning_rate' and its new name 'lr'"):
        MetaExample.from_dict({"learning_rate": 0.5, "lr": 0.1})


# --------------------------------------------------------------------------------------------- overrides


def test_replace_with_dotted_keys_and_partial_sections():
    cfg = RunExample(name="x")
    new = cfg.replace(**{"inner.lr": 0.1, "seed": 3, "meta": {"l1": 0.5}})
    assert new.inner.lr == 0.1 and new.seed == 3 and new.meta.l1 == 0.5 and new.meta.lr == cfg.meta.lr
    assert cfg.inner.lr == 0.01  # the original is untouched
    assert cfg.replace(inner=InnerExample(n_steps=9)).inner == InnerExample(n_steps=9)
    assert cfg.replace(**{"extra.tag": 2.0}).extra == {"tag": 2.0}


def test_replace_validates_and_suggests():
    cfg = RunExample(name="x")
    with pytest.raises(ConfigError, match=r"Unknown key 'inner.lrr'.*Did you mean 'lr'\?"):
        cfg.replace(**{"inner.lrr": 0.1})
    with pytest.raises(ConfigError, match="'inner.lr'"):
        cfg.replace(**{"inner.lr": "x"})
    with pytest.raises(ConfigError, match="not a section"):
        cfg.replace(**{"seed.x": 1})


def test_parse_and_apply_cli_overrides():
    assert parse_overrides(["inner.lr=1e-3", "verbose=true", "inner.sizes=[4, 2]", "meta.l1=null"]) == {
        "inner.lr": 1e-3,
        "verbose": True,
        "inner.sizes": [4, 2],
        "meta.l1": None,
    }
    cfg = apply_overrides(RunExample(name="x"), ["inner.lr=0.1", "inner.feedback=bp", "name=007", "out=runs/a"])
    assert cfg.inner.lr == 0.1 and cfg.inner.feedback == "bp"
    assert cfg.name == "007" and cfg.out == Path("runs/a")  # str fields keep the raw text
    with pytest.raises(ConfigError, match="key=value"):
        parse_overrides(["inner.lr"])
    with pytest.raises(ConfigError, match="expected one of"):
        apply_overrides(RunExample(name="x"), ["inner.feedback=xx"])


# ------------------------------------------------------------------------------------------------- files


@pytest.mark.parametrize("suffix", [".yaml", ".yml", ".json"])
def test_save_and_load_files(tmp_path, suffix):
    cfg = full()
    path = save_config(cfg, tmp_path / f"cfg{suffix}")
    assert load_config(path, RunExample) == cfg
    assert load_config(path) == cfg.to_dict()
    assert [p.name for p in tmp_path.iterdir()] == [f"cfg{suffix}"]  # no temp files left


def test_yaml_reads_scientific_notation_as_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("name: x\ninner:\n  lr: 1e-3\nmeta:\n  lr: 5E2\n")
    cfg = load_config(path, RunExample)
    assert cfg.inner.lr == 1e-3 and cfg.meta.lr == 500.0


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="suffix '.toml'"):
        load_config(tmp_path / "c.toml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping at the top level"):
        load_config(lst)
    unknown = tmp_path / "u.yaml"
    unknown.write_text("name: x\ninner:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match="Did you mean 'lr'"):
        load_config(unknown, RunExample)


def test_yaml_loader_is_safe():
    with pytest.raises(Exception, match="python/object"):
        load_yaml("!!python/object/apply:os.system ['echo hi']")


# ------------------------------------------------------------------------------------------ documentation


def test_field_docs_flatten_sections():
    docs = {d.name: d for d in field_docs(RunExample)}
    assert docs["inner.lr"].help == "Inner-loop learning rate." and docs["inner.lr"].default == 0.01
    assert docs["inner.feedback"].choices == ("bp", "fa", "dfa", "sign")
    assert docs["meta.l1"].type == "float | None"
    assert docs["name"].default is dataclasses.MISSING
    assert docs["inner"].help == "Inner loop."


def test_undocumented_fields_finds_missing_help():
    assert undocumented_fields(Undocumented) == ["a", "c"]


def test_every_example_field_is_documented():
    assert undocumented_fields(RunExample) == []
    assert undocumented_fields(sys.modules[__name__]) == ["Undocumented.a", "Undocumented.c"]
