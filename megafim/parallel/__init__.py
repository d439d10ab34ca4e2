"""Parallelism: process groups (one frozen dataclass), collectives with autograd, tensor-parallel layers."""

from megafim.parallel.deepspeed_mpu import DeepSpeedMPU
from megafim.parallel.dims import ParallelDims, ParallelSizeError
from megafim.parallel.tensor_parallel import apply_tensor_parallel, check_tensor_parallel_sizes

__all__ = ["DeepSpeedMPU", "ParallelDims", "ParallelSizeError", "apply_tensor_parallel",
           "check_tensor_parallel_sizes"]
