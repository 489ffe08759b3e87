"""Which ranks a collective goes over: one flat group, or a 2-D ``DeviceMesh`` of ``("replicate", "shard")``.

**Hierarchical sharding** (Megatron's distributed-optimizer instances, FSDP2's HSDP). On ``R`` nodes of ``S``
GPUs, ``init_device_mesh(device, (R, S), mesh_dim_names=("replicate", "shard"))`` puts each node's GPUs on a
``"shard"`` row and the GPUs with the same local rank on a ``"replicate"`` column. The optimizer state and (stage
2) the reduced gradients are split ``S`` ways, inside a node, and held identically by the ``R`` rows. A step is

1. reduce-scatter each gradient bucket over ``"shard"`` (intra-node links): rank ``s`` of a row gets the sum of
   its row's gradients for its ``1/S`` shard;
2. all-reduce that shard over ``"replicate"`` (inter-node links): now it is the sum over all ``R x S`` ranks,
   then averaged (divided by ``R x S``);
3. the update of the owned shard -- the same on every row, so the rows stay identical;
4. all-gather the updated params over ``"shard"`` (intra-node again).

Only ``1/S`` of the gradient bytes cross the slow links (twice, for the all-reduce), instead of all of them
in a flat ring of ``R x S`` ranks. Steps 1-2 run per bucket as backward produces it (overlapped as the flat
reduce-scatter is): on CUDA the all-reduce is queued on a side stream right behind the reduce-scatter, with no
host wait; on CPU tensors (gloo) it runs when the bucket is waited for.

:class:`MeshComm` is a :class:`~zeroadamw.comm.Comm` over the ``"shard"`` group (its ``world_size`` and
``rank`` -- what the layout is cut by -- are the shard dimension's) whose :meth:`MeshComm.reduce_scatter` also
does step 2. Its :attr:`~zeroadamw.comm.Comm.world` is a Comm over all ``R x S`` ranks: the control plane
(errors, presence flags, bucket order, the packed step statistics) agrees over every rank, since the rows must
take the same decisions. Sums of the owned shards (the gradient norm) count one row only
(:attr:`~zeroadamw.comm.Comm.counts_norm`). Counters are kept per dimension:
``opt.comm_counters(by_dim=True)``.

A 1-D mesh is its group (flat sharding, as ``process_group=`` is). :func:`mesh_from_env` builds the 2-D mesh
from torchrun's environment: ``LOCAL_WORLD_SIZE`` ranks per node shard, the nodes replicate.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from .comm import Comm, Handle, dist_available

__all__ = ["MeshComm", "make_comm", "mesh_from_env", "MESH_DIMS"]

MESH_DIMS = ("replicate", "shard")


def _is_mesh(obj) -> bool:
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover - torch without distributed
        return False
    return isinstance(obj, DeviceMesh)


def make_comm(process_group=None, device_mesh=None) -> Comm:
    """The :class:`~zeroadamw.comm.Comm` an optimizer shards over: ``process_group`` (a flat group, ``None`` =
    the default group) or ``device_mesh`` (1-D: its group; 2-D ``("replicate", "shard")``: a :class:`MeshComm`).
    A DeviceMesh passed as ``process_group`` is taken as ``device_mesh``."""
    if device_mesh is None and _is_mesh(process_group):
        process_group, device_mesh = None, process_group
    if device_mesh is None:
        return Comm(process_group)
    if process_group is not None:
        raise ValueError("pass either process_group= or device_mesh=, not both (a mesh already names its groups)")
    if not _is_mesh(device_mesh):
        raise TypeError(f"device_mesh must be a torch.distributed.device_mesh.DeviceMesh, got "
                        f"{type(device_mesh).__name__}")
    if not dist_available():
        raise ValueError("device_mesh was given but torch.distributed is not initialised")
    if device_mesh.ndim == 1:
        return Comm(device_mesh.get_group())
    names = tuple(device_mesh.mesh_dim_names or ())
    if device_mesh.ndim != 2 or set(names) != set(MESH_DIMS):
        raise ValueError(
            f"device_mesh must be 1-D, or 2-D with mesh_dim_names=('replicate', 'shard'); got {device_mesh.ndim}-D "
            f"with names {names or None}. Build it with init_device_mesh(device, (nodes, gpus_per_node), "
            "mesh_dim_names=('replicate', 'shard')) or zeroadamw.mesh_from_env(); for a larger mesh pass its "
            "data-parallel sub-mesh, e.g. mesh['replicate', 'shard']")
    return MeshComm(device_mesh)


def mesh_from_env(device_type: str | None = None, *, shard_size: int | None = None):
    """A ``("replicate", "shard")`` DeviceMesh from torchrun's environment: ``shard_size`` ranks per row
    (default ``LOCAL_WORLD_SIZE``, the ranks of one node) and ``WORLD_SIZE / shard_size`` rows. Initialises
    ``torch.distributed`` if needed (``device_type`` ``"cuda"`` when CUDA is available, else ``"cpu"``)."""
    from torch.distributed.device_mesh import init_device_mesh

    world = int(os.environ.get("WORLD_SIZE", dist.get_world_size() if dist_available() else 1))
    if shard_size is None:
        if "LOCAL_WORLD_SIZE" not in os.environ:
            raise ValueError("mesh_from_env needs LOCAL_WORLD_SIZE (set by torchrun) or shard_size=")
        shard_size = int(os.environ["LOCAL_WORLD_SIZE"])
    if shard_size < 1 or world % shard_size:
        raise ValueError(f"shard_size {shard_size} must divide the world size {world} (nodes x ranks per node)")
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device_type, (world // shard_size, shard_size), mesh_dim_names=MESH_DIMS)


class MeshComm(Comm):
    """A :class:`~zeroadamw.comm.Comm` over a mesh's ``"shard"`` dimension whose reduce-scatter also all-reduces
    the shard over ``"replicate"`` (see the module docstring)."""

    def __init__(self, mesh) -> None:
        super().__init__(mesh.get_group("shard"))
        self.mesh = mesh
        self.replicate = Comm(mesh.get_group("replicate"))
        if mesh.size() == dist.get_world_size():
            self.world = Comm(None)
        else:  # a sub-mesh of a larger one: its own flattened group
            self.world = Comm(mesh._flatten().get_group())
        self.dp_size = self.world_size * self.replicate.world_size
        self.counts_norm = self.replicate.rank == 0  # one row's shards make the whole
        self._side: dict = {}

    def _side_stream(self, device: torch.device):
        s = self._side.get(device)
        if s is None:
            s = self._side[device] = torch.cuda.Stream(device=device)
        return s

    def reduce_scatter(self, out, inp, async_op: bool = True, scratch=None) -> Handle:
        """Reduce-scatter over ``"shard"``, then all-reduce ``out`` over ``"replicate"``: ``out`` holds the sum
        over every rank of the mesh once the handle is waited on."""
        h = super().reduce_scatter(out, inp, async_op=True, scratch=scratch)
        rep = self.replicate
        if rep.world_size == 1:
            chained = h
        elif out.is_cuda:  # queue the all-reduce behind the reduce-scatter on a side stream: no host wait
            stream = self._side_stream(out.device)
            stream.wait_stream(torch.cuda.current_stream(out.device))
            with torch.cuda.stream(stream):
                h.wait()  # NCCL: the side stream waits for the reduce-scatter's stream
                chained = rep.all_reduce(out, async_op=True)
        else:
            chained = Handle(h, lambda: rep.all_reduce(out, async_op=False))
        if not async_op:
            chained.wait()
        return chained

    def counters(self, by_dim: bool = False) -> dict:
        """``by_dim``: ``{"shard": ..., "replicate": ..., "world": ...}`` (each ``op -> {calls, bytes}``); else
        one dict: the shard dimension's ops as they are, ``replicate/<op>`` and ``world/<op>`` for the others."""
        dims = {"shard": super().counters(), "replicate": self.replicate.counters(), "world": self.world.counters()}
        if by_dim:
            return dims
        flat = dict(dims["shard"])
        for dim in ("replicate", "world"):
            flat.update({f"{dim}/{op}": v for op, v in dims[dim].items()})
        return flat

    def reset_counters(self) -> None:
        super().reset_counters()
        self.replicate.reset_counters()
        self.world.reset_counters()

    def __repr__(self) -> str:
        return (f"MeshComm(replicate={self.replicate.world_size}, shard={self.world_size}, "
                f"rank=({self.replicate.rank}, {self.rank}))")
