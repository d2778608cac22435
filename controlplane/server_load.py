"""A snapshot of what the engine holds (requests running and queued, KV blocks used and cached),
for the GetLoad RPC: what a router or load balancer reads to pick a server.

It only reads the scheduler; it decides nothing and changes nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from controlplane.prefix_cache import PrefixCachingAllocator
from controlplane.scheduler import Scheduler


@dataclass(frozen=True)
class ServerLoad:
    running: int  # sequences in the batch
    waiting: int  # sequences queued (preempted ones included)
    waiting_tokens: int  # tokens the queued sequences have to prefill
    kv_blocks: int
    kv_blocks_used: int  # held by sequences
    kv_blocks_cached: int  # in the prefix index, held or idle

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_blocks_used / self.kv_blocks if self.kv_blocks else 0.0


def server_load(scheduler: Scheduler) -> ServerLoad:
    allocator = scheduler.allocator
    cached = allocator.num_cached if isinstance(allocator, PrefixCachingAllocator) else 0
    return ServerLoad(
        running=scheduler.num_running, waiting=scheduler.num_waiting,
        waiting_tokens=sum(seq.num_uncomputed_tokens for seq in scheduler.waiting),
        kv_blocks=allocator.num_blocks, kv_blocks_used=allocator.num_used, kv_blocks_cached=cached,
    )
