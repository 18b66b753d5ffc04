"""Host K/V storage: (pinned) CPU tensors and their device-visible views.

A page-locked host tensor is mapped into the GPU's unified address space (CUDA UVA: the device
address of ``cudaHostAlloc`` memory is its host address), so kernels can read and write it
directly over PCIe, in stream order and without a host synchronisation. ``device_view``
wraps such a tensor as a CUDA tensor of the same shape (through ``__cuda_array_interface__``,
as vLLM's ``get_cuda_view_from_cpu_tensor`` does); the view keeps the host tensor alive.
Only kernels touch these views here (indexing ops and Triton), never ``cudaMemcpy``.
"""

from __future__ import annotations

import torch

__all__ = ["host_zeros", "device_view", "wants_pinned"]

_TYPESTR = {1: "|u1", 2: "<i2", 4: "<i4", 8: "<i8"}
_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def wants_pinned(pin: bool | None) -> bool:
    """The ``OffloadConfig.pin_memory`` choice: None means "when CUDA is available"."""
    return torch.cuda.is_available() if pin is None else bool(pin)


def host_zeros(shape, dtype: torch.dtype, *, pin: bool) -> torch.Tensor:
    """A zero-filled CPU tensor, page-locked when ``pin`` (zeros: rows past a sequence's length
    are read by dense attention under a mask, and 0 * garbage could be NaN)."""
    t = torch.zeros(*shape, dtype=dtype, pin_memory=pin)
    return t


class _CudaArray:
    """A ``__cuda_array_interface__`` (v3) over a pinned CPU tensor, read as integers of the
    same width (the interface has no bfloat16)."""

    def __init__(self, host: torch.Tensor):
        self.host = host  # kept alive by the view (torch holds a reference to this object)
        size = host.element_size()
        self.__cuda_array_interface__ = {
            "shape": tuple(host.shape),
            "typestr": _TYPESTR[size],
            "data": (host.data_ptr(), False),
            "strides": tuple(s * size for s in host.stride()),
            "version": 3,
        }


def device_view(host: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``host`` as seen from ``device``: a CUDA tensor aliasing the pinned host memory on a
    CUDA device (reads and writes cross PCIe), the tensor itself on a CPU device."""
    device = torch.device(device)
    if device.type != "cuda":
        return host
    if device.index is None:  # as_tensor would copy to "cuda" from the pointer's "cuda:0"
        device = torch.device("cuda", torch.cuda.current_device())
    if host.numel() == 0:  # nothing to alias (and torch reports an empty tensor as not pinned)
        return torch.empty(host.shape, dtype=host.dtype, device=device)
    if not host.is_pinned():
        raise ValueError("a CUDA view of host memory needs a pinned tensor (OffloadConfig.pin_memory)")
    with torch.cuda.device(device):
        try:
            view = torch.as_tensor(_CudaArray(host), device=device).view(host.dtype)
        except (RuntimeError, TypeError, ValueError) as err:  # e.g. numpy missing (it parses typestr)
            make = getattr(torch._C, "_construct_storage_from_data_pointer", None)
            if make is None:
                raise RuntimeError(f"cannot make a CUDA view of pinned host memory: {err}") from err
            # a storage without a deleter: the caller keeps ``host`` alive as long as the view
            storage = make(host.data_ptr(), device, host.untyped_storage().nbytes() - host.storage_offset()
                           * host.element_size())
            view = torch.empty(0, dtype=host.dtype, device=device).set_(storage, 0, host.shape, host.stride())
    if view.data_ptr() != host.data_ptr():
        raise RuntimeError(
            f"the CUDA view of pinned host memory is a copy (host pointer {host.data_ptr():#x}, view "
            f"{view.data_ptr():#x}, on {view.device}): this platform maps pinned memory elsewhere"
        )
    return view
