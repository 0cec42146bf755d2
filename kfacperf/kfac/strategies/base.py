"""What the distributed strategies share: the process group, model checks, gradient helpers."""
from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from kfacperf.kfac.assignment import Assignment, LayerShape
from kfacperf.kfac.comm import CommOptions
from kfacperf.kfac.layers import NO_GRADIENT
from kfacperf.kfac.strategy import LocalStrategy
from kfacperf.profiler.timer import Timer

if TYPE_CHECKING:  # pragma: no cover
    from kfacperf.kfac.layers import KFACLayer


class ModelMismatchError(ValueError):
    """The ranks hold different models (layers, shapes or parameter values)."""


def model_fingerprint(model: nn.Module, layers: Mapping[str, KFACLayer]) -> tuple[str, str]:
    """``(structure digest, values digest)`` of a model.

    The structure covers every parameter's name, shape and dtype and every K-FAC layer's
    name and factor dimensions; the values cover the parameters' bytes.
    """
    structure = hashlib.blake2b(digest_size=16)
    values = hashlib.blake2b(digest_size=16)
    for name, layer in layers.items():
        factors = ",".join(f"{f.name}{f.shape}" for f in layer.factors())
        structure.update(f"L:{name}:{layer.kind}:{layer.dim_a}:{layer.dim_g}:{factors};".encode())
    for name, p in model.named_parameters():
        structure.update(f"P:{name}:{tuple(p.shape)}:{p.dtype};".encode())
        data = p.detach().to("cpu", copy=False).contiguous()
        values.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return structure.hexdigest(), values.hexdigest()


def check_same_model(
    model: nn.Module, layers: Mapping[str, KFACLayer], *, group: Any = None,
    settings: str = "",
) -> None:
    """Raise :class:`ModelMismatchError` on every rank unless all ranks hold the same model
    (and the same strategy ``settings``).

    One small ``all_gather_object``, so a mismatch is an error at construction rather than a
    hang (collectives of different sizes) or silently different training later.
    """
    world = dist.get_world_size(group)
    mine = (*model_fingerprint(model, layers), settings)
    everyone: list[Any] = [None] * world
    dist.all_gather_object(everyone, mine, group=group)
    differ = [r for r, fp in enumerate(everyone) if fp[2] != everyone[0][2]]
    if differ:
        raise ModelMismatchError(
            f"rank(s) {differ} use different strategy settings than rank 0 "
            f"({everyone[differ[0]][2]} vs {everyone[0][2]}); every rank must run the same "
            "strategy"
        )
    structure = [r for r, fp in enumerate(everyone) if fp[0] != everyone[0][0]]
    if structure:
        raise ModelMismatchError(
            f"rank(s) {structure} registered different K-FAC layers or parameter shapes than "
            "rank 0; every rank must build the same model"
        )
    values = [r for r, fp in enumerate(everyone) if fp[1] != everyone[0][1]]
    if values:
        raise ModelMismatchError(
            f"rank(s) {values} hold different parameter values than rank 0; build the model "
            "with the same seed on every rank (or wrap it in DistributedDataParallel first, "
            "which broadcasts rank 0's parameters)"
        )


def layer_shapes(layers: Mapping[str, KFACLayer]) -> list[LayerShape]:
    """The placement's view of the layers: Kronecker factors, or the blocks of another form."""
    out = []
    for n, l in layers.items():
        blocks = () if l.kronecker else tuple((f.n, f.count) for f in l.factors())
        out.append(LayerShape(name=n, dim_a=l.dim_a, dim_g=l.dim_g, blocks=blocks))
    return out


def other_parameters(model: nn.Module, layers: Mapping[str, KFACLayer]) -> list[nn.Parameter]:
    """Trainable parameters that no K-FAC layer covers (BatchNorm, LayerNorm, embeddings...)."""
    covered = {id(p) for l in layers.values() for p in l.module.parameters(recurse=False)}
    return [p for p in model.parameters() if p.requires_grad and id(p) not in covered]


def present_grads(params: list[nn.Parameter]) -> list[tuple[nn.Parameter, Tensor]]:
    """``(parameter, its gradient)`` for the parameters that got a gradient this step."""
    return [(p, p.grad) for p in params if p.grad is not None]


def grad_dtype(layers: Mapping[str, KFACLayer]) -> torch.dtype:
    """The dtype of the layers' gradient matrices (weight dtypes promoted together)."""
    dtypes = [l.weight.dtype for l in layers.values()]
    out = dtypes[0] if dtypes else torch.float32
    for d in dtypes[1:]:
        out = torch.promote_types(out, d)
    return out


def grad_matrix(layer: KFACLayer) -> Tensor:
    """``layer.grad``, or zeros of its shape when the layer got no gradient this step
    (so the collectives stay aligned; :meth:`DistributedStrategy.grad_flags` says which)."""
    if layer.grad is not None:
        return layer.grad
    w = layer.weight
    return torch.zeros(layer.dim_g, layer.dim_a, dtype=w.dtype, device=w.device)


class DistributedStrategy(LocalStrategy):
    """Common set-up of ``spngd`` and ``kaisa``.

    With no process group, or a world of one, every method behaves like
    :class:`LocalStrategy` (nothing to communicate).

    **Layers without a gradient.**  A layer whose module took no part in this step's forward
    has ``layer.grad`` None.  Its gradient travels as zeros (:func:`grad_matrix`), and the
    gradient buffer that is reduced anyway carries one more element per layer: 1 where this
    rank had the gradient (:meth:`grad_flags`), so a rank that receives the reduction knows
    whether ANY rank had it.  A receiver of a preconditioned gradient that has no flag of its
    own learns it from the KL slot (:data:`~kfacperf.kfac.layers.NO_GRADIENT`).  At the end
    of ``share_preconditioned`` (:meth:`drop_absent`) a layer that no rank had a gradient
    for is passed over as the local strategy passes it over: ``grad``, ``precond_grad`` and
    ``kl_term`` None, so its ``.grad`` stays None; one that some ranks had keeps the average
    over ranks (zeros from the others).  Gradients averaged before ``step()`` (DDP, which
    leaves a parameter no rank used without ``.grad``) need no flag: there a layer without
    a gradient has none on any rank.
    """

    def __init__(self, *, comm: CommOptions | None = None, check_model: bool = True) -> None:
        super().__init__()
        self.comm = comm or CommOptions()
        self.check_model = check_model
        self.rank = 0
        self.world_size = 1
        self.group: Any = None
        self.assignment: Assignment | None = None
        self.model: nn.Module | None = None
        self.other_params: list[nn.Parameter] = []
        self._absent: list[str] = []  # layers without a gradient on this rank, this step
        self._presence: dict[str, Tensor] = {}  # of those: True where some rank had one
        self.grad_dtype = torch.float32
        """The dtype in which gradients and preconditioned gradients travel: the K-FAC
        layers' weight dtype (the widest of them if they differ), the same on every rank, so
        the buffers a collective sends and receives agree (bf16 weights: bf16 buffers)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def setup(
        self, model: nn.Module, layers: Mapping[str, KFACLayer], *, timer: Timer
    ) -> None:
        super().setup(model, layers, timer=timer)
        self.model = model
        self.grad_dtype = grad_dtype(layers)
        self.other_params = other_parameters(model, layers)
        if dist.is_available() and dist.is_initialized():
            self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        if self.distributed:
            # A group of our own, so K-FAC collectives never interleave with DDP's.
            self.group = dist.new_group(list(range(self.world_size)))
            if self.check_model:
                check_same_model(model, layers, group=self.group, settings=self.settings())
        self.assignment = self.make_assignment(layer_shapes(layers), self.world_size)

    def make_assignment(self, shapes: list[LayerShape], world_size: int) -> Assignment:
        raise NotImplementedError

    def settings(self) -> str:
        """What must agree across ranks besides the model (compared at set-up)."""
        return f"{self.name} {self.comm}"

    # ------------------------------------------------------- layers without a gradient
    def note_absent(self, layers: list[KFACLayer]) -> None:
        """Start a step's bookkeeping: which of ``layers`` have no gradient on this rank."""
        self._absent = [l.name for l in layers if l.grad is None]
        self._presence = {}

    def grad_flags(self, layers: list[KFACLayer]) -> Tensor:
        """One element per layer of ``layers``, 1 where this rank has its gradient, 0 where
        not, to be reduced with the gradients (then > 0 where some rank had it); also
        :meth:`note_absent`.  A fill kernel, and one more per layer without a gradient."""
        self.note_absent(layers)
        w = layers[0].weight
        flags = torch.ones(len(layers), dtype=self.grad_dtype, device=w.device)
        for i, l in enumerate(layers):
            if l.grad is None:
                flags[i] = 0.0
        return flags

    def note_flags(self, layers: list[KFACLayer], reduced: Tensor) -> None:
        """``reduced``: :meth:`grad_flags` of ``layers`` after the reduction."""
        for i, l in enumerate(layers):
            if l.name in self._absent:
                self._presence[l.name] = reduced[i] > 0

    def absent_here(self, name: str) -> bool:
        """Had this rank no gradient of layer ``name`` this step?"""
        return name in self._absent

    def mark_no_gradient(self, layer: KFACLayer) -> None:
        """Before sending the preconditioned gradient of a layer this rank had no gradient
        of: its KL slot says :data:`NO_GRADIENT` when no rank had one (on the device)."""
        present = self._presence.get(layer.name)
        if present is not None and layer.kl_term is not None:
            layer.kl_term = layer.kl_term.masked_fill(~present, NO_GRADIENT)

    def note_received(self, layer: KFACLayer) -> None:
        """A preconditioned gradient was just received: for a layer this rank had no
        gradient of and no flag for, its KL slot says whether some rank had one."""
        if (layer.name in self._absent and layer.name not in self._presence
                and layer.kl_term is not None):
            self._presence[layer.name] = layer.kl_term != NO_GRADIENT

    def drop_absent(self) -> None:
        """Pass over the layers no rank had a gradient of (see the class docstring).

        Only on a step where this rank lacks some layer's gradient does the host read
        anything: one small copy of those layers' flags, after the collectives that made
        them have been waited on (DDP reads its map of used parameters the same way).  A
        layer without a flag has been averaged before ``step()`` (DDP): absent here is
        absent everywhere.
        """
        names, presence = self._absent, self._presence
        self._absent, self._presence = [], {}
        if not names:
            return
        known = [n for n in names if n in presence]
        values = torch.stack([presence[n] for n in known]).tolist() if known else []
        present = {n for n, v in zip(known, values) if v}
        for n in names:
            if n not in present:
                layer = self.layers[n]
                layer.grad = layer.precond_grad = layer.kl_term = None

    # Fixed after setup (see the Strategy protocol).
    def inverts(self, name: str) -> bool:
        assert self.assignment is not None, "strategy used before setup()"
        return self.assignment.inverse_worker[name] == self.rank

    def needs_factors(self, name: str) -> bool:
        return self.inverts(name)

    def preconditions(self, name: str) -> bool:
        assert self.assignment is not None, "strategy used before setup()"
        return self.rank in self.assignment.grad_workers[name]
