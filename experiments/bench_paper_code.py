"""Speed and memory of the paper's own code beside rulesearch, on the same EMNIST episodes.

Runs the public code of Shervani-Tabar & Rosenbaum (2023), ``NeuralDynamicsAndComputing/MetaLearning-Plasticity``,
**unmodified** from a folder you give (its modules are imported from that folder; nothing of it is copied here),
beside rulesearch, for the paper's F^bio rule (pseudo-gradient + eHebb + Oja, the paper code's ``--vec 1 2``) under
feedback alignment (``--fbk fix``) on EMNIST, 47 classes, network 784-170-130-100-70-47, 5-way K=50 Q=10 (250
online steps and 50 queries per episode), float32, one thread per process:

* ``paper``: the paper code's ``MetaLearner.train`` (one episode per meta-step: data loading, 250 online steps,
  query loss, its meta statistics and logs, ``backward`` and Adam), timed per episode;
* ``rulesearch B=1 <method>``: :class:`rulesearch.train.Trainer` ``step`` with one episode per meta-step, the inner
  loop run by ``--methods`` (``adjoint``: the torch fast path; ``native``: the C kernel);
* ``rulesearch B=8 <method>``: eight episodes per meta-step (time per episode = meta-step time / 8).

Each run is its own process (peak RSS per process, ``VmHWM``), and the rounds are interleaved (paper, ours B=1,
ours B=8, ..., then the reverse order, ...) so that a changing machine load affects both sides alike. A last process
runs one episode through the paper's code and the same episode (its images, order, initial weights and feedback)
through rulesearch's inner loop, and compares the query losses and meta-gradients: the check that both sides do
the same work.

    git clone https://github.com/NeuralDynamicsAndComputing/MetaLearning-Plasticity ../paper-code
    python experiments/bench_paper_code.py --paper-code ../paper-code            # 3 rounds of ~5 episodes
    python experiments/bench_paper_code.py --paper-code ../paper-code --rounds 5 --episodes 10

Without ``--paper-code`` (or with a folder that is not that repository) it says what to pass and exits 0.

The paper's code reads EMNIST Balanced (test split) as PNG files in per-class folders under ``./data/emnist/``,
which it downloads and writes on first use. There is no download here: the runner writes that layout into a
temporary folder from rulesearch's EMNIST data (``--data-dir``, default
:func:`rulesearch.tasks.data.default_data_dir`; the first 400 images per class, the same images rulesearch uses,
stored transposed like the raw IDX files the paper's code writes out) and runs the paper's code there. Modern torch
and a missing torchvision need three import shims, installed only when the import fails and named in the output:
``torch.nn.utils._stateless`` (gone from torch; its ``functional_call`` is ``torch.func.functional_call``),
``torchvision.transforms`` (``Compose``, ``Resize``, ``ToTensor``, the only names the paper's code uses; PyPI's
torchvision does not import beside a CPU build of torch) and ``requests`` (imported for the download, never called
here). The paper's files are not changed (``git status`` of the folder is printed when it is a git checkout).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

PAPER_URL = "https://github.com/NeuralDynamicsAndComputing/MetaLearning-Plasticity"
# files of the paper's repository and a line each must hold (how a folder is recognised as that repository)
PAPER_FILES = {
    "main.py": "class MetaLearner",
    "optim.py": "def plasticity_rule",
    "dataset.py": "class EmnistDataset",
    "utils.py": "def meta_stats",
}
SIZES = (784, 170, 130, 100, 70, 47)
N_CLASSES = 47
PER_CLASS = 400  # the paper's code uses the 400 images per class of the EMNIST Balanced test split
PAPER_VEC = ["1", "2"]  # the paper code's term indices beside the pseudo-gradient: 1 eHebb, 2 Oja (F^bio)
RULE = "bio"  # rulesearch's F^bio: terms F0, F2, F9 of the paper's pool


# ---- locating the paper's code -------------------------------------------------------------------------------


def paper_code_problem(path: str | os.PathLike | None) -> str | None:
    """Why ``path`` is not a checkout of the paper's repository (None when it is)."""
    if path is None:
        return "no --paper-code given"
    root = Path(path).expanduser()
    if not root.is_dir():
        return f"{root} is not a folder"
    for name, marker in PAPER_FILES.items():
        f = root / name
        if not f.is_file():
            return f"{root} has no {name}"
        if marker not in f.read_text(errors="replace"):
            return f"{root / name} does not define {marker.split()[-1]}"
    return None


def skip_message(problem: str) -> str:
    """What to pass instead (printed when the paper's code is not there; the benchmark is then skipped)."""
    return (
        f"SKIPPED: the paper's code is needed ({problem}).\n"
        f"Get it and pass its folder:\n"
        f"    git clone {PAPER_URL} PATH\n"
        f"    python experiments/bench_paper_code.py --paper-code PATH"
    )


def paper_code_version(root: Path) -> str:
    """The checkout's commit and whether git sees it unchanged (or a note that it is not a git checkout)."""

    def git(*args):
        out = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=30)
        return out.stdout.strip() if out.returncode == 0 else None

    try:
        commit = git("rev-parse", "HEAD")
    except (OSError, subprocess.SubprocessError):
        commit = None
    if not commit:
        return "not a git checkout (commit unknown)"
    tag = git("describe", "--tags", "--always") or "?"
    status = git("status", "--porcelain", "--untracked-files=no")
    state = "unmodified (git status clean)" if status == "" else "MODIFIED (git status not clean)"
    return f"commit {commit[:12]} ({tag}), {state}"


# ---- the paper code's data layout ------------------------------------------------------------------------------


def write_paper_layout(images, labels, root: str | os.PathLike, per_class: int = PER_CLASS, transpose: bool = True):
    """Write ``images`` (uint8 ``(N, 28, 28)``, upright) as the folders the paper's ``EmnistDataset`` reads.

    ``root/data/emnist/characterNN/NN_XXXX.png`` (``NN`` = label + 1, ``XXXX`` = 1, 2, ... per class), the first
    ``per_class`` images of each label in array order; ``transpose``: stored as the raw IDX files hold them (the
    paper's code writes the IDX arrays out unchanged, so its images are transposed). Every label 0..max gets its
    folder. Returns the ``data/emnist`` folder.
    """
    import numpy as np
    from PIL import Image

    images = np.asarray(images)
    labels = np.asarray(labels).astype(np.int64).ravel()
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"images must be uint8 (N, H, W) with one label each; got {images.dtype} {images.shape}")
    out = Path(root) / "data" / "emnist"
    n_classes = int(labels.max()) + 1 if labels.size else 0
    for c in range(n_classes):
        folder = out / f"character{c + 1:02d}"
        folder.mkdir(parents=True, exist_ok=True)
        for n, i in enumerate(np.flatnonzero(labels == c)[:per_class], start=1):
            img = images[i].T if transpose else images[i]
            Image.fromarray(np.ascontiguousarray(img)).save(folder / f"{c + 1:02d}_{n:04d}.png")
    return out


# ---- import shims for running 2021-era code on a current torch ------------------------------------------------


def _shim_transforms():
    """``torchvision.transforms`` with what the paper's code uses: ``Compose``, ``Resize`` and ``ToTensor`` (the
    values torchvision gives for 8-bit greyscale PIL images)."""
    import numpy as np
    import torch
    from PIL import Image

    class Compose:
        def __init__(self, transforms):
            self.transforms = list(transforms)

        def __call__(self, img):
            for t in self.transforms:
                img = t(img)
            return img

    class Resize:
        def __init__(self, size):
            self.size = (size, size) if isinstance(size, int) else tuple(size)  # (h, w)

        def __call__(self, img):
            h, w = self.size
            return img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR)

    class ToTensor:
        def __call__(self, img):
            if img.mode != "L":
                raise ValueError(f"the ToTensor shim handles greyscale ('L') images only; got mode {img.mode!r}")
            return torch.from_numpy(np.array(img, np.uint8, copy=True)).unsqueeze(0).to(torch.float32).div(255)

    mod = types.ModuleType("torchvision.transforms")
    mod.Compose, mod.Resize, mod.ToTensor = Compose, Resize, ToTensor
    return mod


def install_paper_shims() -> list[str]:
    """Install the import shims the paper's code needs on this machine (only where the real import fails);
    returns the names of those installed."""
    import importlib

    installed = []
    try:
        importlib.import_module("torch.nn.utils._stateless")
    except ImportError:
        import torch
        import torch.nn.utils

        mod = types.ModuleType("torch.nn.utils._stateless")
        mod.functional_call = torch.func.functional_call
        sys.modules[mod.__name__] = mod
        torch.nn.utils._stateless = mod
        installed.append("torch.nn.utils._stateless (functional_call = torch.func.functional_call)")
    try:
        importlib.import_module("torchvision.transforms")
    except Exception:  # noqa: BLE001 - PyPI's torchvision beside a CPU torch fails with RuntimeError
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
        transforms = _shim_transforms()
        pkg = types.ModuleType("torchvision")
        pkg.transforms = transforms
        sys.modules["torchvision"], sys.modules["torchvision.transforms"] = pkg, transforms
        installed.append("torchvision.transforms (Compose, Resize, ToTensor)")
    try:
        importlib.import_module("requests")
    except ImportError:
        mod = types.ModuleType("requests")

        def get(*args, **kwargs):
            raise RuntimeError("no download here: the runner writes the paper code's EMNIST folders itself")

        mod.get = get
        sys.modules["requests"] = mod
        installed.append("requests (download, never called)")
    return installed


def _import_paper_code(root: str) -> tuple[types.ModuleType, types.ModuleType, list[str]]:
    """The paper's ``main`` and ``dataset`` modules, imported from ``root`` (no bytecode written there)."""
    sys.dont_write_bytecode = True
    shims = install_paper_shims()
    sys.path.insert(0, str(root))
    import dataset as paper_dataset  # noqa: PLC0415 - the paper's modules, found on sys.path
    import main as paper_main  # noqa: PLC0415

    if not str(Path(paper_main.__file__).resolve()).startswith(str(Path(root).resolve())):
        raise RuntimeError(f"imported {paper_main.__file__}, not the paper's main.py under {root}")
    return paper_main, paper_dataset, shims


# ---- children ---------------------------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    """Peak resident set size of this process (``VmHWM``, Linux), MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    raise RuntimeError("/proc/self/status has no VmHWM; the memory figures need Linux.")


class _TimedEpisodes:
    """Iterates over the paper code's task loader and stamps the time before and after each episode's data is
    loaded: episode ``i`` takes ``before[i + 1] - before[i]`` (its data loading, online steps and meta-step)."""

    def __init__(self, loader):
        self.loader = loader
        self.before: list[float] = []
        self.after: list[float] = []

    def __iter__(self):
        it = iter(self.loader)
        while True:
            self.before.append(time.perf_counter())
            try:
                data = next(it)
            except StopIteration:
                return
            self.after.append(time.perf_counter())
            yield data


_RUN_NAMES = itertools.count()  # its result folders are named by the second: one subfolder per learner


def _paper_meta_learner(cfg: dict, episodes: int):
    """The paper's ``MetaLearner`` on its task loader, built as its ``main()`` builds them (its own argument
    parser and defaults, run in ``cfg['workdir']``), with the F^bio terms and fixed random feedback."""
    import numpy as np
    import torch

    paper_main, paper_dataset, shims = _import_paper_code(cfg["paper_code"])
    os.chdir(cfg["workdir"])
    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"])
    argv = ["main.py", "--gpu_mode", "0", "--episodes", str(episodes), "--M", str(cfg["M"]), "--K", str(cfg["K"]),
            "--Q", str(cfg["Q"]), "--fbk", "fix", "--vec", *PAPER_VEC,
            "--test_name", f"{os.getpid()}-{next(_RUN_NAMES)}"]  # fmt: skip
    saved, sys.argv = sys.argv, argv
    try:
        args = paper_main.parse_args()
    finally:
        sys.argv = saved
    data = paper_dataset.EmnistDataset(K=args.K, Q=args.Q, dim=args.dim)
    sampler = paper_main.RandomSampler(data_source=data, replacement=True, num_samples=args.episodes * args.M)
    loader = paper_main.DataLoader(dataset=data, sampler=sampler, batch_size=args.M, drop_last=True)
    timed = _TimedEpisodes(loader)
    learner = paper_main.MetaLearner(timed, args)
    learner.plot = lambda: None  # figures at the end of training: not part of an episode
    return learner, timed, data, args, shims


def _paper_child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    n = cfg["warmup"] + cfg["episodes"]
    learner, timed, data, args, shims = _paper_meta_learner(cfg, n)
    steps, shapes = [], []
    adapt, process = learner.OptimAdpt, learner.data_process

    def counting_adapt(*a, **kw):
        steps[-1] += 1
        return adapt(*a, **kw)

    def recording_process(d, M):
        out = process(d, M)
        steps.append(0)
        shapes.append([list(t.shape) for t in out])
        return out

    learner.OptimAdpt, learner.data_process = counting_adapt, recording_process
    learner.train()
    total = [b - a for a, b in zip(timed.before, timed.before[1:])]
    load = [b - a for a, b in zip(timed.before, timed.after)]
    model = learner.model
    return {
        "times": total[cfg["warmup"] :],
        "data_times": load[cfg["warmup"] :],
        "peak_rss_mb": _peak_rss_mb(),
        "shims": shims,
        "work": {
            "sizes": [model.fc1.in_features] + [getattr(model, f"fc{i}").out_features for i in range(1, 6)],
            "feedback": args.fbk,
            "vec": list(args.vec),
            "theta": len(learner.Theta),
            "inner_steps": sorted(set(steps)),
            "episode_shapes": shapes[0],
            "classes_in_data": len(data),
            "threads": torch.get_num_threads(),
        },
    }


def _ours_config(cfg: dict, B: int):
    from rulesearch.train.configs import DiscoverConfig, MetaConfig, NetworkConfig, TaskConfig

    task = TaskConfig(dataset="emnist", data_dir=cfg["data_dir"], options={"per_class": PER_CLASS}, M=cfg["M"],
                      K=cfg["K"], Q=cfg["Q"], replacement=True, fixed_images=True)  # fmt: skip
    meta = MetaConfig(meta_batch=B, l1=0.0, lr=1e-3, seed=cfg["seed"], threads=cfg["threads"],
                      method=cfg.get("method", "auto"))  # fmt: skip
    return DiscoverConfig(rule=RULE, task=task, network=NetworkConfig(sizes=SIZES, feedback="fa"), meta=meta)


def _ours_child(cfg: dict) -> dict:
    import torch

    torch.set_num_threads(cfg["threads"])
    from rulesearch.train.problem import Problem
    from rulesearch.train.rules import resolve_rule
    from rulesearch.train.trainer import Trainer

    B = cfg["B"]
    problem = Problem(_ours_config(cfg, B), resolve_rule(RULE))
    trainer = Trainer(problem)
    state = trainer.fresh_state()
    steps = cfg["warmup_steps"] + cfg["steps"]
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        trainer.step(state)
        times.append((time.perf_counter() - t0) / B)
    sampling = []  # drawing a meta-step's episodes alone (data, initial weights and feedback), per episode
    for t in range(cfg["steps"]):
        t0 = time.perf_counter()
        problem.episodes(steps + t, [0])
        sampling.append((time.perf_counter() - t0) / B)
    batch, weights, feedback = problem.episodes(0, [0])
    return {
        "times": times[cfg["warmup_steps"] :],
        "data_times": sampling,
        "peak_rss_mb": _peak_rss_mb(),
        "work": {
            "sizes": list(problem.net.sizes),
            "feedback": problem.net.feedback,
            "terms": [t.name for t in problem.learner.trained(state.params).terms],
            "theta": int(state.params["theta"].shape[-1]),
            "inner_steps": int(batch[0].shape[1]),
            "episode_shapes": [list(x.shape) for x in batch],
            "weights": [list(w.shape) for w in weights],
            "feedback_shapes": [list(f.shape) for f in feedback],
            "threads": torch.get_num_threads(),
        },
    }


def _paper_episode(cfg: dict, theta: list[float]) -> dict:
    """One episode of the paper's code with its coefficients set to ``theta``: the initial weights and feedback,
    the episode's data (after its shuffle), the query loss and the meta-gradient it computed."""
    import torch

    learner, _, _, _, _ = _paper_meta_learner(cfg, 1)
    with torch.no_grad():
        for p, v in zip(learner.Theta, theta):
            p.fill_(v)
    seen = {"theta_count": len(learner.Theta)}
    reinit, process, loss_func, step = (learner.reinitialize, learner.data_process, learner.loss_func,
                                        learner.OptimMeta.step)  # fmt: skip

    def capture_init():
        params = reinit()
        seen["init"] = {k: v.detach().clone() for k, v in params.items()}
        return params

    def capture_data(d, M):
        seen["data"] = process(d, M)
        return seen["data"]

    def capture_loss(*a, **kw):
        value = loss_func(*a, **kw)
        seen["loss"] = float(value)
        return value

    def capture_step(*a, **kw):
        seen["grad"] = [0.0 if p.grad is None else float(p.grad) for p in learner.Theta]
        return step(*a, **kw)

    learner.reinitialize, learner.data_process, learner.loss_func = capture_init, capture_data, capture_loss
    learner.OptimMeta.step = capture_step
    learner.train()
    return seen


def _check_child(cfg: dict) -> dict:
    """One episode through the paper's code and the same episode through rulesearch's inner loop: query loss and
    meta-gradient d loss / d (theta_0, theta_eHebb, theta_Oja) of each, for each coefficient vector."""
    import torch

    torch.set_num_threads(cfg["threads"])
    from rulesearch.compile.compiler import compile_rule
    from rulesearch.inner import run_episodes
    from rulesearch.lang.pools import named_rule
    from rulesearch.networks.feedforward import Network

    rule = named_rule(RULE)
    net = Network(sizes=SIZES, feedback="fa")
    out = []
    for theta in cfg["thetas"]:
        seen = _paper_episode(cfg, theta)
        x_trn, y_trn, x_qry, y_qry = seen["data"]
        batch = (x_trn[None], y_trn.reshape(1, -1), x_qry[None], y_qry.reshape(1, -1))
        weights = [seen["init"][f"fc{i}.weight"][None] for i in range(1, len(SIZES))]
        feedback = [seen["init"][f"fk{i}.weight"][None] for i in range(1, len(SIZES))]
        for method in cfg["methods"]:
            leaf = torch.tensor(theta[: rule.n_params], dtype=torch.float32, requires_grad=True)
            res = run_episodes(net, batch, compile_rule(rule), leaf, weights, feedback, metrics=False, method=method)
            res.loss.mean().backward()
            out.append({"theta": theta, "method": method, "paper_loss": seen["loss"], "ours_loss": float(res.loss[0]),
                        "paper_grad": seen["grad"][: rule.n_params], "ours_grad": leaf.grad.tolist(),
                        "paper_theta_count": seen["theta_count"], "steps": int(x_trn.shape[0])})  # fmt: skip
    return {"checks": out}


CHILDREN = {"paper": _paper_child, "ours": _ours_child, "check": _check_child}


# ---- parent -------------------------------------------------------------------------------------------------------


def spawn_child(script: str, cfg: dict, timeout: float) -> dict:
    """Run ``script --child CFG`` in a fresh process (its own RSS, ``cfg["threads"]`` threads): the dict on its
    ``RESULT`` line, else ``{"error": ...}`` (timeout, or the last lines it printed). bench_meta.py uses it too."""
    env = dict(os.environ, OMP_NUM_THREADS=str(cfg["threads"]), MKL_NUM_THREADS=str(cfg["threads"]))
    cmd = [sys.executable, script, "--child", json.dumps(cfg)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {"error": " | ".join(tail) or f"exit code {proc.returncode}, no output"}


def summarize(label: str, runs: list[dict], per_step: int) -> dict:
    """One table row from a side's runs (one per round; ``times``: s/episode of each timed meta-step of
    ``per_step`` episodes): the median over all of them, the median of each round, the median without data loading,
    the number of episodes timed and the largest peak RSS."""
    times = [t for r in runs for t in r["times"]]
    data = [t for r in runs for t in r["data_times"]]
    return {
        "label": label,
        "per_step": per_step,
        "s_per_episode": statistics.median(times),
        "rounds": [statistics.median(r["times"]) for r in runs],
        "data_s": statistics.median(data),
        "compute_s": statistics.median(times) - statistics.median(data),
        "episodes": len(times) * per_step,
        "peak_rss_mb": max(r["peak_rss_mb"] for r in runs),
    }


def format_table(rows: list[dict]) -> str:
    """The result table; the first row is the paper's code, the reference of the speed-ups."""
    ref = rows[0]
    head = ("| code | episodes per meta-step | s/episode (median) | round medians | speed-up vs paper | "
            "s/episode without data loading | speed-up without data loading | peak RSS MiB |")  # fmt: skip
    lines = [head, "|---|---:|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        rounds = ", ".join(f"{x:.3f}" for x in r["rounds"])
        speed = ref["s_per_episode"] / r["s_per_episode"]
        compute = ref["compute_s"] / r["compute_s"] if r["compute_s"] > 0 else float("nan")
        timed = f"{r['s_per_episode']:.3f} ({r['episodes']} episodes)"
        lines.append(f"| {r['label']} | {r['per_step']} | {timed} | {rounds} | {speed:.1f}x | {r['compute_s']:.3f} | "
                     f"{compute:.1f}x | {r['peak_rss_mb']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def work_checks(paper: dict, ours: dict, M: int, K: int, Q: int) -> list[str]:
    """One line per check that both sides run the same configuration (``paper``/``ours``: the ``work`` dicts)."""
    steps, queries = M * K, M * Q
    checks = [
        ("network sizes", paper["sizes"] == ours["sizes"] == list(SIZES), f"{paper['sizes']} / {ours['sizes']}"),
        ("feedback", paper["feedback"] == "fix" and ours["feedback"] == "fa",
         f"paper --fbk {paper['feedback']} (fixed random B, Xavier, redrawn per episode) / rulesearch fa"),
        ("inner steps per episode", paper["inner_steps"] == [steps] and ours["inner_steps"] == steps,
         f"{paper['inner_steps']} / {ours['inner_steps']} (M*K = {steps})"),
        ("query samples", paper["episode_shapes"][2][0] == queries and ours["episode_shapes"][2][1] == queries,
         f"{paper['episode_shapes'][2][0]} / {ours['episode_shapes'][2][1]} (M*Q = {queries})"),
        ("rule terms", paper["vec"] == PAPER_VEC and ours["terms"] == ["F0", "F2", "F9"],
         f"paper pseudo-gradient + --vec {' '.join(paper['vec'])} (eHebb, Oja) / rulesearch {ours['terms']}"),
        ("threads", paper["threads"] == ours["threads"] == 1, f"{paper['threads']} / {ours['threads']}"),
    ]  # fmt: skip
    return [f"# {'ok  ' if ok else 'DIFF'} {name}: {text}" for name, ok, text in checks]


def check_lines(checks: list[dict], rtol: float) -> tuple[list[str], bool]:
    """The equivalence check's lines: per coefficient vector, both query losses and meta-gradients."""
    lines, ok = [], True
    for c in checks:
        dl = abs(c["paper_loss"] - c["ours_loss"]) / abs(c["paper_loss"])
        num = sum((a - b) ** 2 for a, b in zip(c["paper_grad"], c["ours_grad"])) ** 0.5
        den = sum(a**2 for a in c["paper_grad"]) ** 0.5
        dg = num / den if den > 0 else float("inf")
        good = dl <= rtol and dg <= rtol
        ok &= good
        fmt = ", ".join
        lines.append(f"# {'ok  ' if good else 'DIFF'} theta {c['theta']} ({c.get('method', 'auto')}): query loss "
                     f"paper {c['paper_loss']:.6f} "
                     f"rulesearch {c['ours_loss']:.6f} (rel. diff {dl:.1e}); meta-gradient paper "
                     f"[{fmt(f'{g:.5g}' for g in c['paper_grad'])}] rulesearch "
                     f"[{fmt(f'{g:.5g}' for g in c['ours_grad'])}] (rel. diff {dg:.1e})")  # fmt: skip
    return lines, ok


DIFFERENCES = """\
# What differs between the two sides (the work per episode is the same; see the checks above):
# - Episodes: the paper's code draws classes with torch's RandomSampler (with replacement) and takes per class
#   the first K / next Q images in os.listdir order of its PNG folder, shuffling the training order with NumPy;
#   rulesearch draws the same kind of episodes (task.replacement, task.fixed_images: classes with replacement,
#   first K / next Q images in file order) from its own per-episode generators, so the classes and images of
#   episode i differ between the sides. The equivalence check feeds one episode of the paper's to both.
# - Data loading: the paper's code opens and converts all 400 PNG files of each of the 5 classes every episode
#   (its own data pipeline, kept as it is); rulesearch indexes uint8 arrays held in memory. Both are timed; the
#   'without data loading' columns subtract each side's median loading time (rulesearch: drawing the episodes,
#   initial weights and feedback).
# - Per-episode extras: the paper's code computes its meta statistics (alignment angles, orthonormality errors,
#   accuracy) and appends them and the coefficients to text files every episode; rulesearch's Trainer computes
#   its metrics (query loss, accuracy, alignment angles, orthonormality errors) in memory.
# - The paper's code keeps 5 meta-parameters in its Adam optimizer (theta_0, theta_eHebb, theta_Oja and two
#   unused ones without gradients); rulesearch has the 3 of F^bio. Both: Adam lr 1e-3, no L1 (lambda 0).
# - Images: the paper's code sees them transposed (as written from the raw IDX files); rulesearch upright.
#   Both use the same 47 x 400 images (the first 400 per class of --data-dir's EMNIST), float32 in [0, 1].
# - Peak RSS is each process's whole peak: imports (the paper's code also loads matplotlib), data
#   (rulesearch reads from the npz only the 400 images per class it keeps) and the meta-step."""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--paper-code", default=None, metavar="PATH",
                   help=f"folder of a checkout of {PAPER_URL} (e.g. tag v1.0.0)")  # fmt: skip
    p.add_argument("--data-dir", default=None,
                   help="EMNIST for both sides (default: rulesearch.tasks.data.default_data_dir())")  # fmt: skip
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (a process per side and round)")
    p.add_argument("--episodes", type=int, default=5, help="timed episodes per side and round (rulesearch with "
                   "B > 1: rounded up to whole meta-steps, at least 2)")  # fmt: skip
    p.add_argument("--warmup", type=int, default=1, help="untimed episodes (meta-steps) at the start of a process")
    p.add_argument("--batches", default="1,8", help="rulesearch's episodes per meta-step, comma-separated")
    p.add_argument("--methods", default="adjoint,native",
                   help="rulesearch's inner-loop methods (run_episodes' method), comma-separated: a row per method "
                   "and batch; 'adjoint' is the torch fast path, 'native' the C kernel ('auto' takes it where a C "
                   "compiler is there)")  # fmt: skip
    p.add_argument("--M", type=int, default=5)
    p.add_argument("--K", type=int, default=50)
    p.add_argument("--Q", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process (default 1)")
    p.add_argument("--no-check", action="store_true", help="skip the same-episode equivalence check")
    p.add_argument("--check-rtol", type=float, default=1e-3, help="tolerance of the equivalence check (float32)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per process")
    p.add_argument("--json", default=None, help="also write all results to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        cfg = json.loads(args.child)
        print("RESULT " + json.dumps(CHILDREN[cfg["side"]](cfg)), flush=True)
        return 0

    problem = paper_code_problem(args.paper_code)
    if problem is not None:
        print(skip_message(problem))
        return 0
    paper_root = Path(args.paper_code).expanduser().resolve()
    if args.data_dir is None:
        from rulesearch.tasks.data import default_data_dir

        args.data_dir = str(default_data_dir())
    from rulesearch.tasks.data import load_dataset

    dataset = load_dataset("emnist", args.data_dir, per_class=PER_CLASS)
    side = int(round(dataset.n_features**0.5))
    images = dataset.images.reshape(-1, side, side)
    if dataset.scale is None:  # float images in [0, 1]: back to the 8-bit values the PNG files hold
        images = (images * 255).round()
    images = images.to(dtype=__import__("torch").uint8).numpy()
    workdir = Path(tempfile.mkdtemp(prefix="bench-paper-code-"))
    batches = [int(b) for b in args.batches.split(",")]
    methods = args.methods.split(",")
    ours = [(b, m, f"rulesearch B={b} {m}") for m in methods for b in batches]
    common = {"M": args.M, "K": args.K, "Q": args.Q, "seed": args.seed, "threads": args.threads,
              "paper_code": str(paper_root), "workdir": str(workdir), "data_dir": str(args.data_dir)}  # fmt: skip
    try:
        t0 = time.perf_counter()
        write_paper_layout(images, dataset.labels.numpy(), workdir, PER_CLASS)
        layout_s = time.perf_counter() - t0
        print(f"# bench_paper_code: F^bio under feedback alignment, EMNIST {N_CLASSES} classes x {PER_CLASS} images "
              f"({dataset.info.get('source', args.data_dir)}), {'-'.join(map(str, SIZES))}, M={args.M} K={args.K} "
              f"Q={args.Q} ({args.M * args.K} online steps, {args.M * args.Q} queries), float32, {args.threads} "
              f"thread(s) per process, {args.rounds} interleaved rounds of {args.episodes} timed episodes per side "
              f"after {args.warmup} warm-up")  # fmt: skip
        print(f"# paper's code: {paper_root}, {paper_code_version(paper_root)}; its EMNIST folders written in "
              f"{layout_s:.1f} s to a temporary folder")  # fmt: skip
        print(f"# machine: {os.cpu_count()} CPUs, load average before the run {os.getloadavg()[0]:.2f}", flush=True)
        runs: dict[str, list[dict]] = {}
        sides = [("paper", None, None, "paper's code")] + [("ours", *o) for o in ours]
        for r in range(args.rounds):
            for name, b, method, label in sides if r % 2 == 0 else sides[::-1]:
                if name == "paper":
                    cfg = dict(common, side="paper", episodes=args.episodes, warmup=args.warmup)
                else:
                    steps = max(2, -(-args.episodes // b))
                    cfg = dict(common, side="ours", B=b, steps=steps, warmup_steps=args.warmup, method=method)
                res = spawn_child(os.path.abspath(__file__), cfg, args.timeout)
                if "error" in res:
                    print(f"# round {r + 1} {label}: ERROR {res['error']}", flush=True)
                    return 1
                runs.setdefault(label, []).append(res)
                print(f"# round {r + 1} {label}: s/episode {', '.join(f'{t:.3f}' for t in res['times'])}; "
                      f"loading {statistics.median(res['data_times']):.3f}; peak RSS {res['peak_rss_mb']:.0f} MiB",
                      flush=True)  # fmt: skip
        paper_runs = runs["paper's code"]
        rows = [summarize("paper's code", paper_runs, 1)]
        rows += [summarize(label, runs[label], b) for b, _, label in ours]
        print()
        print(format_table(rows))
        print()
        print(f"# shims for the paper's code: {'; '.join(paper_runs[0]['shims']) or 'none'}")
        print("# same work on both sides (paper / rulesearch):")
        print("\n".join(work_checks(paper_runs[0]["work"], runs[rows[1]["label"]][0]["work"], args.M, args.K,
                                    args.Q)))  # fmt: skip
        check = None
        if not args.no_check:
            thetas = [[1e-3, 0.0, 0.0], [1e-3, -1e-3, 1e-4]]  # the paper's initial values; all three terms active
            check = spawn_child(os.path.abspath(__file__), dict(common, side="check", thetas=thetas, methods=methods),
                                args.timeout)  # fmt: skip
            if "error" in check:
                print(f"# same-episode check: ERROR {check['error']}")
            else:
                print(f"# one episode of the paper's code through both (its images, order, initial weights and "
                      f"feedback), float32, tolerance {args.check_rtol:g}:")  # fmt: skip
                lines, _ = check_lines(check["checks"], args.check_rtol)
                print("\n".join(lines))
        print(DIFFERENCES)
        print(f"# load average after the run {os.getloadavg()[0]:.2f} (1 min), {os.getloadavg()[1]:.2f} (5 min)",
              flush=True)  # fmt: skip
        if args.json:
            with open(args.json, "w") as fh:
                json.dump({"args": vars(args), "runs": runs, "rows": rows, "check": check}, fh, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
