"""Data-parallel evaluation under `torchrun` or `accelerate launch`, with accelerate's `PartialState`.

    torchrun --nproc_per_node 8 -m train eval runs/cd-flm --tasks t.jsonl          # 8 GPUs of a node
    accelerate launch --multi_gpu --num_processes 8 -m train eval runs/cd-flm ...  # the same
    torchrun --nproc_per_node 2 -m train eval ...                                  # CPU-only: gloo

Every process loads the whole model on its own device (`PartialState().device`: cuda:LOCAL_RANK,
or the CPU) and builds the same list of scoring batches as one process would (the requests
sorted by length and cut into batches: `Scorer.loglikelihoods`). Batch k is scored by process
k mod N; `accelerate.utils.gather_object` (all_gather_object) hands every process every
(k, scores), which are put back in batch order. So every batch has the same rows, padding and
shape as in one process, and the numbers are the one-process numbers, bit for bit on the same
hardware and thread count, in the same order (tests/test_eval_parallel.py). Held-out loss
batches are shared the same way and their per-batch sums added in batch order.

Why strided batches and not `PartialState.split_between_processes` over the records:
* records split first would be batched differently in each process (other neighbours, other
  padding), which changes scores by float rounding;
* the batches are sorted longest first, so contiguous chunks would give process 0 the longest.

Every process runs the same code on the same inputs (nothing but the model work is split); only
the main process (`is_main_process`) writes files and prints. Pitfalls:
* on a machine without CUDA, `PartialState` must be told `cpu=True` to form a (gloo) group; this
  module does so. `accelerate launch --cpu --num_processes 2` starts ONE process unless mpirun is
  configured (`--mpirun_hostfile`): on CPU use `torchrun` or `accelerate launch --multi_gpu`
  (its torchrun-based launcher; the processes then find no CUDA and use gloo);
* torchrun sets OMP_NUM_THREADS=1 for more than one process: compare timings with that in mind.
"""
from __future__ import annotations

import os
from typing import Callable, Optional, TypeVar

T = TypeVar("T")


def launched() -> bool:
    """Whether this process is one of several started by torchrun / accelerate launch."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_state(device: Optional[str] = None):
    """accelerate's PartialState for this process (the process group is formed on first use:
    NCCL on GPUs, gloo on CPUs). `device="cpu"` keeps the processes on the CPU on a GPU machine."""
    import torch
    from accelerate import PartialState

    return PartialState(cpu=(device == "cpu") or not torch.cuda.is_available())


class Shard:
    """Which of a list of work items this process computes, and the gather that gives every
    process all of them in order (`in_order`)."""

    def __init__(self, index: int, count: int, gather: Optional[Callable[[list], list]] = None):
        if not 0 <= index < count:
            raise ValueError(f"process index {index} is not in 0..{count - 1}")
        self.index, self.count = index, count
        self._gather = gather

    @classmethod
    def of(cls, state) -> Optional["Shard"]:
        """The shard of a PartialState; None for a single process (nothing to split)."""
        if state.num_processes == 1:
            return None
        from accelerate.utils import gather_object

        return cls(state.process_index, state.num_processes, gather_object)

    def mine(self, n: int) -> range:
        """This process's items of 0..n-1: every count-th, from its index (balanced for sorted work)."""
        return range(self.index, n, self.count)

    def gather(self, items: list) -> list:
        """The concatenation of every process's `items`, in process order, on every process."""
        if self._gather is None:
            raise RuntimeError("this Shard has no gather (built by hand); use Shard.of(PartialState())")
        return self._gather(items)

    def in_order(self, n: int, compute: Callable[[int], T]) -> list[T]:
        """[compute(0), ..., compute(n - 1)], each computed by one process, on every process."""
        got = dict(self.gather([(k, compute(k)) for k in self.mine(n)]))
        if len(got) != n:
            raise RuntimeError(f"gathered {len(got)} of {n} items: every process must ask for the same n")
        return [got[k] for k in range(n)]
