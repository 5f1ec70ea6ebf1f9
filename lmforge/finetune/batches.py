"""Batches of labelled examples for every task: shuffled each epoch, grouped by length, resumable.

A task supplies its examples (anything with `input_ids`), how to pad a list of them into tensors
(`collate`), and optionally a seeded transform for training-time noise (classification's
augmentation). The sampler's state is (epoch, batch), so a checkpoint resumes mid-epoch exactly.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lmforge.errors import LmforgeError


def pad_right(examples: list, pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids, attention mask, segment ids) of examples with `input_ids` and `token_type_ids`, padded
    on the right: classifiers pool and span heads read by the mask, so padding may sit there."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    segments = torch.zeros((len(examples), width), dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example.input_ids)
        ids[row, :n], mask[row, :n] = torch.tensor(example.input_ids), 1
        segments[row, :n] = torch.tensor(example.token_type_ids)
    return ids, mask, segments


class ExampleSampler:
    """Shuffled passes over the examples, batched by similar length, reproducible from (seed,
    epoch, batch).

    Each epoch shuffles the examples, sorts every pool of BUCKET_POOL batches by length, cuts
    the pools into batches and shuffles the batches: a batch pads its texts to nearly the same
    length (SST-2's phrases padded to their random batch's longest took ~4x the compute), while
    which examples meet stays random (`length` may say what "length" is: a seq2seq pair sorts by
    source, then target length). An incomplete last batch is dropped. Under torchrun each
    rank takes its share of every global batch."""

    BUCKET_POOL = 50

    def __init__(self, examples: list, batch_size: int, seed: int, collate: Callable[[list], dict],
                 rank: int = 0, world_size: int = 1, transform: Callable | None = None,
                 length: Callable | None = None):
        if len(examples) < batch_size * world_size:
            raise LmforgeError(f"{len(examples)} usable training examples: fewer than one batch of "
                               f"{batch_size * world_size}; lower --batch-size")
        self.examples, self.batch_size, self.seed, self.collate = examples, batch_size, seed, collate
        self.rank, self.world_size, self.transform = rank, world_size, transform
        self.length = length or (lambda example: len(example.input_ids))  # what batches group by
        self.epoch, self.position = 0, 0  # position: the next batch of this epoch
        self._batches = self._epoch_batches()

    def _epoch_batches(self) -> list[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(len(self.examples), generator=generator).tolist()
        size = self.batch_size * self.world_size
        pool = size * self.BUCKET_POOL
        batches = []
        for start in range(0, len(order), pool):
            chunk = sorted(order[start:start + pool], key=lambda i: self.length(self.examples[i]))
            batches += [chunk[k:k + size] for k in range(0, len(chunk) - size + 1, size)]
        shuffled = torch.randperm(len(batches), generator=generator).tolist()
        return [batches[k] for k in shuffled]

    def next_batch(self) -> dict:
        if self.position >= len(self._batches):
            self.epoch, self.position = self.epoch + 1, 0
            self._batches = self._epoch_batches()
        batch = self._batches[self.position]
        first = self.rank * self.batch_size
        mine = [(self.position * len(batch) + k, batch[k]) for k in range(first, first + self.batch_size)]
        self.position += 1
        return self.collate([self._example(place, index) for place, index in mine])

    def _example(self, place: int, index: int):
        """The example, or its transformed copy, the noise seeded by (seed, epoch, place in the epoch)."""
        example = self.examples[index]
        if self.transform is None:
            return example
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 10_000_019 + place)
        return self.transform(example, generator)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position = state["epoch"], state["position"]
        self._batches = self._epoch_batches()
