from kfacperf.report.sections import device_text


def test_device_text_from_run_json():
    gpu = {"kind": "gpu", "name": "NVIDIA H200",
           "gpu": {"memory_total_mib": 143771.0, "max_sm_clock_mhz": 1980,
                   "power_limit_w": 700.0, "driver": "570.1"},
           "cpu": {"threads": 16}}
    assert device_text(gpu) == "gpu · NVIDIA H200 · 140 GiB · SM 1980 MHz · 700 W · driver 570.1"
    cpu = {"kind": "cpu", "name": "AMD EPYC", "gpu": None, "cpu": {"threads": 2}}
    assert device_text(cpu) == "cpu · AMD EPYC · 2 CPU threads"
    assert device_text("h200") == "h200"
