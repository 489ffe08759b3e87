"""What the ranks agree on at ``step()``: one packed all-reduce and one host read.

Before a step can be taken, every rank must know the same things: the squared gradient norm of each param group
(summed over every rank's owned shard), whether any rank found an error (then every rank raises the first
rank's message, nothing changed), whether GradScaler's ``found_inf`` was set, which params got a gradient on
some rank (presence: a param no rank saw is not stepped), which buckets some rank had to flush unfilled (they
move to the end of the launch order), and how many buckets the fused step in backward already skipped as
non-finite. All of it goes into one float64 vector on the control device (:mod:`zeroadamw.control`), reduced
once over the optimizer's group (plus once per expert group for the presence of its buckets), then read on the
host once: the only host read of a step.

:class:`AgreementMixin` holds these methods of :class:`~zeroadamw.ShardedAdamW`.
"""

from __future__ import annotations

import zlib
from typing import Any

import torch
from torch import Tensor

from .functional import sum_of_squares

__all__ = ["AgreementMixin"]


class AgreementMixin:
    def _check_same_layout(self, signature: list) -> None:
        """Every rank must build the same buckets, or collectives would pair up different data."""
        if self.control.comm.world_size == 1:
            return
        if not self.control.check_same(zlib.crc32(repr(signature).encode())):
            raise ValueError(
                "ranks built different parameter layouts: every rank must pass the same parameters (same shapes, "
                "dtypes, requires_grad and group order) to the optimizer"
            )

    def _local_checks(self) -> list[tuple[type, str]]:
        """Problems this rank can see before any collective; reported with the others' in the control all-reduce."""
        errors = []
        for gi, group in enumerate(self.param_groups):
            for p in group["params"]:
                if p in self.engine.where:
                    if not p.is_contiguous():
                        errors.append((ValueError, f"a parameter of param group {gi} became non-contiguous after the "
                                       "optimizer was built (e.g. channels_last); ShardedAdamW needs contiguous params"))
                elif p.requires_grad and p.numel() > 0 and p.grad is not None:
                    errors.append((ValueError, (
                        f"a parameter of param group {gi} was frozen when the optimizer was built and now has a "
                        "gradient; ShardedAdamW lays out its buffers at construction -- build the optimizer after "
                        "choosing what to train (or put newly unfrozen params in opt.add_param_group)")))
        return errors

    def _agree_step(self, errors: list, scale: Tensor | None) -> dict[str, Any]:
        """Everything the ranks must agree on at ``step()``, in one all-reduce over the world group (plus one per
        expert group for the presence of its buckets' params) and one host read:

        ``[Σ shard grad² per group, error flag, found_inf (GradScaler's attribute protocol), presence per param
        of world buckets, flushed flag per launch-order bucket, non-finite buckets applied in backward]``, then,
        unreduced, the presence agreed within each expert group and the loss scale."""
        ctl, engine = self.control, self.engine
        dev = ctl.device
        group_sq = self._local_group_sq()
        if self._applied_sq is not None:
            applied = self._applied_sq.to(dev)
            if len(applied) < len(group_sq):  # a param group was added since the accumulator was made
                applied = torch.cat([applied, applied.new_zeros(len(group_sq) - len(applied))])
            group_sq = group_sq + applied
        world_flags, other = [], {}
        for bucket in engine.buckets:
            if bucket.comm is self.comm:
                world_flags.extend(bucket.present)
            else:
                other.setdefault(id(bucket.comm), (bucket.comm, []))[1].extend(bucket.present)
        flushed = engine.flushed_flags()
        found = getattr(self, "found_inf", None)
        parts = [group_sq,
                 ctl.host_vector([float(bool(errors))], torch.float64),
                 (found.to(dev, torch.float64).reshape(1) if isinstance(found, Tensor)
                  else ctl.host_vector([float(bool(found))], torch.float64)),
                 ctl.host_vector(world_flags, torch.float64),
                 ctl.host_vector(flushed, torch.float64),
                 (self._applied_bad.to(dev, torch.float64).reshape(1) if self._applied_bad is not None
                  else ctl.host_vector([0.0], torch.float64))]
        stats = torch.cat(parts)
        after = []
        for comm, flags in other.values():  # expert groups: agree within the group (its ranks hold the same tensors)
            after.append(ctl.all_reduce_packed(ctl.host_vector(flags, torch.float64, ctl.device_for(comm.world))
                                               .clone(), comm=comm.world).to(dev))
        ctl.all_reduce_packed(stats)
        if scale is not None:
            after.append(scale.to(dev, torch.float64).reshape(1))
        host = torch.cat([stats, *after]).tolist() if after else stats.tolist()  # THE host read of the step
        G = len(group_sq)
        k = G + 2
        world_present = [x > 0 for x in host[k : k + len(world_flags)]]
        k += len(world_flags)
        flushed_any = [x > 0 for x in host[k : k + len(flushed)]]
        k += len(flushed)
        applied_bad = host[k]
        k += 1
        agreed_other = {}
        for cid, (comm, flags) in other.items():
            agreed_other[cid] = [x > 0 for x in host[k : k + len(flags)]]
            k += len(flags)
        present, wi, oi = [], 0, {cid: 0 for cid in other}
        for bucket in engine.buckets:  # back to update order
            n = len(bucket.params)
            if bucket.comm is self.comm:
                present.extend(world_present[wi : wi + n])
                wi += n
            else:
                cid = id(bucket.comm)
                present.extend(agreed_other[cid][oi[cid] : oi[cid] + n])
                oi[cid] += n
        return {"group_sq": host[:G], "error": host[G] > 0, "found_inf": host[G + 1] > 0, "present": present,
                "flushed": flushed_any, "applied_bad": applied_bad, "scale": host[k] if scale is not None else None}

    def _local_group_sq(self) -> Tensor:
        """This rank's share of the squared gradient norm of each param group: a ``[G]`` float64 device tensor."""
        engine = self.engine
        dev = self.control.device
        per_group: list[list[Tensor]] = [[] for _ in self.param_groups]
        for bucket in engine.buckets:
            if not bucket.comm.counts_norm:  # a mesh's other rows hold the same shards: one row counts
                continue
            if engine.sharded(bucket):
                per_group[bucket.group_index].extend(bucket.reduced_grads())
            else:
                idx = [i for i, s in enumerate(bucket.layout.slots) if bucket.present[i] and s.owned]
                per_group[bucket.group_index].extend(engine.grad_views(bucket, idx))
        if not per_group:
            return torch.zeros(0, dtype=torch.float64, device=dev)
        return torch.stack([sum_of_squares(t, dev) for t in per_group])

    def _raise_agreed(self, errors: list[tuple[type, str]]) -> None:
        """Some rank found a problem: every rank raises (nothing was changed), with the first rank's message."""
        self.engine.clear()
        self._reset_applied()
        self.control.agree_errors(errors)

    def _reset_applied(self) -> None:
        if self._applied_sq is not None:
            self._applied_sq.zero_()
            self._applied_bad.zero_()
