"""Datasheet peaks: the MFU denominator that compares across runs and frameworks."""

import pytest
import torch

from pretrain.hardware import datasheet_peak_tflops


@pytest.mark.parametrize(
    "name, dtype, peak",
    [
        ("NVIDIA H100 80GB HBM3", torch.bfloat16, 989.4),
        ("NVIDIA H100 PCIe", torch.bfloat16, 756.0),
        ("NVIDIA H200", torch.float32, 66.9),
        ("NVIDIA A100-SXM4-80GB", torch.float16, 312.0),
        ("NVIDIA B200", torch.bfloat16, 2250.0),
        ("NVIDIA GeForce RTX 4090", torch.bfloat16, None),  # not in the table: callers measure instead
    ],
)
def test_datasheet_peak_by_device_name(monkeypatch, name, dtype, peak):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert datasheet_peak_tflops(torch.device("cuda", 0), dtype) == peak


def test_no_datasheet_peak_on_cpu():
    assert datasheet_peak_tflops(torch.device("cpu"), torch.float32) is None
