"""The MFU yardstick (training/peak.py): datasheet peaks by device name; the measured peak on CPU is
a plain matmul rate; on a GPU the event-timed 8192^3 matmul lies under the datasheet peak."""
import pytest
import torch

from megatron_diffu.training import logging as tlog
from megatron_diffu.training.peak import datasheet_peak_flops, measure_peak_flops, mfu_peak_flops


def test_datasheet_peaks_by_device_name():
    assert datasheet_peak_flops("NVIDIA H200", torch.bfloat16) == pytest.approx(989.4e12)
    assert datasheet_peak_flops("NVIDIA H200", "fp8") == pytest.approx(1978.9e12)
    assert datasheet_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == pytest.approx(989.4e12)
    assert datasheet_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == pytest.approx(756.5e12)
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB", torch.float32) == pytest.approx(156e12)
    assert datasheet_peak_flops("NVIDIA A100-SXM4-80GB", "fp8") is None  # no FP8 on Ampere
    assert datasheet_peak_flops("Some CPU", torch.bfloat16) is None


def test_cpu_measurement_and_old_import_path(one_thread):
    assert tlog.measure_peak_flops is measure_peak_flops  # trainer's import keeps working
    assert 1e8 < measure_peak_flops(torch.device("cpu"), size=256, repeats=2) < 1e13
    assert mfu_peak_flops(torch.device("cpu"), torch.float32) > 0


@pytest.mark.gpu
def test_cuda_measured_peak_is_under_the_datasheet():
    dev = torch.device("cuda")
    sheet = datasheet_peak_flops(torch.cuda.get_device_name(dev), torch.bfloat16)
    measured = measure_peak_flops(dev, torch.bfloat16)
    if sheet is not None:
        assert 0.3 * sheet < measured < 1.05 * sheet, (measured, sheet)
