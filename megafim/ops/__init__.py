"""Kernels: each Triton kernel sits beside its autograd function and its pure-torch reference."""
