"""The interface every update rule of ShardedAdamW implements."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from torch import Tensor

if TYPE_CHECKING:
    from ..buckets import Bucket
    from ..sharded_adamw import ShardedAdamW


class Rule:
    """How one update rule keeps its state and updates a bucket's owned shard.

    The optimizer owns everything around the update (reduction, agreement, clipping, loss scale, all-gather); a
    rule says what state a param has and how the owned shard of a bucket moves. Two kinds:

    * **element-wise** rules (``elementwise = True``: AdamW, LOMO): each element's update reads only that
      element's gradient and state, so any shard can be updated alone. The optimizer hands :meth:`kernel` the
      owned parts of the present params (master or param, gradient, step counts) with one keyword set; it also
      runs them inside backward with presence and finiteness known only on the device (``found_inf``).
    * rules that need whole-parameter statistics (``elementwise = False``: AdaLomo) implement
      :meth:`update_bucket` themselves, with the small collectives they need.

    State is ``optimizer.state[p]``: ``step`` (a 0-d float32 tensor), ``master`` when the bucket keeps one
    (:mod:`zeroadamw.state`), plus what :meth:`init_param_state` returns; with ``flat_moments`` the bucket's flat
    ``exp_avg`` / ``exp_avg_sq`` are allocated and ``state[p]`` holds views of them.
    """

    name = ""
    flat_moments = False
    elementwise = True
    plain_client = False  # can act as a plain per-parameter optimizer when another system partitions (DeepSpeed)
    hyper_keys: tuple[str, ...] = ()  # the rule's own hyperparameters: constructor keywords = param-group keys

    @staticmethod
    def check_hyper(kwargs: dict[str, Any]) -> dict[str, Any]:
        """Validate the rule's hyperparameters (``kwargs`` holds every ``hyper_keys`` value); returns the
        param-group defaults to add."""
        return {}

    def init_param_state(self, bucket: "Bucket", i: int) -> dict[str, Tensor]:
        """State of param ``i`` of ``bucket`` besides ``step`` and ``master`` (views of flat moments, or own)."""
        if not self.flat_moments:
            return {}
        return {"exp_avg": bucket.shard_view(bucket.exp_avg, i), "exp_avg_sq": bucket.shard_view(bucket.exp_avg_sq, i)}

    def layout_of(self, key: str) -> str:
        """How a state kind is laid out across ranks: ``"scalar"`` (replicated 0-d), ``"range"`` (the owned
        elements of a tensor shaped like the param) or ``"full"`` (a whole tensor every rank holds)."""
        return "scalar" if key == "step" else "range"

    def extra_state_bytes(self, state: dict[Tensor, dict[str, Tensor]]) -> int:
        """Bytes of state not held in the buckets' flat tensors (counted by :meth:`ShardedAdamW.state_bytes`)."""
        return 0

    def kernel(self, params: list[Tensor], grads: list[Tensor], steps: list[Tensor],
               moments: tuple[list[Tensor], list[Tensor]], idx: list[int], group: dict, common: dict[str, Any],
               impl: str) -> None:
        """Element-wise rules: update ``params`` (the fp32 working weights of the owned parts of params ``idx``)
        and, with ``flat_moments``, ``moments`` (``exp_avg`` and ``exp_avg_sq`` working tensors) in place; the
        optimizer writes them back into their storage (:mod:`zeroadamw.storage`). ``common``: ``lr``,
        ``weight_decay``, ``decay``, ``lr_max``, ``grad_scale``, ``found_inf``."""
        raise NotImplementedError

    def update_bucket(self, opt: "ShardedAdamW", bucket: "Bucket", present: list[bool],
                      grad_scale: Tensor | None) -> None:
        """Non-element-wise rules: the whole update of ``bucket``'s present params (called on every rank)."""
        raise NotImplementedError
