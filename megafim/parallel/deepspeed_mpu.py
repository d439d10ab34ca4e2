"""The ``mpu`` object DeepSpeed's ``initialize(mpu=...)`` expects, over a ParallelDims.

Method names are the ones DeepSpeed 0.19.8 calls (engine, ZeRO, gradient clipping, checkpoints,
``utils/bwc.py``). "Model parallel" follows Megatron's legacy meaning: the rank is the
tensor-parallel rank, the group the tp * pp ranks of one replica, so the gradient norm is reduced
over every rank that holds part of the model while replicated parameters count once per stage.
The sequence-parallel methods are deliberately absent: DeepSpeed's "sequence parallel" is Ulysses
(a different scheme) and it falls back to none when they are missing.
"""

from __future__ import annotations

import torch.distributed as dist

from megafim.parallel.dims import ParallelDims


class DeepSpeedMPU:
    def __init__(self, dims: ParallelDims) -> None:
        if dims.tp_group is None:
            raise ValueError("DeepSpeedMPU needs a ParallelDims made by ParallelDims.build "
                             "(this one has no process groups)")
        self.dims = dims

    # data parallel: DeepSpeed averages gradients (and ZeRO partitions) over data- and context-parallel
    # ranks together, which hold the same weights (ParallelDims.dp_cp_group)
    def get_data_parallel_rank(self) -> int:
        return self.dims.ranks("dp_cp").index(self.dims.rank)

    def get_data_parallel_world_size(self) -> int:
        return self.dims.dp * self.dims.cp

    def get_data_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.dp_cp_group

    def get_data_parallel_group_ranks(self) -> list[int]:
        return self.dims.ranks("dp_cp")

    # tensor parallel (also under DeepSpeed's older "slice" names)
    def get_tensor_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_tensor_model_parallel_world_size(self) -> int:
        return self.dims.tp

    def get_tensor_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.tp_group

    def get_tensor_model_parallel_src_rank(self) -> int:
        """Global rank of tensor-parallel rank 0 in this rank's group (DeepSpeed broadcasts from it)."""
        return self.dims.ranks("tp")[0]

    get_slice_parallel_rank = get_tensor_model_parallel_rank
    get_slice_parallel_world_size = get_tensor_model_parallel_world_size
    get_slice_parallel_group = get_tensor_model_parallel_group

    # pipeline parallel (both spellings DeepSpeed uses)
    def get_pipeline_model_parallel_rank(self) -> int:
        return self.dims.pp_rank

    def get_pipeline_model_parallel_world_size(self) -> int:
        return self.dims.pp

    def get_pipeline_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.pp_group

    get_pipe_parallel_rank = get_pipeline_model_parallel_rank
    get_pipe_parallel_world_size = get_pipeline_model_parallel_world_size
    get_pipe_parallel_group = get_pipeline_model_parallel_group

    # model parallel (tensor x pipeline)
    def get_model_parallel_rank(self) -> int:
        return self.dims.tp_rank

    def get_model_parallel_world_size(self) -> int:
        return self.dims.tp * self.dims.pp

    def get_model_parallel_group(self) -> dist.ProcessGroup:
        return self.dims.model_group
