"""Memory per GPU of one training configuration, in closed form from the workload model.

:func:`memory_per_gpu` is the one definition; its docstring derives each term.  Its per-layer
K-FAC state (``factors``, ``inverses``) is :func:`kfacperf.sim.graphs.memory.kfac_state_per_gpu`,
the figure ``kfacperf simulate`` reports too.  A plan drops
every configuration whose total exceeds what the device holds (times a usable fraction that
leaves room for the CUDA context, the allocator's fragmentation and kernels' workspaces,
which are not modelled).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from kfacperf import vocab as S
from kfacperf.sim.costs import blocks
from kfacperf.sim.graphs.memory import FisherBlock, kfac_state_per_gpu
from kfacperf.sim.graphs.placement import (
    Placement,
    blocks_cost,
    contiguous_placement,
    kaisa_placement,
    spngd_placement,
)
from kfacperf.sim.graphs.strategies.common import CommSettings
from kfacperf.sim.models.device import DeviceModel
from kfacperf.sim.models.workload import WorkloadModel

FP32 = 4
GB = 10**9


@dataclass(frozen=True, kw_only=True)
class MemoryBreakdown:
    """Bytes per GPU, by what holds them (for the per-layer K-FAC state, ``factors`` and
    ``inverses``, the GPU that holds the most of it: both terms are that one GPU's)."""

    weights: int
    gradients: int
    optimizer_state: int
    activations: int
    factors: int
    """K-FAC batch statistics of every layer plus the running averages this GPU keeps (the
    ``factors MiB`` column of ``kfacperf simulate``)."""
    inverses: int
    """K-FAC inverse state (eigenbases and eigenvalues, or inverses) this GPU holds (the
    ``inverses MiB`` column of ``kfacperf simulate``)."""
    gradient_copies: int
    comm_buffers: int

    @property
    def total(self) -> int:
        return sum(asdict(self).values())

    def as_dict(self) -> dict[str, int]:
        return {**asdict(self), "total": self.total}


def fisher_blocks(workload: WorkloadModel, bn_blocks: str = S.BN_NONE) -> list[FisherBlock]:
    """``(form, dim_a, dim_g)`` of each layer K-FAC keeps state for under ``bn_blocks``, in
    forward order (:meth:`WorkloadModel.fisher_layers`, as the simulator's layer costs)."""
    return [(blocks.block_form(l.kind, bn_blocks), l.dim_a, l.dim_g)
            for l in workload.fisher_layers(bn_blocks)]


def placement_for(workload: WorkloadModel, strategy: str, world_size: int,
                  grad_workers: int = 1, *, bn_blocks: str = S.BN_NONE,
                  placement: str = S.BALANCED) -> Placement | None:
    """Which rank keeps which layer's K-FAC state (the simulator's and the optimizer's rule;
    ``placement`` is SP-NGD's, :data:`kfacperf.vocab.PLACEMENTS`)."""
    if strategy == S.SGD:
        return None
    S.check_choice("placement", placement, S.PLACEMENTS)
    layers = workload.fisher_layers(bn_blocks)
    costs = [blocks_cost(blocks.stacks(*b)) for b in fisher_blocks(workload, bn_blocks)]
    if strategy == S.SPNGD:
        if placement == S.CONTIGUOUS:
            return contiguous_placement([l.name for l in layers], world_size)
        return spngd_placement(costs, world_size)
    if strategy == S.KAISA:
        return kaisa_placement(costs, world_size, grad_workers)
    raise ValueError(f"unknown strategy {strategy!r}")


def memory_per_gpu(
    workload: WorkloadModel, *, strategy: str, world_size: int, batch_per_gpu: int,
    grad_workers: int = 1, comm: CommSettings | None = None, dtype: str = "fp32",
    placement: Placement | None = None, bn_blocks: str = S.BN_NONE,
) -> MemoryBreakdown:
    """Bytes one GPU holds at the peak of a step (on a K-FAC step that refreshes everything).

    Notation: N parameters in all, N_k of them in the K-FAC layers (``Σ dim_a·dim_g``: the
    weight and bias of each); per layer l, ``a_l = dim_a``, ``g_l = dim_g``, and per example
    ``in_l``/``out_l`` the elements of its input and output; b examples per GPU; ``s`` bytes
    per element of the forward/backward precision ``dtype`` (4, or 2 for bf16/fp16); ``c``
    bytes per element of factor communication; ``e(n) = n²``, or ``n(n+1)/2`` with symmetric
    packing.  Every K-FAC matrix is held in fp32 and full, as the optimizer keeps it.  With
    ``bn_blocks`` (``unit``/``full``) the BatchNorm layers are K-FAC layers too, each with its
    own block of statistics (:mod:`kfacperf.sim.costs.blocks`) in place of ``a_l² + g_l²``.

    * ``weights = 4(N + N_f)``, plus ``2(N + N_f)`` in 16-bit precision: the fp32 parameters
      (``N_f`` of them frozen: ``requires_grad=False``, so in no other term), and autocast's
      16-bit copies of them, which it caches for the whole forward and backward pass.
    * ``gradients = 4N``: the fp32 ``.grad`` of every parameter.
    * ``optimizer_state = 4N``: the momentum buffer of the SGD update, which K-FAC applies to
      its preconditioned gradients as well.
    * ``activations = b · s · Σ_l (in_l + out_l)``: what autograd keeps for the backward pass.
      Each layer keeps its input (for its weight gradient), and what follows it keeps a tensor
      of its output's size (BatchNorm its input, ReLU its output, which is the next layer's
      input and so counted once).  Outputs of the last layer and work outside K-FAC layers
      (pooling, residual additions) are not counted.
    * ``factors`` (K-FAC) ``= 4 Σ_l (a_l² + g_l²) + 4 Σ_{l inverted on r} (a_l² + g_l²)``:
      every rank forms the batch statistics A and G of every layer from its own examples on a
      factor step (released by the step's update: counted here beside every activation,
      although the last layers' statistics form while the first layers' activations are
      being freed, an upper bound), and the rank that inverts a layer keeps its running
      averages (SP-NGD: the layer's owner; KAISA: its inverse worker).
    * ``inverses`` (K-FAC) ``= 4 Σ_{l preconditioned on r} i_l`` with
      ``i_l = a_l² + g_l² + a_l + g_l`` (eigen: eigenvectors and eigenvalues) or
      ``a_l² + g_l²`` (cholesky: the two inverses): held where the layer is preconditioned
      (SP-NGD: its owner; KAISA: every rank of its grad-worker column).
    * ``r`` in both is the GPU holding the most K-FAC state (the largest sum of the two):
      :func:`kfacperf.sim.graphs.memory.kfac_state_per_gpu`, which the simulator's summary
      (``factors MiB``, ``inverses MiB``) reports as well.
    * ``gradient_copies`` (K-FAC) ``= 8 N_k``: each layer's ``[dW | db]`` matrix formed after
      backward, and the preconditioned matrix every rank ends the step with (SP-NGD gathers
      them all; KAISA broadcasts them along the rows).
    * ``comm_buffers``: the gradients in flight — DDP's flat buckets hold a copy of every
      gradient (``4N``: sgd, kaisa); SP-NGD sends the gradient matrices above and all-reduces
      only the other parameters' gradients in buckets (``4(N − N_k)``) — plus, for K-FAC, every
      layer's encoded statistics in flight until the factor communication ends
      (``c · Σ_l (e(a_l) + e(g_l))``).  Nothing is communicated on one GPU.  The bucket size
      changes how the gradients are cut, not how many bytes are held.

    ``placement`` (optional) saves recomputing :func:`placement_for` (with ``bn_blocks`` and
    ``comm.placement``).
    """
    comm = comm or CommSettings()
    s = _element_bytes(strategy, batch_per_gpu, dtype)
    n_all = workload.total_params
    distributed = world_size > 1
    common = dict(weights=_weight_bytes(n_all + workload.frozen_params, s),
                  gradients=FP32 * n_all,
                  optimizer_state=FP32 * n_all,
                  activations=_activation_bytes(workload, batch_per_gpu, s))
    if strategy == S.SGD:
        return MemoryBreakdown(**common, factors=0, inverses=0, gradient_copies=0,
                               comm_buffers=FP32 * n_all if distributed else 0)
    fb = fisher_blocks(workload, bn_blocks)
    if placement is None:
        placement = placement_for(workload, strategy, world_size, grad_workers,
                                  bn_blocks=bn_blocks, placement=comm.placement)
    assert placement is not None
    state = kfac_state_per_gpu(fb, placement, comm.inverse_method)
    comm_buffers = _kfac_comm_buffer_bytes(fb, n_all, strategy, comm)
    return MemoryBreakdown(
        **common, factors=state.factors, inverses=state.inverses,
        gradient_copies=2 * FP32 * _kfac_layer_params(fb),
        comm_buffers=comm_buffers if distributed else 0,
    )


def overflow_note(workload: WorkloadModel, device: DeviceModel, *, batch_per_gpu: int,
                  dtype: str) -> str | None:
    """A note when even SGD on one GPU (weights, gradients, momentum, activations: the least
    any strategy holds) needs more than ``device``'s memory at ``batch_per_gpu``: times
    predicted there are what-ifs no run can measure.  None when it fits, or when the device
    gives no capacity."""
    if not device.memory_GB > 0:
        return None
    need = memory_per_gpu(workload, strategy=S.SGD, world_size=1, batch_per_gpu=batch_per_gpu,
                          dtype=dtype).total
    if need <= device.memory_GB * GB:
        return None
    return (f"note: at batch {batch_per_gpu:,} per GPU even SGD needs {need / GB:,.1f} GB "
            f"per GPU (weights, gradients, momentum, activations), over {device.name}'s "
            f"{device.memory_GB:,.1f} GB: nothing here fits in its memory, so these times are "
            "what-ifs (kfacperf plan checks memory)")


def _element_bytes(strategy: str, batch_per_gpu: int, dtype: str) -> int:
    """Bytes per element of ``dtype``, once the arguments are checked."""
    if strategy not in S.SIM_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; known: {', '.join(S.SIM_STRATEGIES)}")
    if isinstance(batch_per_gpu, bool) or not isinstance(batch_per_gpu, int) or batch_per_gpu < 1:
        raise ValueError(f"batch per GPU must be a positive integer, got {batch_per_gpu!r}")
    try:
        return S.DTYPE_BYTES[dtype]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; known: {', '.join(S.DTYPE_BYTES)}") from None


def _kfac_layer_params(fb: list[FisherBlock]) -> int:
    """``N_k``: the elements of every K-FAC layer's ``[dW | db]`` matrix (a BatchNorm
    block's ``C x 2`` ``[dγ | dβ]``)."""
    return sum(dim_a * dim_g for _, dim_a, dim_g in fb)


def _weight_bytes(n_all: int, element_bytes: int) -> int:
    """The fp32 parameters, plus autocast's cached 16-bit copies in 16-bit precision."""
    return FP32 * n_all + (2 * n_all if element_bytes == 2 else 0)


def _activation_bytes(workload: WorkloadModel, batch_per_gpu: int, element_bytes: int) -> int:
    return batch_per_gpu * element_bytes * sum(
        l.in_elems_per_example + l.out_elems_per_example for l in workload.layers)


def _kfac_comm_buffer_bytes(fb: list[FisherBlock], n_all: int, strategy: str,
                            comm: CommSettings) -> int:
    """Gradients in flight (SP-NGD buckets only those outside the K-FAC layers) plus every
    layer's encoded statistics in flight."""
    c = S.COMM_DTYPE_BYTES[comm.factor_dtype]
    in_flight = c * sum(blocks.statistic_elements(form, dim_a, dim_g, comm.symmetric)
                        for form, dim_a, dim_g in fb)
    grads_in_flight = (FP32 * (n_all - _kfac_layer_params(fb)) if strategy == S.SPNGD
                       else FP32 * n_all)
    return grads_in_flight + in_flight
