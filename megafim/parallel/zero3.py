"""DeepSpeed ZeRO-3's partitioned parameters, gathered for ``multi_token_loss``.

ZeRO-3 keeps each parameter partitioned (shape [0] on every rank) outside its module's forward, and its
module hooks gather it for that forward. ``multi_token_loss`` runs the heads, the shared norm and the
unembedding inside one autograd Function, outside those modules' forwards, so it asks for them to be
gathered through the small ``PartitionedParams`` interface of ``megafim.ops.multi_token_loss``;
``Zero3Params`` is that interface for DeepSpeed, and ``apply_zero3`` hands it to a GPT.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn


class Zero3Params:
    """The ZeRO-3 partitioned parameters among ``tensors`` (those DeepSpeed gave a ``ds_id``), and their
    gathering. Under ZeRO 0-2 nothing is partitioned and ``params`` is empty."""

    def __init__(self, tensors: Sequence[Tensor]):
        self.params = [t for t in tensors if hasattr(t, "ds_id")]
        self._gathered: list[Tensor] = []

    def gather(self) -> None:
        """Gather the parameters that are partitioned now (others are held by ZeRO-3's module hooks)."""
        if not self.params:
            return
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

        self._gathered = [p for p in self.params if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if self._gathered:
            self._gathered[0].all_gather(param_list=self._gathered)

    def release(self) -> None:
        """Partition what ``gather`` gathered, except parameters a module hook has claimed since."""
        free = [p for p in self._gathered if not p.ds_active_sub_modules]
        self._gathered = []
        if free:
            free[0].partition(param_list=free)


def apply_zero3(model: nn.Module) -> None:
    """Make ``model`` (a GPT) gather its ZeRO-3 partitioned loss parameters in ``loss_from_trunk``."""
    model.partitioned_params = Zero3Params
