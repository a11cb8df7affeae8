"""The benchmark scripts run end to end (quick mode, tiny model) and print the expected tables."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from leanformers.bench import format_table, main, ratios

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow
sys.path.insert(0, str(ROOT / "bench"))
import bench_decode  # noqa: E402


def test_format_table_ratios_and_errors():
    rows = [
        {"mode": "eager-fp32", "decode_tok_s": 30.0, "decode_tok_s_runs": [30.0, 28.0, 33.0], "decode_range": [28.0, 33.0],
         "prefill_tok_s": 500.0, "ttft_cold_s": 1.234, "ttft_warm_s": 1.0, "peak_rss_mb": 700.0,
         "answer": "The capital | of France"},
        {"mode": "transformers-fp32", "decode_tok_s": 15.0, "decode_tok_s_runs": [15.0, 14.0, 11.0]},
        {"mode": "llama.cpp", "decode_tok_s": 60.0},
        {"mode": "int4", "error": "skipped: no kernel"},
    ]
    ratios(rows, ["transformers-fp32", "llama.cpp"])
    # per-round ratios 2.0, 2.0, 3.0: median 2.0, range 2-3; llama.cpp has no rounds: the medians' ratio
    assert rows[0]["vs_transformers-fp32"] == 2.0 and rows[0]["vs_transformers-fp32_range"] == [2.0, 3.0]
    assert rows[0]["vs_llama.cpp"] == 0.5
    table = format_table(rows, ["transformers-fp32", "llama.cpp"]).splitlines()
    assert table[0].startswith("| mode | decode tok/s | vs transformers-fp32 | vs llama.cpp | range |")
    assert len(table) == 2 + len(rows)
    assert "| eager-fp32 | 30.0 | 2.00x (2-3) | 0.50x (0.5-0.5) | 28-33 | 500.0 | 1.23 | 1.00 | 700.0 | " \
           "The capital \\| of France |" in table
    assert "(skipped: no kernel)" in table[-1]


def test_bench_quick_runs_end_to_end(tiny_models, tmp_path, capsys):
    out = tmp_path / "decode.json"
    rc = bench_decode.main(["--quick", "-m", str(tiny_models["smollm2"]), "--modes",
                            "eager-fp32,compiled-fp32,transformers-fp32,llama.cpp", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "| mode | decode tok/s | vs transformers-fp32 | vs llama.cpp |" in printed
    data = json.loads(out.read_text())
    rows = {r["mode"]: r for r in data["rows"]}
    assert set(rows) == {"eager-fp32", "compiled-fp32", "transformers-fp32", "llama.cpp"}
    for mode in ("eager-fp32", "compiled-fp32", "transformers-fp32"):
        r = rows[mode]
        assert "error" not in r, r
        assert r["decode_tok_s"] > 0 and r["prefill_tok_s"] > 0 and r["peak_rss_mb"] > 50
        assert r["ttft_cold_s"] > 0 and r["ttft_warm_s"] > 0
        assert len(r["answer_ids"]) >= 1
    # the same greedy tokens from leanformers and transformers (same weights, float32)
    assert rows["eager-fp32"]["answer_ids"] == rows["transformers-fp32"]["answer_ids"]
    assert rows["compiled-fp32"]["answer_ids"] == rows["eager-fp32"]["answer_ids"]
    # the compiled mode really ran its compiled step (a package), not an eager fallback
    assert rows["compiled-fp32"]["compiled_calls"]["compiled"] > 0 and not rows["compiled-fp32"].get("eager_fallbacks")
    assert rows["eager-fp32"]["vs_transformers-fp32"] > 0
    assert rows["llama.cpp"]["error"].startswith("skipped")  # a safetensors model: no GGUF for llama.cpp
    assert data["meta"]["new_tokens"] == 8 and data["meta"]["runs"] == 1


def test_bench_rejects_unknown_modes(capsys):
    assert main(["--modes", "warp-speed"]) == 2
    assert "unknown mode" in capsys.readouterr().err
    assert main(["--modes", "transformers-fp32"]) == 2  # peers are bench/bench_decode.py's, not the library's


def test_gpu_check_cpu_mode_runs(tmp_path):
    env = dict(os.environ, OUT=str(tmp_path), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--no-quant", "--mode", "default"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "parity: PASS" in proc.stdout
    assert "| check |" in proc.stdout and "| mode |" in proc.stdout
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["parity_ok"] and len(result["parity"]) == 4
    assert [r["mode"] for r in result["speed"]] == ["eager float32", "compiled float32"]
    assert all(r.get("decode_tok_s", 0) > 0 for r in result["speed"])
    assert [r["precision"] for r in result["train"]] == ["fp32"] and result["train"][0]["pass"]


@pytest.mark.slow
def test_gpu_check_distributed_part_runs_on_cpu(tmp_path):
    """(d) of the GPU check, DDP and FSDP under torchrun, run on gloo: losses equal one process's."""
    env = dict(os.environ, OUT=str(tmp_path), TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--device", "cpu", "--tiny",
                           "--skip-speed", "--dist", "2", "--mode", "default"],
                          capture_output=True, text=True, timeout=900, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "gpu_check.json").read_text())["distributed"]
    assert [r["strategy"] for r in rows] == ["ddp", "fsdp"] and all(r["pass"] for r in rows), rows
    assert all(float(r["max_rel_vs_1_cpu_process"]) < 1e-4 for r in rows), rows


def test_bench_load_small_runs():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_load.py"), "--small", "--imports", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "| leanformers.load |" in proc.stdout
    assert "imports torch: no" in proc.stdout


def test_prompt_lookup_bound_oracle_and_costs():
    sys.path.insert(0, str(ROOT / "bench"))
    try:
        from prompt_lookup_bound import min_cost, oracle_matches
    finally:
        sys.path.remove(str(ROOT / "bench"))
    seq = [1, 2, 3, 4, 9, 1, 2, 3, 4, 9, 7]
    # at 6 (after "... 9 1"), "9 1" never occurred before, "1" did: 2 3 4 9 follow, then 7 breaks it
    assert oracle_matches(seq, 6) == [4, 3, 2, 1, 0]
    assert oracle_matches([5, 6, 5, 6, 5, 6], 3) == [3, 2, 1]  # a repeating pattern copies from itself
    assert min_cost([0, 0, 0], {2: 1.5}) == 3.0  # nothing to draft: plain steps
    # one 4-token verification (3 drafts accepted + 1) beats 4 plain steps; then one plain step
    assert min_cost([3, 2, 1, 0, 0], {4: 1.3}) == pytest.approx(2.3)
