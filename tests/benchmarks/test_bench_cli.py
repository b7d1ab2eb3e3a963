"""The ``ral-bench`` command: bad input errors, a tiny quick run writes the CSV and the
markdown table, ``table`` and ``plot`` read it back, and the harness imports without
matplotlib."""

from __future__ import annotations

import csv
import os
import subprocess
import sys

import pytest

from ral_kernels.bench import cli, harness
from ral_kernels.bench.config import PRESETS, Shape, expand, get_preset

REQUIRED = ["provider", "mode", "seq_len", "median_ms", "p20_ms", "p80_ms", "tflops", "peak_memory_mb", "device",
            "torch_version", "triton_version", "commit", "time", "status", "time_vs_sdpa", "time_vs_eager",
            "memory_vs_sdpa", "memory_vs_eager"]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.parametrize("argv, expected", [
    (["--preset", "nope"], ["unknown preset 'nope'", "cpu-quick", "shape-A", "qwen2.5-vl-7b", "llama-3-8b"]),
    (["--quick", "--providers", "torch,magic"], ["unknown provider 'magic'", "eager_compiled", "sdpa", "flash_attn"]),
    (["--quick", "--modes", "sideways"], ["unknown mode 'sideways'", "forward, backward, full"]),
    (["--quick", "--heads", "7:2"], ["query heads 7 must be a multiple of KV heads 2"]),
    (["--quick", "--heads", "x"], ["HQ:HK"]),
    (["--quick", "--divergences", "hellinger"], ["unknown divergence 'hellinger'", "jsd, kl, reverse_kl"]),
    (["--quick", "--head-reductions", "max"], ["unknown head reduction 'max'", "mean, none"]),
    (["--quick", "--dtype", "int8"], ["unknown dtype 'int8'", "float32, bfloat16"]),
    (["--quick", "--seq-lens", "0"], ["--seq-lens must be positive"]),
    (["--quick", "--div-fracs", "1.5"], ["div_frac must be in (0, 1]"]),
    (["--quick", "--preset", "shape-B"], ["--quick is the cpu-quick preset"]),
    (["--quick", "--device", "tpu"], ["unknown device 'tpu'"]),
])
def test_bad_input_is_a_clear_error(argv, expected, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    for text in expected:
        assert text in err, err


def test_gpu_preset_without_cuda_says_what_to_do(capsys, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["--preset", "shape-A"])
    err = capsys.readouterr().err
    assert "runs on CUDA, but CUDA is not available" in err and "--quick" in err


def test_table_and_plot_errors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["table", str(tmp_path / "missing.csv")])
    assert "no such results file" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(SystemExit):
        cli.main(["plot", str(bad)])
    assert "not a ral-bench results CSV" in capsys.readouterr().err


def test_presets_expand_to_the_named_shapes():
    (a,) = get_preset("shape-A").shapes()
    assert (a.batch, a.heads, a.kv_heads, a.seq_len, a.head_dim, a.rows, a.divergence, a.head_reduction,
            a.dtype) == (4, 28, 4, 8192, 128, 1024, "jsd", "mean", "bfloat16")
    b = get_preset("shape-B").shapes()
    assert {(s.divergence, s.head_reduction) for s in b} == {("kl", "none"), ("jsd", "mean")}
    assert all(s.rows == s.seq_len == 8192 and (s.heads, s.kv_heads) == (32, 8) for s in b)
    assert [s.seq_len for s in get_preset("cpu-quick").shapes()] == [256, 512, 1024, 2048, 4096]
    assert max(s.seq_len for s in get_preset("gpu-sweep").shapes()) == 32768
    for name, hq, hk in (("qwen2.5-vl-7b", 28, 4), ("qwen2.5-vl-32b", 40, 8), ("llama-3-8b", 32, 8)):
        assert {(s.heads, s.kv_heads, s.head_dim) for s in PRESETS[name].shapes()} == {(hq, hk, 128)}
    axes = get_preset("cpu-axes").shapes()
    assert len(axes) == 9 and {s.seq_len for s in axes} == {1024}


def test_overrides_replace_axes():
    base = dict(batch=1, heads=4, kv_heads=2, head_dim=16, div_rows=8, dtype="float32")
    shapes = expand(base, {"seq_len": [64], ("divergence", "head_reduction"): [("kl", "none"), ("jsd", "mean")]},
                    overrides={"divergence": ["reverse_kl"], "div_frac": [0.5], ("heads", "kv_heads"): [(8, 8)]})
    assert {(s.divergence, s.head_reduction, s.rows, s.heads, s.kv_heads) for s in shapes} == {
        ("reverse_kl", "none", 32, 8, 8), ("reverse_kl", "mean", 32, 8, 8)}
    with pytest.raises(ValueError, match="multiple of kv_heads"):
        Shape(heads=6, kv_heads=4)


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_quick_run_writes_csv_table_and_plots(tmp_path, capsys):
    out = tmp_path / "quick"
    # Worker processes (the CPU default) for one provider, plus one that cannot run here.
    code = cli.main(["--quick", "--seq-lens", "64", "--providers", "torch,cuda", "--modes", "fwd,full",
                     "--out", str(out), "--no-progress", "--min-time-ms", "0"])
    assert code == 0
    first = _read(out / harness.CSV_NAME)
    assert len(first) == 4 and {r["status"] for r in first if r["provider"] == "torch"} == {"ok"}
    assert all(float(r["peak_memory_mb"]) >= 0 for r in first if r["provider"] == "torch")
    assert all(r["status"].startswith("skipped: ") and "CUDA" in r["status"] for r in first if r["provider"] == "cuda")
    # In-process (fast), appended to the same CSV.
    code = cli.main(["--quick", "--seq-lens", "64", "128", "--providers", "eager", "sdpa", "torch", "--modes",
                     "forward", "full", "--out", str(out), "--no-progress", "--isolation", "none",
                     "--min-time-ms", "0"])
    assert code == 0
    printed = capsys.readouterr().out
    rows = _read(out / harness.CSV_NAME)
    assert set(REQUIRED) <= set(rows[0])
    assert len(rows) == 4 + 3 * 2 * 2
    by = {(r["provider"], r["mode"], r["seq_len"]): r for r in rows}  # the later run wins
    for prov in ("torch", "eager", "sdpa"):
        for mode in ("forward", "full"):
            for t in ("64", "128"):
                r = by[(prov, mode, t)]
                assert r["status"] == "ok", r
                assert float(r["median_ms"]) > 0 and float(r["p20_ms"]) <= float(r["p80_ms"])
                assert float(r["tflops"]) > 0 and r["peak_memory_mb"] != ""
                assert r["device"] and r["torch_version"] and r["commit"] and r["time"]
                assert float(r["time_vs_eager"]) > 0 and float(r["time_vs_sdpa"]) > 0
    assert float(by[("eager", "full", "128")]["time_vs_eager"]) == 1.0
    assert float(by[("sdpa", "full", "128")]["time_vs_sdpa"]) == 1.0
    assert first[0]["time_vs_eager"] == ""  # eager was not in the first run

    table = (out / "fused_attn_kl.md").read_text()
    assert "| T | provider |" in table and "| 128 | torch |" in table and "`cuda` skipped" in table
    assert "| T | provider |" in printed

    assert cli.main(["table", str(out / harness.CSV_NAME), "--modes", "forward"]) == 0
    assert "fwd ms" in capsys.readouterr().out
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nBENCH_TABLE_PLACEHOLDER\n\n## Tests\n")
    for _ in range(2):  # the placeholder becomes markers, which a second run replaces
        assert cli.main(["table", str(out / harness.CSV_NAME), "--update", str(readme)]) == 0
    text = readme.read_text()
    assert text.count("| T | provider |") == 1 and text.endswith("## Tests\n") and "PLACEHOLDER" not in text
    readme.write_text("nothing to replace\n")
    with pytest.raises(SystemExit):
        cli.main(["table", str(out / harness.CSV_NAME), "--update", str(readme)])
    assert "no '<!-- ral-bench table: begin -->'" in capsys.readouterr().err
    plots = tmp_path / "plots"
    assert cli.main(["plot", str(out / harness.CSV_NAME), "--out", str(plots)]) == 0
    pngs = sorted(p.name for p in plots.iterdir())
    assert len(pngs) == 2 and all(p.endswith(".png") for p in pngs)
    assert all((plots / p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)


def test_rerun_replaces_rows_in_reports(tmp_path):
    path = str(tmp_path / "r.csv")
    row = dict(provider="torch", mode="full", status="ok", median_ms=2.0, peak_memory_mb=1.0, device="cpu",
               **Shape(seq_len=64).columns())
    harness.append_csv(path, [row])
    harness.append_csv(path, [dict(row, median_ms=1.0)])
    assert len(_read(path)) == 2
    (latest,) = harness.read_csv(path)
    assert latest["median_ms"] == 1.0


def test_console_script_and_op_script_are_wired():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        pytest.skip("tomllib needs Python 3.11")
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    assert project["scripts"]["ral-bench"] == "ral_kernels.bench.cli:main"
    assert {"pytest-benchmark", "matplotlib", "tqdm"} <= {
        d.split(">")[0].split("=")[0].split("<")[0].split(";")[0].strip()
        for d in project["optional-dependencies"]["test"]}
    # The op's script runs the command; importing the harness does not import matplotlib.
    script = os.path.join(ROOT, "benchmarks", "bench_fused_attn_kl.py")
    res = subprocess.run([sys.executable, "-X", "importtime", script, "list"], capture_output=True, text=True,
                         check=True)
    assert "shape-A" in res.stdout and "eager_compiled" in res.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in res.stderr.splitlines() if line.startswith("import time:")]
    assert "ral_kernels.bench.harness" in imported and "matplotlib" not in imported
