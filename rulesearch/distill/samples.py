r"""Sample the local signals and the resulting updates while a network learns.

:class:`SampleCollector` is an ``observe`` callback for :func:`~rulesearch.inner.run_episodes`. At every step
and layer it sees the detached signals and :math:`\Delta W` ``(B, n_post, n_pre)`` and

1. advances its own copies of the declared state signals (traces, BCM threshold, reward baseline), so the
   table holds every state a grammar can use whatever the observed update computes itself;
2. evaluates every *atom* (signals, contractions such as :math:`(W^\top y)_j`, ordered contractions, user
   factors) in its natural shape from the full signal dict: non-local atoms are exact, not approximated from the
   sampled rows;
3. draws ``n_per_step`` synapses :math:`(b, i, j)` stratified on signal magnitudes: the synapses are ranked by
   the score :math:`\sum_s |s| / \mathrm{rms}(s)` over ``stratify`` (``|x_j|, |y_i|, |e_i|, |e'_j|``; ties in
   random order) and cut into ``n_strata`` dyadic strata (the lower half of the ranks, the next quarter, ..., the
   top :math:`2^{-(n-1)}`); each stratum gets the same number of rows, drawn uniformly, so rare large signals are
   oversampled. The update itself is never used to choose rows (that would bias the fit); each row carries its
   inverse inclusion probability as ``weight``.

The result is a pandas table, one row per sampled synapse and step, with columns ``layer, step, episode, t,
post_index, pre_index, weight``, one column per atom, and ``dw``. Its ``attrs["rulesearch"]`` records the atoms as a
rule JSON (so derived and state signals round-trip) and the signals' dtype. :func:`save_samples` writes Parquet
(CSV plus a JSON sidecar when pyarrow is missing); :func:`load_samples` reads either.

Examples
--------
>>> import torch
>>> from rulesearch.networks.feedforward import Network
>>> from rulesearch.lang.pools import oja
>>> from rulesearch.lang.signals import pre, post, err, w, wT
>>> net = Network(sizes=(6, 5, 3), feedback="fa")
>>> g = torch.Generator().manual_seed(0)
>>> batch = (torch.rand(2, 8, 6, generator=g), torch.randint(3, (2, 8), generator=g),
...          torch.rand(2, 4, 6, generator=g), torch.randint(3, (2, 4), generator=g))
>>> table = collect_samples(net, batch, oja.compile(), torch.tensor([0.01, 0.1]), atoms=[pre, post, err, w, wT(post)],
...                         n_per_step=10, seed=0, run_seed=0)
>>> table.shape[0], list(table.columns[7:])
(160, ['pre', 'post', 'err', 'w', 'Contract(w,post)', 'dw'])
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import sympy as sp
import torch

from ..compile.compiler import TorchCompiler, compile_rule
from ..errors import ConfigError, DivergenceError, ShapeError
from ..inner import SIGNALS, run_episodes
from ..lang.grammar import Grammar
from ..lang.rule import Rule, Term
from ..lang.signals import BASE_SIGNALS, Signal, base_needs, expand_derived, signals_in
from .base import DistillDataError, term_name

__all__ = [
    "SampleCollector",
    "collect_samples",
    "sample_atoms",
    "samples_arrays",
    "samples_features",
    "save_samples",
    "load_samples",
    "ID_COLUMNS",
    "TARGET",
]

ID_COLUMNS = ("layer", "step", "episode", "t", "post_index", "pre_index", "weight")
TARGET = "dw"
_META = "rulesearch"
_STRATIFY = ("pre", "post", "err", "pre_err")


def sample_atoms(grammar: Grammar | None = None, signals: Sequence = ()) -> list[sp.Expr]:
    """The columns to collect: base and state signals used by the grammar's atoms (and by ``signals``), then the
    non-signal atoms (contractions, user factors), in a stable order."""
    exprs = list(grammar.atoms if grammar is not None else ()) + [sp.sympify(s) for s in signals]
    base, derived, other = [], [], []
    for e in exprs:
        for s in sorted(signals_in(expand_derived(e)) | signals_in(e), key=lambda s: s.name):
            if s.is_base:
                if s not in base:
                    base.append(s)
            elif s not in derived:
                derived.append(s)
        if not isinstance(e, Signal) and e not in other:
            other.append(e)
    order = list(BASE_SIGNALS)
    base.sort(key=lambda s: order.index(s.name) if s.name in order else len(order))
    return base + derived + other


def _atom_rule(atoms: Sequence[sp.Expr]) -> Rule:
    return Rule(tuple(Term(term_name(a), a) for a in atoms), "samples")


class SampleCollector:
    """An ``observe(step, layer, signals, dW)`` callback that samples synapses into a table.

    Parameters
    ----------
    atoms : sequence of sympy.Expr
        Columns to record (see :func:`sample_atoms`).
    n_per_step : int
        Rows drawn per layer and step (over all episodes of the batch).
    n_strata : int
        Dyadic strata of the magnitude ranks (halves, quarters, ...); each gets ``n_per_step / n_strata`` rows.
    stratify : sequence of str
        Signals whose magnitudes define the score (those not computed at a step are skipped).
    layers, steps : sequence of int, optional
        Only these layers / steps are sampled (states still advance at every step).
    seed : int
        Seeds the ``torch.Generator`` that draws the rows.
    on_step : callable, optional
        Called once per online step (at its first layer), e.g. to advance a progress bar.
    """

    def __init__(
        self,
        atoms: Sequence[sp.Expr],
        n_per_step: int = 32,
        n_strata: int = 4,
        stratify: Sequence[str] = _STRATIFY,
        layers: Sequence[int] | None = None,
        steps: Sequence[int] | None = None,
        seed: int = 0,
        on_step: Callable[[], None] | None = None,
    ):
        if not atoms:
            raise ConfigError("SampleCollector needs at least one atom (signal or operator) to record.")
        if isinstance(n_per_step, bool) or not isinstance(n_per_step, int) or n_per_step < 1:
            raise ConfigError(f"n_per_step must be an int >= 1; received {n_per_step!r}.")
        if isinstance(n_strata, bool) or not isinstance(n_strata, int) or n_strata < 1:
            raise ConfigError(f"n_strata must be an int >= 1; received {n_strata!r}.")
        unknown = [s for s in stratify if s not in SIGNALS]
        if unknown:
            raise ConfigError(f"stratify names unknown signals {unknown}; base signals are {sorted(SIGNALS)}.")
        self.atoms = [sp.sympify(a) for a in atoms]
        self.names = [term_name(a) for a in self.atoms]
        if len(set(self.names)) != len(self.names):
            raise ConfigError(f"Atoms repeat: {self.names}.")
        self.rule = _atom_rule(self.atoms)  # validates roles
        self.states = compile_rule(self.rule).states
        self._comp = TorchCompiler()
        self._refs = [self._comp.slot(expand_derived(a)) for a in self.atoms]
        needs = set()
        for a in self.atoms:
            needs |= base_needs(a)
        for spec in self.states:
            needs |= set(spec.needs)
        self.needs = frozenset(needs)
        self.n_per_step, self.n_strata = n_per_step, n_strata
        self.stratify = tuple(stratify)
        self.layers = None if layers is None else frozenset(int(x) for x in layers)
        self.steps = None if steps is None else frozenset(int(x) for x in steps)
        self.generator = torch.Generator().manual_seed(int(seed))
        self.on_step = on_step
        self._state: dict[int, dict] = {}
        self._chunks: list[dict[str, np.ndarray]] = []
        self.dtype = None
        self.run_index = 0

    def __call__(self, step: int, layer: int, signals, dw: torch.Tensor) -> None:
        if layer == 0 and self.on_step is not None:
            self.on_step()
        if step == 0:
            self._state[layer] = {}
            if layer == 0 and self._chunks:
                self.run_index += 1
        sig = dict(signals)
        st = self._state.setdefault(layer, {})
        for spec in self.states:
            old = st.get(spec.name)
            new = spec.step(spec.init(sig) if old is None else old, sig)
            sig[spec.name] = new
            st[spec.name] = new
        if self.layers is not None and layer not in self.layers:
            return
        if self.steps is not None and step not in self.steps:
            return
        self.dtype = dw.dtype
        B, n_post, n_pre = dw.shape
        b, i, j, weight = self._draw(sig, dw.shape)
        vals = self._comp.run({"signals": sig, "params": {}})
        chunk = {
            "layer": np.full(len(b), layer, dtype=np.int64),
            "step": np.full(len(b), step, dtype=np.int64),
            "episode": b.numpy().astype(np.int64),
            "t": np.full(len(b), self.run_index, dtype=np.int64),
            "post_index": i.numpy().astype(np.int64),
            "pre_index": j.numpy().astype(np.int64),
            "weight": weight.numpy().astype(np.float64),
        }
        for name, ref in zip(self.names, self._refs):
            chunk[name] = _gather(TorchCompiler.value(ref, vals), self._comp.role(ref), b, i, j)
        chunk[TARGET] = dw[b, i, j].double().numpy()
        self._chunks.append(chunk)

    def _draw(self, sig, shape):
        B, n_post, n_pre = shape
        N = B * n_post * n_pre
        score = torch.zeros(shape, dtype=torch.float64)
        for name in self.stratify:
            t = sig.get(name) if isinstance(sig, dict) else None
            if t is None:
                continue
            a = t.detach().abs().double()
            rms = a.pow(2).mean().sqrt()
            if not torch.isfinite(rms) or rms == 0:
                continue
            role = BASE_SIGNALS[name].role
            a = a / rms
            shape_of = {"post": (B, n_post, 1), "pre": (B, 1, n_pre), "global": (B, 1, 1)}
            if role in shape_of:
                a = a.reshape(shape_of[role])
            score = score + a
        flat = torch.nan_to_num(score.reshape(-1), nan=0.0, posinf=0.0)
        m = min(self.n_per_step, N)
        k = min(self.n_strata, m)
        # rank by score, ties in random order; dyadic strata: the top 1/2, 1/4, ... of the ranks
        perm = torch.randperm(N, generator=self.generator)
        order = perm[torch.argsort(flat[perm], stable=True)]
        q = (torch.arange(N, dtype=torch.float64) + 0.5) / N
        bins = torch.clamp(torch.floor(-torch.log2(1.0 - q)), max=k - 1).long()
        sizes = torch.bincount(bins, minlength=k).tolist()
        starts = [sum(sizes[:s]) for s in range(k)]
        per = [m // k + (1 if s >= k - m % k else 0) for s in range(k)]  # remainder to the top strata
        for s in range(k):  # a stratum smaller than its quota gives the rest to the next larger one
            if per[s] > sizes[s]:
                spare, per[s] = per[s] - sizes[s], sizes[s]
                for t in sorted(range(k), key=lambda t: -sizes[t]):
                    extra = min(spare, sizes[t] - per[t])
                    per[t] += extra
                    spare -= extra
        chosen, weights = [], []
        for s in range(k):
            if per[s] == 0:
                continue
            pick = torch.randperm(sizes[s], generator=self.generator)[: per[s]] + starts[s]
            chosen.append(order[pick])
            weights.append(torch.full((per[s],), sizes[s] / per[s], dtype=torch.float64))
        idx = torch.cat(chosen)
        b = torch.div(idx, n_post * n_pre, rounding_mode="floor")
        rem = idx - b * n_post * n_pre
        i = torch.div(rem, n_pre, rounding_mode="floor")
        j = rem - i * n_pre
        return b, i, j, torch.cat(weights)

    def frame(self) -> pd.DataFrame:
        """The rows collected so far as a DataFrame (see the module docstring for the columns)."""
        cols = list(ID_COLUMNS) + self.names + [TARGET]
        if not self._chunks:
            df = pd.DataFrame({c: pd.Series(dtype=np.float64) for c in cols})
        else:
            df = pd.DataFrame({c: np.concatenate([ch[c] for ch in self._chunks]) for c in cols})
        df.attrs[_META] = {
            "format": 1,
            "atoms": self.rule.to_json(),
            "dtype": str(self.dtype).replace("torch.", "") if self.dtype is not None else "float64",
        }
        return df


def _gather(v, role, b, i, j) -> np.ndarray:
    if not isinstance(v, torch.Tensor):
        return np.full(len(b), float(v))
    v = v.double()
    if role == "global":
        out = v.reshape(-1)[b] if v.dim() else v.expand(len(b))
    elif role == "post":
        out = v[b, i]
    elif role == "pre":
        out = v[b, j]
    else:
        out = v[b, i, j]
    return out.numpy().copy()


def collect_samples(
    net,
    batch,
    update,
    params,
    *,
    grammar: Grammar | None = None,
    atoms: Sequence | None = None,
    signals: Sequence = (),
    n_per_step: int = 32,
    n_strata: int = 4,
    stratify: Sequence[str] = _STRATIFY,
    layers: Sequence[int] | None = None,
    steps: Sequence[int] | None = None,
    seed: int = 0,
    run_seed: int | None = None,
    drop_diverged: bool = True,
    on_step: Callable[[], None] | None = None,
    **run_kwargs,
) -> pd.DataFrame:
    """Run ``update`` on ``batch`` and return the sampled signal table (see the module docstring).

    Parameters
    ----------
    net, batch, update, params :
        As for :func:`~rulesearch.inner.run_episodes` (``update`` may be any update object, e.g. a compiled rule
        or a neural rule; ``params`` its parameters).
    grammar : Grammar, optional
        Record every atom the grammar uses (default ``Grammar.classic()`` when neither ``grammar`` nor
        ``atoms`` is given).
    atoms : sequence of sympy.Expr, optional
        Record exactly these columns instead of a grammar's.
    signals : sequence of sympy.Expr
        Extra declared (derived or state) signals to record.
    n_per_step, n_strata, stratify, layers, steps, seed, on_step :
        See :class:`SampleCollector`.
    run_seed : int, optional
        ``seed`` of :func:`run_episodes` (weight initialization); default: the batch's own.
    drop_diverged : bool
        Drop the rows of episodes that diverged (with a warning); raise if every episode diverged.
    **run_kwargs :
        Passed to :func:`run_episodes` (e.g. ``reward="neg_loss"``, ``feedback_update=...``).
    """
    if atoms is None:
        grammar = Grammar.classic() if grammar is None else grammar
        atoms = sample_atoms(grammar, signals)
    else:
        atoms = sample_atoms(None, list(atoms) + list(signals))
    collector = SampleCollector(atoms, n_per_step, n_strata, stratify, layers, steps, seed, on_step)
    run_kwargs = {"raise_on_divergence": False, **run_kwargs}  # diverged episodes are dropped or kept below
    res = run_episodes(net, batch, update, params, seed=run_seed, observe=collector, metrics=False, **run_kwargs)
    df = collector.frame()
    df["t"] = getattr(batch, "t", 0) if not isinstance(batch, (tuple, list)) else 0
    ks = getattr(batch, "ks", None)
    if ks is not None and len(df):
        df["episode"] = np.asarray(ks, dtype=np.int64)[df["episode"].to_numpy()]
    diverged = res.diverged.cpu().numpy()
    if drop_diverged and diverged.any():
        if diverged.all():
            raise DivergenceError(
                f"All {len(diverged)} episodes diverged while sampling; lower the rule's coefficients or raise "
                f"divergence_bound."
            )
        bad = set(np.flatnonzero(diverged).tolist())
        rows = np.isin(collector_episode_rows(df, ks), list(bad))
        warnings.warn(
            f"{len(bad)} of {len(diverged)} episodes diverged; their {int(rows.sum())} rows were dropped.", stacklevel=2
        )
        attrs = df.attrs
        df = df.loc[~rows].reset_index(drop=True)
        df.attrs = attrs
    return df


def collector_episode_rows(df: pd.DataFrame, ks) -> np.ndarray:
    """Batch row of each table row (undoing the mapping to episode ids)."""
    ep = df["episode"].to_numpy()
    if ks is None:
        return ep
    pos = {int(k): b for b, k in enumerate(ks)}
    return np.array([pos[int(e)] for e in ep], dtype=np.int64)


# ------------------------------------------------------------------------------------------------------------
# Reading the table


def samples_features(df: pd.DataFrame) -> tuple[list[sp.Expr], list[str]]:
    """The atom columns of a sample table as SymPy expressions, and their column names."""
    meta = df.attrs.get(_META)
    if not meta or "atoms" not in meta:
        raise ShapeError(
            "This table carries no rulesearch metadata (attrs['rulesearch']): build it with collect_samples or "
            "load it with load_samples, which keep the atom definitions."
        )
    rule = Rule.from_json(meta["atoms"])
    names = [t.name for t in rule.terms]
    missing = [n for n in names if n not in df.columns]
    if missing:
        raise ShapeError(f"The sample table misses atom columns {missing}; columns: {list(df.columns)}.")
    return [t.expr for t in rule.terms], names


def samples_arrays(df: pd.DataFrame, layers: Sequence[int] | None = None):
    """``(X, y, weights, features, names)`` of a sample table, optionally restricted to some layers."""
    features, names = samples_features(df)
    if layers is not None:
        attrs = df.attrs
        df = df[df["layer"].isin(list(layers))]
        df.attrs = attrs
    if TARGET not in df.columns:
        raise ShapeError(f"The sample table has no target column {TARGET!r}.")
    if len(df) == 0:
        raise DistillDataError(
            "The sample table is empty (0 rows): nothing to distill"
            + (f" in layers {list(layers)}." if layers is not None else ".")
            + " Collect samples first (collect_samples(...)) or choose layers that were sampled."
        )
    X = df[names].to_numpy(dtype=np.float64)
    y = df[TARGET].to_numpy(dtype=np.float64)
    w = df["weight"].to_numpy(dtype=np.float64) if "weight" in df.columns else np.ones(len(df))
    return X, y, w, features, names


def save_samples(df: pd.DataFrame, path) -> Path:
    """Write the table to Parquet (metadata in the schema) or, without pyarrow, to CSV plus ``<path>.json``."""
    path = Path(path)
    meta = json.dumps(df.attrs.get(_META, {}))
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        path = path.with_suffix(".csv")
        df.to_csv(path, index=False)
        path.with_suffix(".csv.json").write_text(meta)
        return path
    table = pa.Table.from_pandas(df.reset_index(drop=True), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), _META.encode(): meta.encode()})
    pq.write_table(table, path)
    return path


def load_samples(path) -> pd.DataFrame:
    """Read a table written by :func:`save_samples` (Parquet, or CSV with its JSON sidecar)."""
    path = Path(path)
    if path.suffix == ".csv" or not path.exists() and path.with_suffix(".csv").exists():
        path = path.with_suffix(".csv")
        df = pd.read_csv(path)
        side = path.with_suffix(".csv.json")
        df.attrs[_META] = json.loads(side.read_text()) if side.exists() else {}
        return df
    try:
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ShapeError(f"Reading {path} needs pyarrow (pip install 'rulesearch[parquet]').") from e
    table = pq.read_table(path)
    df = table.to_pandas()
    raw = (table.schema.metadata or {}).get(_META.encode())
    df.attrs[_META] = json.loads(raw) if raw else {}
    return df
