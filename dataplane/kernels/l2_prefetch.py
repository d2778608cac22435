"""Pull the start of a decode GEMM's weights into L2 while a small kernel runs before it.

In a decode step at a few rows the projections read their weights near the copy rate, but between them
latency-bound kernels (add+RMSNorm, SwiGLU) leave HBM idle for microseconds. The fused path forks around
the kernel before QKV, gate/up and down (not O, whose weights the attention's KV read would evict, nor the
folded decode GEMMs' passes). `L2Prefetch.fork(w)` starts
a kernel on a side stream that asks L2 for the first `nbytes` of `w` (PTX `prefetch.global.L2::evict_last`
per 128-byte line); `join()` makes the main stream wait for it before the GEMM, so the prefetch never
shares the SMs with the GEMM. Inside a CUDA graph the fork and join are edges of the graph.

CUDA only (inline PTX); it must not change what is computed: it reads the weights and writes nothing but
a never-taken store that keeps the compiler from dropping the reads. `benchmarks/l2_prefetch.py` measures
what it buys: on an H100 up to ~1 us a projection (8 MiB before QKV), less or a loss elsewhere, so it is
off by default (`DataplaneConfig.decode_l2_prefetch_kib`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import Tensor

LINE = 128  # bytes one prefetch asks for
BLOCK = 128  # lines a program takes at a time


def _kernel():  # noqa: ANN202 (a Triton JIT function; Triton imported on CUDA only)
    import triton
    import triton.language as tl

    @triton.jit
    def prefetch_l2_kernel(ptr, n_lines, sink, LINE: tl.constexpr, BLOCK: tl.constexpr):
        pid, nprog = tl.program_id(0), tl.num_programs(0)
        base = ptr.to(tl.pointer_type(tl.int8))
        acc = tl.zeros([BLOCK], dtype=tl.int32)
        for start in range(pid * BLOCK, n_lines, nprog * BLOCK):
            lines = start + tl.arange(0, BLOCK)
            addr = base + tl.where(lines < n_lines, lines, 0).to(tl.int64) * LINE
            acc += tl.inline_asm_elementwise("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;", "=r,l",
                                             [addr], dtype=tl.int32, is_pure=False, pack=1)
        total = tl.sum(acc, axis=0)
        tl.store(sink + pid, total, mask=total != 0)  # the asm writes 0: never taken, keeps the asm

    return prefetch_l2_kernel


class L2Prefetch:
    """A side stream that prefetches the first `nbytes` of a weight into L2 (`fork`) until `join`."""

    def __init__(self, device: torch.device, nbytes: int) -> None:
        if nbytes <= 0:
            raise ValueError(f"L2Prefetch needs a positive byte count, got {nbytes}")
        self.device = device
        self.nbytes = nbytes
        self.programs = torch.cuda.get_device_properties(device).multi_processor_count  # one program an SM
        self.stream = torch.cuda.Stream(device)
        self._sink = torch.zeros(self.programs, dtype=torch.int32, device=device)
        self._kernel = _kernel()
        self._open = False
        self.forks = 0  # prefetch kernels launched (captured graphs hold them; replays do not count)

    def lines(self, weight: Tensor) -> int:
        """128-byte lines a fork asks for: the first `nbytes` of the weight, at most all of it."""
        return min(self.nbytes, weight.numel() * weight.element_size()) // LINE

    def fork(self, weight: Tensor) -> None:
        """The side stream waits for the current one, then prefetches `weight`'s first bytes."""
        if self._open:
            raise RuntimeError("L2Prefetch.fork: the last fork was not joined")
        n = self.lines(weight)
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        self._open = True  # from here on `join` must run, even if the launch below raises
        if n == 0:  # a weight smaller than a line: nothing to ask for
            return
        with torch.cuda.stream(self.stream):
            grid = (min(self.programs, -(-n // BLOCK)),)
            self._kernel[grid](weight, n, self._sink, LINE=LINE, BLOCK=BLOCK, num_warps=4)
        self.forks += 1

    def join(self) -> None:
        """The current stream waits for the side stream (no-op without an open fork)."""
        if self._open:
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
            self._open = False


_NO_PREFETCH = nullcontext()  # shared: the fused path enters it three times a layer on every eager pass


def prefetching(prefetch: L2Prefetch | None, weight: Tensor) -> AbstractContextManager[None]:
    """Run the body (a small kernel) while `weight`'s first bytes are prefetched; no-op without one
    (a shared nullcontext: a generator context manager cost ~0.6 us more a use on the host)."""
    return _NO_PREFETCH if prefetch is None else _prefetch_around(prefetch, weight)


@contextmanager
def _prefetch_around(prefetch: L2Prefetch, weight: Tensor) -> Iterator[None]:
    try:
        prefetch.fork(weight)
        yield
    finally:
        prefetch.join()
