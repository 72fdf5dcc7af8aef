"""experiments/bench_paper_code.py without the paper's code: the skip message and exit code, recognising a checkout,
the PNG layout its data loader reads (on a tiny synthetic array), the torchvision shim, and the report's parts."""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, EXPERIMENTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load("bench_paper_code")


def _fake_checkout(root: Path, bench, leave_out=None):
    """Four files with the lines that identify the repository (a stand-in, none of its code)."""
    root.mkdir(parents=True, exist_ok=True)
    for name, marker in bench.PAPER_FILES.items():
        if name != leave_out:
            (root / name).write_text(f"# stand-in\n{marker}:\n    pass\n")
    return root


@pytest.mark.parametrize("argv", [[], ["--paper-code", "{tmp}"], ["--paper-code", "{tmp}/missing"]])
def test_without_the_paper_code_it_skips_with_exit_code_0(bench, capsys, tmp_path, argv):
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert bench.main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("SKIPPED: the paper's code is needed")
    assert "git clone https://github.com/NeuralDynamicsAndComputing/MetaLearning-Plasticity PATH" in out
    assert "--paper-code PATH" in out
    assert "|" not in out  # no table


def test_bench_meta_passes_its_paper_code_option_on(capsys, tmp_path):
    bench_meta = _load("bench_meta")
    assert bench_meta.run_paper_code(str(tmp_path), threads=1) == 0
    assert "SKIPPED: the paper's code is needed" in capsys.readouterr().out


def test_recognises_a_checkout_by_its_files(bench, tmp_path):
    assert bench.paper_code_problem(None) == "no --paper-code given"
    assert "is not a folder" in bench.paper_code_problem(tmp_path / "nowhere")
    assert bench.paper_code_problem(_fake_checkout(tmp_path / "ok", bench)) is None
    assert bench.paper_code_problem(_fake_checkout(tmp_path / "a", bench, leave_out="optim.py")).endswith(
        "has no optim.py"
    )
    wrong = _fake_checkout(tmp_path / "b", bench)
    (wrong / "main.py").write_text("print('some other main.py')\n")
    assert "does not define MetaLearner" in bench.paper_code_problem(wrong)
    assert "not a git checkout" in bench.paper_code_version(tmp_path / "ok")


def test_writes_the_folders_the_paper_data_loader_reads(bench, tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 4, 5), dtype=np.uint8)
    labels = np.array([0, 1, 0, 2, 1, 0, 2])
    out = bench.write_paper_layout(images, labels, tmp_path, per_class=2)
    assert out == tmp_path / "data" / "emnist"
    assert sorted(p.name for p in out.iterdir()) == ["character01", "character02", "character03"]
    assert sorted(p.name for p in (out / "character01").iterdir()) == ["01_0001.png", "01_0002.png"]  # 2 of 3
    for folder, name, i in (("character01", "01_0002.png", 2), ("character03", "03_0001.png", 3)):
        img = Image.open(out / folder / name)
        assert img.mode == "L"
        np.testing.assert_array_equal(np.array(img), images[i].T)  # the raw IDX layout, as the paper's code has it
    upright = bench.write_paper_layout(images, labels, tmp_path / "u", per_class=1, transpose=False)
    np.testing.assert_array_equal(np.array(Image.open(upright / "character02" / "02_0001.png")), images[1])
    with pytest.raises(ValueError, match="uint8"):
        bench.write_paper_layout(images.astype(np.float32), labels, tmp_path / "f")


def test_torchvision_shim_gives_torchvision_values(bench):
    from PIL import Image

    arr = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
    transforms = bench._shim_transforms()
    t = transforms.Compose([transforms.Resize((4, 5)), transforms.ToTensor()])(Image.fromarray(arr))
    assert t.shape == (1, 4, 5) and t.dtype == torch.float32
    torch.testing.assert_close(t, torch.from_numpy(arr).float().div(255).unsqueeze(0), rtol=0, atol=0)
    assert transforms.Resize(3)(Image.fromarray(arr)).size == (3, 3)


def _run(times, data, rss):
    return {"times": times, "data_times": data, "peak_rss_mb": rss}


def test_summary_and_table(bench):
    paper = bench.summarize("paper's code", [_run([2.0, 2.2, 1.8], [0.5], 500), _run([2.0], [0.5], 510)], 1)
    assert paper["s_per_episode"] == 2.0 and paper["rounds"] == [2.0, 2.0] and paper["episodes"] == 4
    assert paper["compute_s"] == 1.5 and paper["peak_rss_mb"] == 510
    ours = bench.summarize("rulesearch B=8", [_run([0.25, 0.25], [0.0], 380)], 8)
    assert ours["episodes"] == 16
    table = bench.format_table([paper, ours]).splitlines()
    assert table[0].startswith("| code | episodes per meta-step | s/episode (median) |")
    assert len(table) == 4 and all(line.count("|") == 9 for line in table)
    cells = [c.strip() for c in table[3].strip("|").split("|")]
    assert cells[:2] == ["rulesearch B=8", "8"] and cells[2] == "0.250 (16 episodes)"
    assert cells[4] == "8.0x" and cells[6] == "6.0x" and cells[7] == "380"  # 2.0/0.25; (2.0-0.5)/0.25
    assert [c.strip() for c in table[2].strip("|").split("|")][4] == "1.0x"


def test_work_checks_and_equivalence_lines(bench):
    paper = {"sizes": list(bench.SIZES), "feedback": "fix", "inner_steps": [250], "vec": ["1", "2"], "threads": 1,
             "episode_shapes": [[250, 784], [250, 1], [50, 784], [50, 1]]}  # fmt: skip
    ours = {"sizes": list(bench.SIZES), "feedback": "fa", "inner_steps": 250, "terms": ["F0", "F2", "F9"],
            "threads": 1, "episode_shapes": [[1, 250, 784], [1, 250], [1, 50, 784], [1, 50]]}  # fmt: skip
    lines = bench.work_checks(paper, ours, M=5, K=50, Q=10)
    assert len(lines) == 6 and all(line.startswith("# ok") for line in lines)
    lines = bench.work_checks(paper, dict(ours, terms=["F0", "F9"], inner_steps=25), M=5, K=50, Q=10)
    assert sum(line.startswith("# DIFF") for line in lines) == 2

    same = {"theta": [1e-3, 0, 0], "paper_loss": 3.9, "ours_loss": 3.9 * (1 + 1e-6), "paper_grad": [-7.5, 0.4, 79.0],
            "ours_grad": [-7.5, 0.4, 79.0 * (1 + 1e-6)]}  # fmt: skip
    lines, ok = bench.check_lines([same], rtol=1e-3)
    assert ok and lines[0].startswith("# ok")
    lines, ok = bench.check_lines([same, dict(same, ours_grad=[-7.5, 0.4, 70.0])], rtol=1e-3)
    assert not ok and lines[1].startswith("# DIFF")
