"""Hardware profiles and the MFU denominator: datasheet peaks on GPUs, this CPU measured once and
cached, and a peak that a step's achieved rate raises so MFU never exceeds 1."""

import json

import pytest
import torch

from pretrain import hardware
from pretrain.hardware import (
    DATASHEET_TFLOPS,
    PROFILES,
    Hardware,
    datasheet_peak_tflops,
    detect_hardware,
    get_hardware,
)
from pretrain.loop import Throughput
from pretrain.metrics import Peak, select_peak

GiB = 2**30


def fake_gpu(monkeypatch, name: str, memory_gib: float = 80) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    props = type("Props", (), {"total_memory": int(memory_gib * GiB)})()
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", torch.float32, 66.9),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312.0),
        ("NVIDIA B200", torch.bfloat16, 2250.0),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),  # not in the table: callers measure instead
        ("NVIDIA GH200 480GB", torch.bfloat16, None),  # another chip: not an H200
    ],
)
def test_datasheet_peak_by_device_name(monkeypatch, name, dtype, peak):
    fake_gpu(monkeypatch, name)
    assert datasheet_peak_tflops(torch.device("cuda", 0), dtype) == peak


def test_no_datasheet_peak_on_cpu():
    assert datasheet_peak_tflops(torch.device("cpu"), torch.float32) is None
    assert detect_hardware(torch.device("cpu")) is None


@pytest.mark.parametrize(
    "name, memory_gib, profile",
    [
        ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"),
        ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
        ("NVIDIA H100 80GB HBM3", 79.1, "h100"),
        ("NVIDIA H200", 139.8, "h200"),
        ("NVIDIA B200", 178.4, "b200"),
    ],
)
def test_detect_hardware_by_name_and_memory(monkeypatch, name, memory_gib, profile):
    fake_gpu(monkeypatch, name, memory_gib)
    assert detect_hardware(torch.device("cuda", 0)) is PROFILES[profile]


def test_profile_table_is_complete_and_sane():
    assert {"a100-40gb", "a100-80gb", "h100", "h200", "b200"} <= PROFILES.keys()
    for key, hw in PROFILES.items():
        assert hw.name == key and hw.description
        assert set(hw.peak_tflops) == {"bf16", "fp16", "fp32"}
        assert hw.peak("bf16") >= hw.peak("fp32") > 0
        assert hw.memory_gib > 0 and hw.hbm_gbps > 0 and hw.gpus_per_node == 8
        assert hw.intra_node_gbps > hw.inter_node_gbps > 0  # NVLink is faster than the NIC
    assert PROFILES["h100"].peak("bf16") == 989.4 and PROFILES["b200"].memory_gib == 180
    # One table of figures: the name-fragment view agrees with the profiles.
    assert DATASHEET_TFLOPS["H200"][torch.bfloat16] == PROFILES["h200"].peak("bf16")


def test_get_hardware_names_and_errors():
    assert get_hardware("H100") is PROFILES["h100"]
    with pytest.raises(ValueError, match="unknown hardware 'v100'.*a100-40gb.*cpu"):
        get_hardware("v100")
    with pytest.raises(ValueError, match="unknown precision 'fp8'.*bf16, fp16, fp32"):
        PROFILES["h100"].peak("fp8")


def fake_cpu(rate: float = 0.25) -> Hardware:
    peaks = {"bf16": rate, "fp16": rate, "fp32": rate}
    return Hardware("cpu", "test CPU, 2 torch threads", peaks, 16.0, 10.0, 0.5, 0.5, 2)


@pytest.fixture
def cpu_cache(monkeypatch, tmp_path):
    """A fresh cache directory and a fast, counted measurement."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    measured = []
    monkeypatch.setattr(hardware, "measure_cpu", lambda: measured.append(1) or fake_cpu())
    monkeypatch.setattr(hardware, "_CPU_MEMO", {})
    return tmp_path / "pretrain" / "cpu_profile.json", measured


def test_cpu_profile_is_measured_once_and_cached(cpu_cache, monkeypatch):
    path, measured = cpu_cache
    assert get_hardware("cpu") == fake_cpu() and len(measured) == 1
    entries = json.loads(path.read_text())
    assert list(entries) == [hardware.cpu_cache_key()]
    monkeypatch.setattr(hardware, "_CPU_MEMO", {})  # a new process: reads the file
    assert get_hardware("CPU") == fake_cpu() and len(measured) == 1
    monkeypatch.setattr(hardware, "_CPU_MEMO", {})
    monkeypatch.setattr(torch, "__version__", "9.9.9")  # another torch build measures again
    get_hardware("cpu")
    assert len(measured) == 2 and len(json.loads(path.read_text())) == 2


@pytest.mark.parametrize("text", ["{not json", "[1, 2]", '{"KEY": {"name": "cpu"}}', '{"KEY": {"peak_tflops": 3}}'])
def test_corrupt_cpu_cache_is_measured_again(cpu_cache, text):
    path, measured = cpu_cache
    path.parent.mkdir(parents=True)
    path.write_text(text.replace("KEY", hardware.cpu_cache_key()))
    assert get_hardware("cpu") == fake_cpu() and len(measured) == 1
    rewritten = json.loads(path.read_text())[hardware.cpu_cache_key()]
    assert hardware._from_entry(rewritten) == fake_cpu()


def test_real_cpu_measurement_is_plausible(monkeypatch):
    """The real measurement, shrunk: positive rates, this machine's memory."""
    monkeypatch.setattr(hardware, "_copy_gbps", lambda mib=8: 1.0)
    real = hardware.measure_matmul_tflops
    monkeypatch.setattr(hardware, "measure_matmul_tflops", lambda d, t, **_: real(d, t, sizes=(128,), min_seconds=0.01))
    hw = hardware.measure_cpu()
    assert hw.name == "cpu" and all(hw.peak(p) > 0 for p in ("bf16", "fp16", "fp32")) and hw.memory_gib > 0.5


def test_peak_on_a_gpu_is_the_datasheet_unless_configured(monkeypatch):
    fake_gpu(monkeypatch, "NVIDIA H100 80GB HBM3")
    cuda = torch.device("cuda", 0)
    peak = select_peak(configured=None, device=cuda, precision="bf16")
    assert (peak.tflops, peak.source) == (989.4, "NVIDIA H100 SXM 80GB datasheet")
    peak = select_peak(configured=500.0, device=cuda, precision="bf16")
    assert (peak.tflops, peak.source) == (500.0, "logging.peak_tflops")


def test_peak_on_cpu_is_the_cached_measurement_and_a_beaten_one_is_kept_higher(cpu_cache, monkeypatch):
    path, measured = cpu_cache
    peak = select_peak(configured=None, device=torch.device("cpu"), precision="fp32")
    assert peak.tflops == 0.25 and peak.source.startswith("measured on this CPU") and "cpu_profile.json" in peak.source
    assert peak.mfu(0.5) == 1.0  # measured while the machine was busy: a step beat it
    monkeypatch.setattr(hardware, "_CPU_MEMO", {})  # the next run reads the higher figure
    assert get_hardware("cpu").peak_tflops == {"bf16": 0.25, "fp16": 0.25, "fp32": 0.5} and len(measured) == 1
    peak.mfu(0.4)  # slower: the cache keeps its figure
    assert json.loads(path.read_text())[hardware.cpu_cache_key()]["peak_tflops"]["fp32"] == 0.5


def test_too_low_peak_is_raised_so_mfu_never_exceeds_one():
    said = []
    speed = Throughput(tokens_per_step=1000, flops_per_step=2e12, peak=Peak(0.5, "busy CPU", said.append), world_size=1)
    first = speed.of(1.0)  # 2 TFLOP/s achieved against a 0.5 peak: MFU would be 400%
    assert first["mfu"] <= 1.0 and first["peak_tflops"] == 2.0
    assert "raised to the rate a step achieved" in first["peak_source"] and "busy CPU" in first["peak_source"]
    assert speed.of(0.5)["mfu"] <= 1.0  # faster again: raised again, silently
    slower = speed.of(8.0)
    assert slower["mfu"] == pytest.approx(0.25 / 4.0) and "peak_source" not in slower
    assert len(said) == 1 and "raised from 0.5 to 2" in said[0]


def test_peak_source_is_recorded_once():
    speed = Throughput(tokens_per_step=10, flops_per_step=1e9, peak=Peak(1.0, "logging.peak_tflops"), world_size=1)
    first, second = speed.of(1.0), speed.of(1.0)
    assert first["peak_source"] == "logging.peak_tflops" and first["mfu"] == pytest.approx(1e-3)
    assert "peak_source" not in second and second["peak_tflops"] == 1.0
