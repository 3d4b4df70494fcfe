"""`python -m fastcpu_runtime.compare`: the CLI end to end on the tiny synthetic shape (one run shared by
the tests, since every instance process imports torch and builds its sessions), one run of the int8
backends on a pruned tiny BERT for their accuracy column, plus its error paths."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from runtime_helpers import CALIBRATION_TEXTS, encode, encoder_linears, save, tiny_runtime_model
from transformers import BertForQuestionAnswering

from fastcpu_runtime import available_backends
from fastcpu_runtime import compare as bench_cli
from fastcpu_runtime.synthetic import magnitude_mask

# The second backend: ONNX Runtime fp32 builds in seconds; native (inductor) where it is not installed.
BACKENDS = ["eager", "onnxruntime_fp32" if "onnxruntime_fp32" in available_backends() else "native"]
KEYS = {"backend", "scheme", "sparsity", "pattern", "batch_size", "seq_len", "instances", "threads"}
NUMBERS = {"throughput", "latency_p50_ms", "latency_p90_ms"}
BUDGET_MS = 1000.0
# What the command may print on stderr: its progress and skip lines, and the sparse kernel's one warning on
# a CPU below AVX-512 VNNI (library noise is silenced).
STDERR_LINE = re.compile(
    r"layout \d+x\d+: round \d+/\d+ done|\S+( batch \d+ \d+x\d+)?: skip: .*"
    r"|sparse int8 kernel: this CPU has no [\w-]+ VNNI, falling back to the \w+ path \(slower\)"
)
# The int8 backends of the accuracy run: auto races sparse against native for this artifact
PEERS = [name for name in ("onnxruntime", "openvino") if name in available_backends()]
INT8_BACKENDS = ["native", "auto", *PEERS]


def run_cli(*args: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """The command with `args` plus --json; (its completed process, its records)."""
    command = [sys.executable, "-m", "fastcpu_runtime.compare", *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result, json.loads(Path(args[args.index("--json") + 1]).read_text())


def assert_quiet(stderr: str) -> None:
    """No library noise: the torchao .so, pytree Enum, torchvision and inductor copy-construct messages."""
    noise = [line for line in stderr.splitlines() if not STDERR_LINE.fullmatch(line)]
    assert not noise, "\n".join(noise)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    """One CLI run: 2 backends (and sparse, which must be skipped on an fp32 artifact), batch 1 and 2,
    layouts 1x1 and 2x1."""
    out = tmp_path_factory.mktemp("bench") / "records.json"
    args = ["--shape", "tiny", "--scheme", "none", "--sparsity", "0.5", "--backends", *BACKENDS, "sparse"]
    args += ["--batch", "1", "2", "--seq", "16", "--instances-threads", "1x1", "2x1"]
    args += ["--warmup", "1", "--rounds", "2", "--iterations", "2"]
    return run_cli(*args, "--latency-budget-ms", str(BUDGET_MS), "--json", str(out))


@pytest.fixture(scope="module")
def int8_run(tmp_path_factory, tokenizer):
    """The int8 backends on a tiny BERT whose weights are large enough for int8 error to show (as in the
    backend tests), its encoder Linears pruned to 80% in 4x1 blocks, stored as static int8."""
    root = tmp_path_factory.mktemp("int8")
    model = tiny_runtime_model(BertForQuestionAnswering, initializer_range=0.2)
    modules = encoder_linears(model)
    with torch.no_grad():
        for name in modules:
            weight = model.get_submodule(name).weight
            weight.mul_(magnitude_mask(weight, 0.8, "4x1"))
    artifact = save(
        root / "artifact",
        model,
        tokenizer,
        scheme="static_int8",
        modules=modules,
        calibration=encode(tokenizer, CALIBRATION_TEXTS, padding="max_length", max_length=24),
        sparsity={"method": "magnitude", "pattern": "4x1", "target": 0.8},
    )
    args = ["--artifact", str(artifact), "--backends", *INT8_BACKENDS, "--batch", "2", "--seq", "32"]
    args += ["--instances-threads", "1x1", "--warmup", "0", "--rounds", "1", "--iterations", "1"]
    return run_cli(*args, "--json", str(root / "records.json"))


def test_records_cover_every_configuration(cli_run):
    _, records = cli_run
    configurations = {(r["backend"], r["batch_size"], r["instances"], r["threads"]) for r in records}
    expected = {(b, batch, n, 1) for b in BACKENDS for batch in (1, 2) for n in (1, 2)}
    assert configurations == expected
    for record in records:
        assert record.keys() >= KEYS | NUMBERS
        assert all(record[key] > 0 for key in NUMBERS)
        assert record["latency_p50_ms"] <= record["latency_p90_ms"]
        low, high = record["throughput_spread"]
        assert low <= record["throughput"] <= high
        assert (record["scheme"], record["sparsity"], record["pattern"]) == ("none", 0.5, "4x1")
        assert record["int8_peak_fraction"] is None  # fp32 artifact: no int8 roofline
        assert record["system"]["logical_cores"] >= 1
        assert record["cosine_vs_fp32"] > 0.9999  # fp32 against fp32


def test_output_has_system_table_skip_reason_and_budget_choice(cli_run):
    result, records = cli_run
    assert result.stdout.startswith("system: ")
    assert "sparse batch 1 1x1: skip: BackendError: backend sparse needs an int8 artifact" in result.stderr
    fitting = [r for r in records if r["latency_p90_ms"] <= BUDGET_MS]
    for backend in BACKENDS:
        best = max((r for r in fitting if r["backend"] == backend), key=lambda r: r["throughput"])
        choice = f"  {backend}: {best['throughput']:.1f} samples/s at batch {best['batch_size']}"
        assert choice in result.stdout


def test_no_library_noise_on_stderr(cli_run, int8_run):
    for result, _ in (cli_run, int8_run):
        assert_quiet(result.stderr)


def test_int8_backends_keep_the_fp32_logits_on_real_text(int8_run):
    result, records = int8_run
    cosines = {r["backend"]: r["cosine_vs_fp32"] for r in records}
    print(f"cosine vs eager fp32: {cosines}")
    assert set(cosines) == set(INT8_BACKENDS)
    assert all(cosine >= 0.99 for cosine in cosines.values()), cosines
    assert all(r["int8_peak_fraction"] is not None for r in records)  # auto's choice is counted as int8
    auto = next(r for r in records if r["backend"] == "auto")
    candidates = [name for name in ("sparse", "native") if name in available_backends()]
    chosen, reason = auto["description"].removeprefix("auto -> ").split(": ", 1)
    assert chosen in candidates, auto["description"]
    measured = ", measured " if len(candidates) > 1 else ""
    assert reason.startswith("4x1 block sparsity 0.80 of the int8 Linears" + measured), auto["description"]
    assert "cos_vs_fp32 |" in result.stdout and "below cosine" not in result.stdout


def test_accuracy_line_names_the_records_below_the_target():
    records = [
        {"backend": "a", "batch_size": 1, "cosine_vs_fp32": 0.995},
        {"backend": "b", "batch_size": 8, "cosine_vs_fp32": 0.9712},
    ]
    line = "below cosine 0.99 of eager fp32 on real text: b batch 8 (0.9712)"
    assert bench_cli.format_accuracy(records) == line
    assert bench_cli.format_accuracy(records[:1]) is None


def test_a_crashed_session_is_a_row_of_the_table():
    """A backend that crashed (not one that refused the artifact) shows in the table, not only on stderr;
    main() then exits 1."""
    where = {"scheme": "static_int8", "sparsity": 0.8, "pattern": "4x1", "instances": 1, "threads": 2}
    measured = {
        **where,
        "backend": "native",
        "batch_size": 8,
        "throughput": 120.0,
        "throughput_spread": [110.0, 125.0],
        "latency_p50_ms": 60.0,
        "latency_p90_ms": 70.0,
        "int8_peak_fraction": 0.5,
        "cosine_vs_fp32": 0.999,
    }
    crashed = {**where, "backend": "openvino", "batch_size": 8, "error": "RuntimeError: no plugin"}
    rows = bench_cli.format_table([measured, crashed]).splitlines()[2:]
    assert rows[0].startswith("| static_int8 | 80% | 4x1 | native | 8 | 1x2 | 120.0 (110.0–125.0) |")
    assert rows[1] == (
        "| static_int8 | 80% | 4x1 | openvino | 8 | 1x2 | error: RuntimeError: no plugin | | | | |"
    )


def test_budget_picks_the_fastest_record_that_fits_or_none():
    shape = {"batch_size": 1, "instances": 1, "threads": 2, "sparsity": 0.8}
    records = [
        {"backend": "a", "throughput": 10.0, "latency_p90_ms": 5.0, **shape},
        {"backend": "a", "throughput": 30.0, "latency_p90_ms": 20.0, **shape},
        {"backend": "a", "throughput": 20.0, "latency_p90_ms": 8.0, **shape},
        {"backend": "b", "throughput": 50.0, "latency_p90_ms": 50.0, **shape},
    ]
    choices = bench_cli.budget_choices(records, 10.0)
    assert choices == {"a": records[2], "b": None}
    text = bench_cli.format_budget(choices, 10.0)
    assert "  a: 20.0 samples/s at batch 1, 1x2" in text and "  b: none fits" in text
    assert bench_cli.budget_choices(records, 0.1) == {"a": None, "b": None}


def test_roofline_uses_dense_int8_work_over_the_int8_peak(monkeypatch):
    monkeypatch.setattr(bench_cli, "gemm_peaks", lambda threads: {"fp32": 1.0, "bf16": 2.0, "int8": 4.0})
    int8 = {"instances": 2, "threads": 1, "throughput": 100.0, "int8_ops_per_sample": 2e7}
    fp32 = {"instances": 1, "threads": 2, "throughput": 100.0, "int8_ops_per_sample": None}
    bench_cli.add_roofline([int8, fp32])
    assert int8["int8_peak_fraction"] == pytest.approx(0.5)  # 100/s x 2e7 ops / 4 GOP/s
    assert fp32["int8_peak_fraction"] is None


def test_missing_artifact_is_one_clear_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--artifact", str(tmp_path / "missing"), "--backends", "eager"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("error:") == 1 and "does not exist" in err and "Traceback" not in err


def test_unknown_backend_lists_the_available_ones(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench_cli.main(["--artifact", str(tmp_path), "--backends", "eager", "warp-drive"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "unknown backend 'warp-drive'" in err
    assert f"available backends: {', '.join(available_backends())}" in err


@pytest.mark.parametrize("text", ["2", "0x1", "ax2", "1x2x3"])
def test_bad_layout_is_refused(text):
    with pytest.raises(SystemExit):
        bench_cli.build_parser().parse_args(["--shape", "tiny", "--instances-threads", text])
