"""The training batch stream: endless micro-batches of one process's shard, resumable mid-epoch."""
from __future__ import annotations

import itertools
import signal

from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, Sampler

from .dataset import RetriBooruDataset, TaskBatchSampler, collate


class _Skip(Sampler):
    """A batch sampler without its first `skip` batches (resuming inside an epoch)."""

    def __init__(self, batches, skip: int):
        self.batches, self.skip = batches, skip

    def __iter__(self):
        return itertools.islice(iter(self.batches), self.skip, None)

    def __len__(self) -> int:
        return max(0, len(self.batches) - self.skip)


def _ignore_sigint(_worker_id: int) -> None:
    """Loader workers leave Ctrl-C to the training process, which saves and stops at a step boundary."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class BatchStream:
    """Endless micro-batches of this process's shard, epoch after epoch, with a resumable position
    (epoch, batches consumed in it). Shuffling follows DistributedSampler (seed + epoch), so one
    process with a global batch of N x B sees what N processes of B see together."""

    def __init__(self, dataset: RetriBooruDataset, batch_size: int, *, rank: int, world: int, seed: int,
                 workers: int, pin_memory: bool, epoch: int = 0, offset: int = 0):
        self.dataset, self.batch_size, self.rank, self.world, self.seed = dataset, batch_size, rank, world, seed
        self.workers, self.pin_memory = workers, pin_memory
        self.epoch, self.offset = epoch, offset
        self.per_epoch = len(dataset) // world // batch_size
        if self.per_epoch == 0:
            raise ValueError(f"{dataset.root}: {len(dataset)} samples cannot fill one batch of {batch_size} on each "
                             f"of {world} processes")
        self._it = None

    def _start(self):
        self.dataset.set_epoch(self.epoch)
        sampler = DistributedSampler(self.dataset, num_replicas=self.world, rank=self.rank, shuffle=True,
                                     seed=self.seed, drop_last=True)
        sampler.set_epoch(self.epoch)
        if self.dataset.task == "multi":
            batches = TaskBatchSampler(sampler, self.batch_size, seed=self.seed, drop_last=True)
            batches.set_epoch(self.epoch)
        else:
            batches = BatchSampler(sampler, self.batch_size, drop_last=True)
        loader = DataLoader(self.dataset, batch_sampler=_Skip(batches, self.offset), collate_fn=collate,
                            num_workers=self.workers, pin_memory=self.pin_memory, worker_init_fn=_ignore_sigint)
        self._it = iter(loader)

    def __next__(self) -> tuple[dict, int]:
        """The next micro-batch and the epoch it belongs to."""
        if self.offset >= self.per_epoch:
            self.epoch, self.offset, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._start()
        batch = next(self._it)
        self.offset += 1
        return batch, self.epoch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}
