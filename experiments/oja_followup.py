"""The Oja follow-up (Shervani-Tabar, Mirhoseini & Rosenbaum, arXiv 2408.08408) on digits: backprop vs backprop plus
Oja's term under online learning, in deeper networks and from poor initializations, and the same pair under plastic
(Kolen-Pollack-like) feedback.

.. math::

    \\Delta W_{ij} = -\\eta\\, e_i x_j + \\eta_{Oja}\\, y_i (x_j - (W^\\top y)_j), \\qquad
    \\Delta B_{ji} = -\\eta\\, e_i x_j \\quad\\text{(plastic feedback only)},

with ``eta_Oja = 0`` for the rules without Oja's term. Four methods: ``bp`` and ``bp + Oja`` (symmetric feedback),
``plastic`` and ``plastic + Oja`` (random initial feedback B updated by the package's ``kp`` rule with its
pseudo-gradient coefficient equal to the forward eta and decay 0: neither W nor B decays). No meta-learning: every
method is tuned on a grid of the same size on the same tuning episodes (seed 10000), then all four run on the same
fresh episodes and initial forward weights: ``--seeds`` seeds x ``--eval-episodes`` episodes, 95% Student-t
intervals over per-seed means, and paired differences (with Oja minus without) per seed. Settings: depth 5 / 8 / 12
weight layers at Xavier gain 1, and the 5-layer network from small and large initial gains. The paper's numbers were
not found: its column is n/a.

The grids (:func:`grids`). With Oja: ``eta`` on a coarse log axis (half-decade steps) times ``eta_Oja`` in ``{0} +
OJA_ETAS``; without: ``eta`` alone on the same range refined ``len(OJA_ETAS) + 1``-fold, so both grids have the
same number of points (and each point the same tuning episodes). The coarse axis is a subset of the fine one, and
``eta_Oja = 0`` is in the grid with Oja: there, the method without Oja's term is tuned at every coarse eta on the
same episodes, so the method with it can come out worse only when the better eta of the method without lies between
two coarse points, or by evaluation noise.

    # writes results/paper/oja.md, oja.csv, oja_tuning.csv, oja.png
    python experiments/reproduce_paper.py oja --seeds 20 --tune-episodes 6
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rulesearch.compile.compiler import compile_rule
from rulesearch.evaluate import seed_episodes
from rulesearch.inner import run_episodes
from rulesearch.io.stats import t_interval
from rulesearch.lang.pools import kp, oja
from rulesearch.networks.feedforward import DIGITS, Network
from rulesearch.tasks.data import load_dataset
from rulesearch.tasks.episodes import TaskSampler

ETA_LOW = 1e-4  # lowest eta of both axes
COARSE_ETAS = 10  # half-decade steps: 1e-4 ... 3.2 with Oja's term; without it 14 per decade: 1e-4 ... 8.5
OJA_ETAS = (0.0003, 0.001, 0.003, 0.01, 0.03, 0.1)  # plus 0
TUNE_SEED = 10_000
CHANCE = 0.2  # 5-way
SETTINGS = {  # name -> (sizes, gain)
    "depth 5": (DIGITS, 1.0),
    "depth 8": ((64, *[100] * 7, 10), 1.0),
    "depth 12": ((64, *[100] * 11, 10), 1.0),
    "depth 5, small init (gain 0.2)": (DIGITS, 0.2),
    "depth 5, large init (gain 3)": (DIGITS, 3.0),
}
METHODS = {  # name -> (feedback mode, with Oja's term)
    "bp": ("bp", False),
    "bp+oja": ("bp", True),
    "plastic": ("plastic", False),
    "plastic+oja": ("plastic", True),
}
LABELS = {"bp": "bp", "bp+oja": "bp + Oja", "plastic": "plastic", "plastic+oja": "plastic + Oja"}
UPDATE = compile_rule(oja)  # theta = (eta, eta_Oja); eta_Oja = 0 is the pseudo-gradient alone
FEEDBACK = compile_rule(kp)  # theta_fb = (eta, decay 0)


def grids(
    n_coarse: int = COARSE_ETAS, oja_etas=OJA_ETAS, low: float = ETA_LOW
) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """``(without, with_oja)``: lists of ``(eta, eta_Oja)`` of equal length ``n_coarse * (len(oja_etas) + 1)``.

    ``with_oja``: eta in ``low * 10**(i/2)``, ``i < n_coarse``, times eta_Oja in ``(0, *oja_etas)`` (eta-major).
    ``without``: eta in ``low * 10**(j / (2 k))``, ``j < n_coarse k``, ``k = len(oja_etas) + 1``, eta_Oja 0; it holds
    every coarse eta (``j = i k``).
    """
    k = len(oja_etas) + 1
    coarse = [low * 10 ** (i / 2) for i in range(n_coarse)]
    fine = [low * 10 ** (j / (2 * k)) for j in range(n_coarse * k)]
    with_oja = [(eta, o) for eta in coarse for o in (0.0, *oja_etas)]
    return [(eta, 0.0) for eta in fine], with_oja


def edge(values, chosen) -> str:
    """Where ``chosen`` lies on the sorted distinct ``values``: ``"low edge"``, ``"high edge"`` or ``"inside"``."""
    axis = sorted(set(values))
    if len(axis) > 1 and chosen == axis[0]:
        return "low edge"
    if len(axis) > 1 and chosen == axis[-1]:
        return "high edge"
    return "inside"


def accuracy(net, sampler, thetas, seeds, episodes):
    """Query accuracy (diverged episodes scored 0) of every theta row on the same episodes and initial weights (and
    initial feedback): ``(acc, diverged)``, each ``(len(thetas), len(seeds), episodes)``."""
    one, w0, f0 = seed_episodes(sampler, net, seeds, episodes)
    rep = len(thetas)
    params = torch.tensor(thetas, dtype=torch.float32).repeat_interleave(len(seeds) * episodes, dim=0)
    batch = tuple(t.repeat((rep,) + (1,) * (t.dim() - 1)) for t in one)
    weights = [w.repeat(rep, 1, 1) for w in w0]
    feedback = [f.repeat(rep, 1, 1) for f in f0]
    kwargs = {}
    if net.plastic_feedback:
        kwargs = {"feedback_update": FEEDBACK, "feedback_params": torch.stack([params[:, 0], 0 * params[:, 0]], 1)}
    with torch.no_grad():
        res = run_episodes(
            net, batch, UPDATE, params, weights, feedback, metrics=False, raise_on_divergence=False, **kwargs
        )
    acc = torch.where(res.diverged, torch.zeros_like(res.accuracy), res.accuracy)
    shape = (rep, len(seeds), episodes)
    return acc.reshape(shape).double().numpy(), res.diverged.reshape(shape).numpy()


def main(a):
    torch.set_num_threads(a.threads)
    sampler = TaskSampler(load_dataset("digits"), M=5, K=50, Q=10)
    out = Path(a.results)
    out.mkdir(parents=True, exist_ok=True)
    without, with_oja = grids()
    t0 = time.time()
    rows, tuning = [], []
    for name, (sizes, gain) in SETTINGS.items():
        t1 = time.time()
        row = {"setting": name, "sizes": "-".join(map(str, sizes)), "gain": gain}
        chosen, per_seed = {}, {}
        for method, (mode, use_oja) in METHODS.items():
            net = Network(sizes=sizes, feedback=mode, gain=gain)
            grid = with_oja if use_oja else without
            acc, div = accuracy(net, sampler, grid, [TUNE_SEED], a.tune_episodes)
            score = acc.mean((1, 2))
            best = int(np.argmax(score))  # ties: the smallest eta, then the smallest eta_Oja
            tuning += [{"setting": name, "method": method, "eta": e, "eta_oja": o, "tuning accuracy": s,
                        "tuning diverged": int(d)} for (e, o), s, d in zip(grid, score, div.sum((1, 2)))]  # fmt: skip
            chosen[method] = grid[best]
            acc, div = accuracy(net, sampler, [grid[best]], list(range(a.seeds)), a.eval_episodes)
            per_seed[method] = acc[0].mean(-1)
            m, lo, hi = t_interval(per_seed[method])
            row.update({
                f"{method} eta": grid[best][0], f"{method} eta_oja": grid[best][1],
                f"{method} eta position": edge([g[0] for g in grid], grid[best][0]),
                f"{method} eta_oja position": edge([g[1] for g in grid], grid[best][1]) if use_oja else "",
                f"{method} tuning accuracy": score[best], f"{method} tuning diverged": int(div.sum()),
                f"{method} accuracy": m, f"{method} lo": lo, f"{method} hi": hi,
                f"{method} diverged": int(div.sum()), f"{method} episodes": int(div.size),
            })  # fmt: skip
        for plain in ("bp", "plastic"):
            d, lo, hi = t_interval(per_seed[f"{plain}+oja"] - per_seed[plain])
            row.update({f"{plain} difference": d, f"{plain} difference lo": lo, f"{plain} difference hi": hi})
        rows.append(row)
        print(f"{name} ({time.time() - t1:.0f} s): " + "; ".join(
            f"{m} {row[f'{m} accuracy']:.3f} [{row[f'{m} lo']:.3f}, {row[f'{m} hi']:.3f}] (eta {row[f'{m} eta']:.3g}"
            f" {row[f'{m} eta position']}, eta_oja {row[f'{m} eta_oja']:g} {row[f'{m} eta_oja position']}, "
            f"diverged {row[f'{m} diverged']})" for m in METHODS), flush=True)  # fmt: skip
    df = pd.DataFrame(rows)
    df.to_csv(out / "oja.csv", index=False)
    pd.DataFrame(tuning).to_csv(out / "oja_tuning.csv", index=False)
    _plot(df, out / "oja.png")
    (out / "oja.md").write_text(_markdown(rows, a, time.time() - t0, without, with_oja))
    print((out / "oja.md").read_text())


def _ci(r, key, sign="") -> str:
    """``mean [lo, hi]`` of a method (``key`` = its name) or a difference (``key`` = "... difference")."""
    m = r[key] if key.endswith("difference") else r[f"{key} accuracy"]
    return f"{m:{sign}.3f} [{r[key + ' lo']:{sign}.3f}, {r[key + ' hi']:{sign}.3f}]"


def _rates(r, m) -> str:
    eta = f"{r[f'{m} eta']:.3g}" + ("" if r[f"{m} eta position"] == "inside" else f" ({r[f'{m} eta position']})")
    if not METHODS[m][1]:
        return eta
    o = r[f"{m} eta_oja position"]
    return f"{eta}, {r[f'{m} eta_oja']:g}" + ("" if o == "inside" or r[f"{m} eta_oja"] == 0 else f" ({o})")


def _markdown(rows, a, seconds, without, with_oja) -> str:
    n = len(without)
    fine, coarse = sorted({g[0] for g in without}), sorted({g[0] for g in with_oja})
    lines = [
        "# Oja follow-up: backprop and plastic feedback with and without Oja's term (digits, online)",
        "",
        __doc__.split("\n\n")[0].replace("\n", " "),
        "",
        f"5-way K=50 Q=10 digits, softplus beta=10, one online pass (250 steps, batch size 1); hidden width 100 for "
        f"depths 8 and 12. **Tuning**: every method on a grid of {n} points, each scored on the same {a.tune_episodes} "
        f"episodes of seed {TUNE_SEED} ({n * a.tune_episodes} tuning episodes per method and setting). Without Oja's "
        f"term: eta on {len(fine)} log-spaced values {fine[0]:.3g} ... {fine[-1]:.3g} ({2 * (len(OJA_ETAS) + 1)} per "
        f"decade). With it: eta in {[float(f'{e:.3g}') for e in coarse]} times eta_Oja in "
        f"{[0.0, *OJA_ETAS]}. The coarse eta axis is a subset of the fine one and the grid with Oja's term holds "
        "eta_Oja = 0, so a method with Oja's term is tuned at least as well as the one without it wherever the "
        "latter's best eta is on the coarse axis; otherwise it can lose by the coarser eta, and in evaluation by "
        "noise. Plastic feedback: B starts random (Xavier, gain 1) and is updated by Kolen-Pollack's transposed "
        "pseudo-gradient with the forward eta and no decay. Ties in tuning go to the smallest eta, then the smallest "
        f"eta_Oja. **Evaluation**: {a.seeds} seeds x {a.eval_episodes} episodes, the same episodes and initial forward "
        "weights for all four methods (and the same initial B for both plastic ones); mean and 95% Student-t interval "
        "over per-seed means; differences are paired per seed. **Divergence**: an episode diverges when max |W| "
        "(or |B|) exceeds 1e3 or a value becomes non-finite; it is scored as accuracy 0 (not chance) in tuning and "
        f"evaluation, and counted below. Chance is {CHANCE:g}.",
        "",
        "| setting | bp | bp + Oja | bp + Oja - bp | plastic | plastic + Oja | plastic + Oja - plastic | paper |",
        "|---|---|---|---|---|---|---|---|",
        *[
            f"| {r['setting']} | {_ci(r, 'bp')} | {_ci(r, 'bp+oja')} | "
            f"{_ci(r, 'bp difference', '+')} | {_ci(r, 'plastic')} | {_ci(r, 'plastic+oja')} | "
            f"{_ci(r, 'plastic difference', '+')} | n/a |"
            for r in rows
        ],
        "",
        "Chosen rates (eta; eta, eta_Oja), marked where they lie on the grid's edge; tuning accuracy of the chosen "
        "point; diverged evaluation episodes out of "
        f"{rows[0]['bp episodes']}. A tuning accuracy at or below chance means no rate on the grid learned, and the "
        "chosen rate is then arbitrary (the smallest of the tied ones).",
        "",
        "| setting | " + " | ".join(f"{LABELS[m]}: rates | tuning | diverged" for m in METHODS) + " |",
        "|---|" + "---|---|---|" * len(METHODS),
        *[
            f"| {r['setting']} | "
            + " | ".join(f"{_rates(r, m)} | {r[f'{m} tuning accuracy']:.3f} | {r[f'{m} diverged']}" for m in METHODS)
            + " |"
            for r in rows
        ],
        "",
        "Every grid point's tuning accuracy and diverged count: [oja_tuning.csv](oja_tuning.csv).",
        "",
        f"Regenerate: `python experiments/reproduce_paper.py oja --seeds {a.seeds} --eval-episodes {a.eval_episodes} "
        f"--tune-episodes {a.tune_episodes}` ({seconds:.0f} s, {a.threads} thread(s), on a 2-core machine shared "
        "with another job).",
    ]
    return "\n".join(lines) + "\n"


def _plot(df: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8.5, 4.2))
    x = np.arange(len(df))
    for i, m in enumerate(METHODS):
        mean = df[f"{m} accuracy"].to_numpy()
        err = np.stack([mean - df[f"{m} lo"], df[f"{m} hi"] - mean])
        ax.bar(x + (i - 1.5) * 0.2, mean, 0.2, yerr=err, capsize=2, label=LABELS[m])
    ax.axhline(CHANCE, color="grey", lw=0.8, ls="--", label="chance")
    ax.set_xticks(x, df["setting"], rotation=15, ha="right", fontsize=8)
    ax.set_ylabel("query accuracy (95% t interval)")
    ax.set_title("Online learning with and without Oja's term (digits; bp and plastic feedback)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
