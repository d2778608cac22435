"""Config structs reject bad values with a message naming the field."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.config import BLAS_LIBRARIES, PARTITION_KERNELS, DataplaneConfig, SchedulerConfig, ServerConfig

ROOT = Path(__file__).resolve().parents[2]


def test_blas_library_is_checked() -> None:
    for name in BLAS_LIBRARIES:
        assert DataplaneConfig(blas_library=name).blas_library == name
        assert DataplaneConfig(decode_blas_library=name).decode_blas_library == name
    with pytest.raises(ValueError, match="blas_library must be one of default, cublas, cublaslt"):
        DataplaneConfig(blas_library="mkl")
    with pytest.raises(ValueError, match="decode_blas_library must be one of default, cublas, cublaslt, got 'mkl'"):
        DataplaneConfig(decode_blas_library="mkl")


def test_dataplane_cli_refuses_an_unknown_blas_library() -> None:
    out = subprocess.run([sys.executable, "-m", "dataplane", "--blas-library", "mkl"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--blas-library" in out.stderr


def test_partition_kernels_is_checked() -> None:
    assert DataplaneConfig().partition_kernels == "device"
    for name in PARTITION_KERNELS:
        assert DataplaneConfig(partition_kernels=name).partition_kernels == name
    with pytest.raises(ValueError, match="partition_kernels must be one of device, partition, gemm, got 'half'"):
        DataplaneConfig(partition_kernels="half")


def test_the_launcher_hands_every_dataplane_option_on() -> None:
    from controlplane.launcher import dataplane_args
    from dataplane.__main__ import build_parser

    config = DataplaneConfig(piecewise_graphs=False, partition_kernels="partition", blas_library="cublaslt",
                             cuda_graphs=False, decode_partition_sms=(16, 32), decode_gemm_rows=13,
                             decode_blas_library="cublas", decode_l2_prefetch_kib=4096)
    args = build_parser().parse_args(dataplane_args(config))
    assert args.decode_l2_prefetch_kib == 4096
    assert not args.piecewise_graphs and args.partition_kernels == "partition" and args.blas_library == "cublaslt"
    assert args.decode_blas_library == "cublas"
    assert args.decode_gemm_rows == 13
    assert args.no_cuda_graphs and args.decode_partition_sms == (16, 32)
    plain = build_parser().parse_args(dataplane_args(DataplaneConfig()))
    assert plain.piecewise_graphs and plain.partition_kernels == "device" and plain.blas_library == "default"
    assert plain.decode_blas_library == "default"
    assert plain.decode_gemm_rows == DataplaneConfig().decode_gemm_rows
    assert plain.decode_l2_prefetch_kib == 0
    assert plain.epilogue_norm_rows == DataplaneConfig().epilogue_norm_rows
    assert build_parser().parse_args(dataplane_args(DataplaneConfig(epilogue_norm_rows=64))).epilogue_norm_rows == 64


def test_decode_gemm_rows_is_checked() -> None:
    assert DataplaneConfig(decode_gemm_rows=64).decode_gemm_rows == 64
    for bad in (-1, 65):
        with pytest.raises(ValueError, match=r"decode_gemm_rows must be in \[0, 64\]"):
            DataplaneConfig(decode_gemm_rows=bad)


def test_cublas_workspace_config_is_checked_and_handed_on() -> None:
    from controlplane.launcher import dataplane_args
    from dataplane.__main__ import build_parser

    for good in (":0:0", ":4096:8", ":4096:2:16:8"):
        assert DataplaneConfig(cublas_workspace_config=good).cublas_workspace_config == good
    for bad in ("", "0:0", ":0", ":a:1", ":0:0 ", ":\u0660:\u0660"):  # the last: Arabic-Indic digits
        with pytest.raises(ValueError, match="cublas_workspace_config must be"):
            DataplaneConfig(cublas_workspace_config=bad)
    args = build_parser().parse_args(dataplane_args(DataplaneConfig(cublas_workspace_config=":0:0")))
    assert args.cublas_workspace_config == ":0:0"
    assert build_parser().parse_args(dataplane_args(DataplaneConfig())).cublas_workspace_config is None


def test_the_worker_sets_the_cublas_workspace_for_its_process(monkeypatch: pytest.MonkeyPatch) -> None:
    from dataplane.worker import apply_cublas_workspace, calibration_setup

    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":1:1")  # records the original value, restored after the test
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    apply_cublas_workspace(DataplaneConfig())
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ  # none named: the environment's (cuBLAS's default)
    apply_cublas_workspace(DataplaneConfig(cublas_workspace_config=":0:0"))
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    apply_cublas_workspace(DataplaneConfig(cublas_workspace_config=":0:0"))  # the config wins, with a warning
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":0:0"
    assert calibration_setup(DataplaneConfig(cublas_workspace_config=":0:0")) == "ws-0-0"  # GEMM rates change
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    assert calibration_setup(DataplaneConfig()) == "ws-4096-8"  # the environment's when the config names none


def test_epilogue_norm_rows_is_checked() -> None:
    assert DataplaneConfig(epilogue_norm_rows=256).epilogue_norm_rows == 256
    with pytest.raises(ValueError, match="epilogue_norm_rows must be >= 0"):
        DataplaneConfig(epilogue_norm_rows=-1)
    both = DataplaneConfig(decode_gemm_rows=16, epilogue_norm_rows=256)  # the folded GEMMs take precedence at load
    assert both.epilogue_norm_rows == 256 and both.decode_gemm_rows == 16


def test_serve_takes_piecewise_graphs() -> None:
    from controlplane.cli import build_parser, configs_from_args

    dataplane, _ = configs_from_args(build_parser().parse_args(["serve", "--no-piecewise-graphs"]))
    assert not dataplane.piecewise_graphs
    dataplane, _ = configs_from_args(build_parser().parse_args(["serve"]))  # on by default, as vLLM's
    assert dataplane.piecewise_graphs


@pytest.mark.parametrize("bad", [
    {"step_timeout_s": float("nan")}, {"handshake_timeout_s": float("nan")}, {"shutdown_grace_s": float("nan")},
    {"restart_backoff_s": -5.0}, {"restart_backoff_s": float("nan")}, {"auth_token": ""}, {"auth_token": "  "},
])
def test_server_config_refuses_nan_timeouts_negative_backoff_and_blank_tokens(bad: dict[str, object]) -> None:
    """NaN passed `<= 0` checks and switched the timeout off; a blank token turned authentication off
    (empty) or locked every client out (spaces: the server strips what clients send)."""
    with pytest.raises(ValueError):
        ServerConfig(**bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", [{"tbt_slo_ms": float("nan")}, {"ttft_slo_ms": float("nan")},
                                 {"hysteresis": float("nan")}])
def test_scheduler_config_refuses_nan(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        SchedulerConfig(**bad)  # type: ignore[arg-type]


def test_serve_refuses_attach_without_an_endpoint_and_unknown_log_levels() -> None:
    from controlplane.cli import build_parser, configs_from_args

    with pytest.raises(ValueError, match="--attach needs --dataplane-endpoint"):
        configs_from_args(build_parser().parse_args(["serve", "--attach"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "bogus"])
    assert build_parser().parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"


@pytest.mark.parametrize("bad", [{"device": "tpu"}, {"dtype": "float8"}, {"attention_backend": "bogus"},
                                 {"cpu_kv_cache_bytes": 0}, {"max_num_seqs": 0}, {"max_num_batched_tokens": -7}])
def test_dataplane_config_refuses_what_the_data_plane_would_only_find_after_importing_torch(
        bad: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        DataplaneConfig(**bad)  # type: ignore[arg-type]
    assert DataplaneConfig(device="cuda:1").device == "cuda:1"


def test_serve_refuses_a_model_that_is_neither_a_preset_nor_a_folder(tmp_path: Path) -> None:
    from controlplane.cli import _check_model

    with pytest.raises(ValueError, match="neither a preset"):
        _check_model("nosuchmodel")
    _check_model("tiny")
    _check_model(str(tmp_path))


def test_partition_sizes_and_ports_are_checked_with_the_flag_named() -> None:
    from controlplane.cli import build_parser
    from shared.config import TelemetryConfig

    assert build_parser().parse_args(["serve", "--decode-partition-sms", "8,16"]).decode_partition_sms == (8, 16)
    for bad in ("8,x", "0,8", ""):
        with pytest.raises(SystemExit):
            build_parser().parse_args(["serve", "--decode-partition-sms", bad])
    with pytest.raises(ValueError, match="both 50777"):
        ServerConfig(port=50777, telemetry=TelemetryConfig(metrics_port=50777))
    ServerConfig(port=0, telemetry=TelemetryConfig(metrics_port=0))  # both off / ephemeral


def test_the_checks_keep_what_the_loader_torch_and_logging_accept() -> None:
    from controlplane.cli import build_parser
    from shared.config import TelemetryConfig

    for dtype in ("bf16", "fp16", "half", "fp32", "float"):
        assert DataplaneConfig(dtype=dtype).dtype == dtype
    assert DataplaneConfig(device="cpu:0").device == "cpu:0"
    assert build_parser().parse_args(["serve", "--log-level", "warn"]).log_level == "WARN"
    assert build_parser().parse_args(["simulate", "--trace", "t.csv", "--gpu", "H100"]).gpu == "h100"
    ServerConfig(port=50777, host="127.0.0.1", telemetry=TelemetryConfig(metrics_port=50777, metrics_host="::1"))


@pytest.mark.parametrize("flags, says", [(["--num-kv-blocks", "0"], "num_kv_blocks must be >= 1, got 0"),
                                         (["--dtype", "bogus"], "dtype must be one of"),
                                         (["--model", "nosuchmodel"], "neither a preset"),
                                         (["--max-num-batched-tokens", "64"], "(64) must be >= max_num_seqs (256)")])
def test_a_bad_serve_setting_is_one_error_line_naming_the_subcommand(flags: list[str], says: str,
                                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from controlplane.cli import main

    assert main(["serve", *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("duetserve serve: error: ") and says in err and "usage:" not in err
    assert len(err.strip().splitlines()) == 1


def test_a_served_model_name_is_printable_and_not_empty() -> None:
    from shared.config import ServerConfig

    assert ServerConfig(served_model_name="org/model-8b").served_model_name == "org/model-8b"
    for bad in ("", "  ", "a\nb", "x" * 257):
        with pytest.raises(ValueError, match="served_model_name"):
            ServerConfig(served_model_name=bad)
