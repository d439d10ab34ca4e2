"""Parallelism: process groups (one frozen dataclass), collectives with autograd, tensor-parallel layers."""
