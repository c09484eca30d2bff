"""Kernels: the selective scan and its backends."""

from vmrnn.ops.selective_scan import (
    ScanBackendUnavailable,
    cuda_scan_available,
    selective_scan,
    selective_scan_cuda,
    selective_scan_torch,
)

__all__ = ["ScanBackendUnavailable", "cuda_scan_available", "selective_scan", "selective_scan_cuda",
           "selective_scan_torch"]
