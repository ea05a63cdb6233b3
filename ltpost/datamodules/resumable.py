"""Train loaders that resume mid-epoch at the exact batch, with the same order, on any number of ranks.

Lightning saves the ``state_dict()`` of a train loader that has one and hands it back on resume; a plain
``DataLoader`` has none, so a run resumed mid-epoch would restart the epoch's data (and Lightning warns). Here:

- ``ResumableSampler`` is a ``DistributedSampler``: every epoch's order is a permutation seeded by
  ``seed + epoch`` (not drawn from the global generator), each rank takes its strided share, and Lightning,
  seeing a distributed sampler already, leaves it in place and calls ``set_epoch`` on it. It can start an epoch
  at an offset.
- ``ResumableDataLoader`` counts the batches it has handed out this epoch and saves that count; on resume the
  sampler skips that many batches' indices (nothing is loaded or collated for them).

Lightning fetches batches from a loader with a length one at a time (no prefetching), so the count at a
checkpoint equals the batches the loop has consumed.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler


def default_seed(seed: int | None) -> int:
    """``seed``, or the process's torch seed (set by ``seed_everything``/the CLI's ``seed_everything``)."""
    return seed if seed is not None else torch.initial_seed() % 2**32


def data_parallel_rank(trainer) -> tuple[int, int]:
    """``(num_replicas, rank)`` of this process among the data-parallel ranks (all ranks for DDP/FSDP)."""
    if trainer is None:
        return 1, 0
    kwargs = getattr(trainer.strategy, "distributed_sampler_kwargs", None) or {}
    return kwargs.get("num_replicas", 1), kwargs.get("rank", 0)


class ResumableSampler(DistributedSampler):
    """``DistributedSampler`` (seeded per-epoch shuffle, strided shares, padded to equal length) that can start
    the next epoch ``start_at`` samples in."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, shuffle: bool, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed, drop_last=False)
        self._start = 0

    def start_at(self, samples: int) -> None:
        self._start = samples

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        start, self._start = self._start, 0
        return iter(indices[start:])


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose position within the epoch is saved in Lightning's checkpoint and restored on resume.

    Its ``sampler`` is a ``ResumableSampler`` (batches of ``batch_size`` samples), or its dataset is iterable and
    has ``start_at(batches)``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._position = 0  # batches handed out in the current epoch
        self._resume_at = 0

    def __iter__(self) -> Iterator[Any]:
        start, self._resume_at = self._resume_at, 0
        if start:
            if hasattr(self.dataset, "start_at"):
                self.dataset.start_at(start)
            else:
                self.sampler.start_at(start * self.batch_size)
        self._position = start
        # The inner iterator is made now, not at the first batch: making it draws a seed from the global generator,
        # which must happen before ResumeState restores the generators at on_train_start.
        return _Counted(self, super().__iter__())

    def state_dict(self) -> dict[str, int]:
        return {"batches": self._position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        batches = int(state.get("batches", 0))
        # A checkpoint written at the end of an epoch resumes at the start of the next one.
        self._resume_at = batches if batches < len(self) else 0


class _Counted:
    """Iterates ``inner`` and counts the batches on the loader (its position in the epoch)."""

    def __init__(self, loader: ResumableDataLoader, inner: Iterator[Any]) -> None:
        self.loader = loader
        self.inner = inner

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self.inner)
        self.loader._position += 1
        return batch
