"""A torch workload -> the simulator's workload model (its K-FAC layers, shapes and FLOPs).

:func:`build_workload_model` describes the K-FAC layers (:mod:`kfacperf.workloads.describe`),
counts the forward FLOPs outside them with torch's FLOP counter, and records each Conv2d's
geometry, as ``kfacperf calibrate --workload`` writes it to ``models/workloads/``.
"""
from __future__ import annotations

from typing import Any


def _extra_flop_formulas() -> dict[Any, Any]:
    """FLOP formulas torch's counter lacks: the CPU flash-attention kernel (QK^T and AV)."""
    import torch
    from torch.utils import flop_counter

    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    count = getattr(flop_counter, "sdpa_flop_count", None)
    if op is None or count is None:
        return {}

    def sdpa(q: Any, k: Any, v: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(count(q, k, v))

    return {op: sdpa}


def _measure_forward(model: Any, example: Any) -> tuple[float, dict[str, dict[str, Any]]]:
    """One forward pass: total FLOPs (torch's counter) and, per Conv2d (by module path),
    channels, kernel, stride, dilation, padded input and output size."""
    import torch
    from torch import nn
    from torch.utils.flop_counter import FlopCounterMode

    from kfacperf.kfac.conv_factors import padded_input

    found: dict[str, dict[str, Any]] = {}
    handles = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d) and mod.groups == 1:
            def hook(m: Any, inputs: Any, output: Any, path: str = path) -> None:
                hp, wp = padded_input(inputs[0], m).shape[-2:]
                found[path] = {
                    "in_channels": m.in_channels, "kernel": tuple(m.kernel_size),
                    "stride": tuple(m.stride), "dilation": tuple(m.dilation),
                    "padded": (int(hp), int(wp)), "output": tuple(output.shape[-2:]),
                }
            handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad(), FlopCounterMode(display=False,
                                              custom_mapping=_extra_flop_formulas()) as counter:
            model(example)
    finally:
        for h in handles:
            h.remove()
    return float(counter.get_total_flops()), found


def build_workload_model(name: str, options: dict[str, Any]) -> Any:
    """Describe torch workload ``name`` and count its non-K-FAC forward FLOPs (imports torch)."""
    import torch

    from kfacperf.sim.models.workload_file import workload_model_from_description
    from kfacperf.workloads import get_workload, workload_options
    from kfacperf.workloads.describe import describe_workload

    desc = describe_workload(name, **options)
    workload = get_workload(name, **options)
    model = workload.build_model(seed=0).eval()
    example, _ = workload.make_batch(1)
    total_flops, geometry = _measure_forward(model, example)
    desc = {**desc, "layers": [dict(l, conv=geometry.get(l["name"])) for l in desc["layers"]]}
    kfac = sum(float(l["fwd_flops_per_example"]) for l in desc["layers"])
    other = max(0.0, total_flops - kfac)
    defaults = workload_options(name)

    def norm(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    changed = {k: norm(v) for k, v in options.items() if norm(defaults.get(k)) != norm(v)}
    model_name = name + ("[" + ",".join(f"{k}={v}" for k, v in sorted(changed.items())) + "]"
                         if changed else "")
    opts = " ".join(f"--workload-option {k}={v}" for k, v in sorted(changed.items()))
    src = (f"kfacperf calibrate --workload {name} {opts}".rstrip()
           + f" (torch {torch.__version__}); FLOPs outside K-FAC layers counted by "
           "torch.utils.flop_counter")
    return workload_model_from_description(
        {**desc, "description": desc.get("description") or workload.description},
        name=model_name, source=src, other_fwd_flops_per_example=other,
        input_dtype=str(workload.input_dtype), custom_options=tuple(sorted(changed)),
    )
