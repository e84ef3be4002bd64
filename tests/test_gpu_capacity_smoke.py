"""Smoke test of bench/gpu_capacity.py on the CPU: the real measuring path on a tiny Moshi."""

from __future__ import annotations

import importlib
import json
import math
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

from procs.model.capacity import lm_kv_cache_bytes

REPO_ROOT = Path(__file__).resolve().parent.parent
SCRIPT = REPO_ROOT / "bench" / "gpu_capacity.py"
TINY_CPU_ARGS = ["--tiny", "--device", "cpu", "--batch-sizes", "1,2", "--steps", "3", "--warmup", "1"]
# A limit for a hang, not for a slow machine: a run takes about 8 s on a quiet 2-core box and 25 s beside two
# busy loops, and the same steps were seen 50 times slower when the box was shared four ways.
SCRIPT_TIMEOUT_S = 300
# As on a GPU pod where moshi was installed with --no-deps: importing huggingface_hub fails.
RUN_WITHOUT_HUGGINGFACE_HUB = (
    "import runpy, sys; sys.modules['huggingface_hub'] = None; "
    "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
)


@pytest.fixture(scope="module")
def gpu_capacity() -> types.ModuleType:
    """The script, imported as the module of bench/ that it is."""
    return importlib.import_module("bench.gpu_capacity")


def run_script(args: list[str], python_prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, *(python_prefix or []), str(SCRIPT), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=SCRIPT_TIMEOUT_S, cwd=REPO_ROOT)


def table_rows_by_batch_size(stdout: str, header: list[str]) -> dict[int, dict[str, str]]:
    """Parses the human table: a header line, then one whitespace-separated row per batch size."""
    lines = stdout.splitlines()
    header_index = next(i for i, line in enumerate(lines) if line.split() == " ".join(header).split())
    rows: dict[int, dict[str, str]] = {}
    for line in lines[header_index + 1 :]:
        if not line.strip():
            break
        cells = line.split()
        assert len(cells) == len(header), line
        rows[int(cells[0])] = dict(zip(header, cells, strict=True))
    return rows


def assert_finite_positive(text: str) -> None:
    value = float(text)
    assert math.isfinite(value) and value > 0, text


@pytest.mark.timeout(2 * SCRIPT_TIMEOUT_S + 60)  # two runs
def test_tiny_cpu_run_reports_both_batch_sizes_with_times_and_floor(
    tmp_path: Path, gpu_capacity: types.ModuleType
) -> None:
    header = gpu_capacity.TABLE_HEADER
    markdown_path = tmp_path / "capacity.md"
    json_path = tmp_path / "capacity.json"
    completed = run_script([*TINY_CPU_ARGS, "--markdown", str(markdown_path), "--json", str(json_path)])
    assert completed.returncode == 0, completed.stderr

    rows = table_rows_by_batch_size(completed.stdout, header)
    assert sorted(rows) == [1, 2]
    for row in rows.values():
        assert row["within budget"] in {"yes", "no"}
        for column in ("step p50 ms", "step p99 ms", "enc p50", "lm p50", "dec p50", "floor meas ms"):
            assert_finite_positive(row[column])
        assert float(row["step p50 ms"]) <= float(row["step p99 ms"]) <= float(row["step max ms"])
    # The floor grows with B: every session adds its KV cache to the bytes a step reads. Compared unrounded:
    # it is those bytes over the one bandwidth the run measured, and the table's two decimals of it may be
    # equal where that bandwidth is high.
    floors = [b["floor_ms"] for b in json.loads(json_path.read_text())["batches"]]
    assert 0 < floors[0] < floors[1], floors
    assert "max sessions (largest tested B" in completed.stdout
    assert "measured device copy" in completed.stdout

    report = markdown_path.read_text()
    assert "torch " in report and "moshi 0.2.13" in report and "CUDA " in report
    assert "| 1 | " in report and "| 2 | " in report
    # A second run replaces its own block instead of appending a copy.
    rerun = run_script([*TINY_CPU_ARGS, "--batch-sizes", "1", "--markdown", str(markdown_path)])
    assert rerun.returncode == 0, rerun.stderr
    report = markdown_path.read_text()
    assert report.count("## Moshi capacity on") == 1
    assert "| 2 | " not in report


def test_runs_where_huggingface_hub_is_not_installed() -> None:
    completed = run_script(
        [*TINY_CPU_ARGS, "--batch-sizes", "1"], python_prefix=["-c", RUN_WITHOUT_HUGGINGFACE_HUB]
    )
    assert completed.returncode == 0, completed.stderr
    assert "max sessions" in completed.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_device_without_cuda_exits_2_with_a_clear_message() -> None:
    completed = run_script(["--device", "cuda", "--steps", "1"])
    assert completed.returncode == 2
    assert "needs CUDA" in completed.stderr and "--tiny --device cpu" in completed.stderr
    assert completed.stdout == ""


def test_vendor_bandwidth_matches_device_names_as_torch_reports_them(gpu_capacity: types.ModuleType) -> None:
    expected_tb_per_s = {
        "NVIDIA H100 80GB HBM3": 3.35,
        "NVIDIA H100 PCIe": 2.0,
        "NVIDIA H100 NVL": 3.9,
        "NVIDIA H200": 4.8,
        "NVIDIA A100-SXM4-80GB": 2.039,
        "NVIDIA A100 80GB PCIe": 1.935,
        "NVIDIA A100-SXM4-40GB": 1.555,
        "NVIDIA L4": 0.3,
        "NVIDIA L40S": 0.864,
        "NVIDIA A40": 0.696,
        "NVIDIA A10": 0.6,
        "NVIDIA A10G": 0.6,
        "NVIDIA GeForce RTX 4090": 1.008,
    }
    for name, tb_per_s in expected_tb_per_s.items():
        entry = gpu_capacity.vendor_bandwidth(name)
        assert entry is not None, name
        assert entry.bytes_per_s == pytest.approx(tb_per_s * 1e12), name
    assert gpu_capacity.vendor_bandwidth("Some Future GPU") is None


def test_kv_cache_per_session_of_the_7b_config_matches_design(gpu_capacity: types.ModuleType) -> None:
    lm_kwargs, _ = gpu_capacity.full_size_configs()
    kv_bytes = lm_kv_cache_bytes(lm_kwargs, torch.bfloat16)
    assert kv_bytes == 32 * 2 * 3000 * 4096 * 2  # DESIGN.md: ~1.57 GB
