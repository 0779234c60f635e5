"""Batch order as a pure function of (seed, epoch), so training can resume at an exact batch.

    plan = BatchPlan(tokenized, batch_size=8, packing=True, max_seq_len=1024, seed=0)
    for epoch in range(epochs):
        batches = plan.batches(epoch)              # a list-like: len(), [k], iteration
        for k in range(start_batch, len(batches)):
            loss = model(**batches[k]).loss        # collated on access, so memory stays flat

A checkpoint that records (epoch, k) resumes by calling `plan.batches(epoch)` and starting at
k + 1. Three orders are available:

- shuffled (default): units (examples, or packed rows) shuffled per epoch, then chunked;
- packed: examples first packed into rows (packing.py, fixed across epochs), rows shuffled; with
  `share_prefix`, the tokens all examples open with are held once per row (packing.py);
- group_by_length (unpacked only): shuffle, cut into mega-batches of `batch_size * 50`, sort each
  by length, chunk, then shuffle the batches. Batches then hold similar lengths (little padding)
  while their order stays random; the factor 50 follows transformers' LengthGroupedSampler.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence

import torch

from tuneforge.data.collate import collate_packed, collate_padded
from tuneforge.data.packing import pack_examples, shared_prefix_length
from tuneforge.data.tokenization import TokenizedExample
from tuneforge.errors import ConfigError, DataError

MEGA_BATCH_FACTOR = 50


class EpochBatches(Sequence):
    """The batches of one epoch; `[k]` collates batch k into tensors when asked."""

    def __init__(self, plan: BatchPlan, batch_units: list[list[int]]):
        self._plan = plan
        self.units = batch_units  # per batch, the indices of its units (examples or packed rows)

    def __len__(self) -> int:
        return len(self.units)

    def __getitem__(self, k: int | slice) -> dict[str, torch.Tensor] | list[dict[str, torch.Tensor]]:
        if isinstance(k, slice):
            return [self[i] for i in range(len(self))[k]]
        return self._plan.collate(self.units[k])

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return (self[k] for k in range(len(self)))


class BatchPlan:
    """Deterministic batches over tokenized examples; see the module docstring.

    `pad_id` may be any in-vocabulary id: padded positions are masked and never trained.
    `mask_dtype` is the dtype of the packed 4D attention mask and must match the model's compute
    dtype under SDPA (e.g. torch.bfloat16)."""

    def __init__(
        self,
        tokenized: Sequence[TokenizedExample],
        batch_size: int,
        packing: bool = False,
        max_seq_len: int | None = None,
        group_by_length: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        pad_id: int = 0,
        mask_dtype: torch.dtype = torch.float32,
        share_prefix: bool = False,
    ):
        if not tokenized:
            raise DataError("BatchPlan got no tokenized examples; check the data source and max_seq_len.")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size={batch_size!r} must be a positive integer")
        if packing and group_by_length:
            raise ConfigError("group_by_length=True applies to unpacked batches; packed rows are already full. Set one of packing or group_by_length to False.")
        self.examples = list(tokenized)
        self.batch_size = batch_size
        self.packing = packing
        self.group_by_length = group_by_length
        self.seed = seed
        self.drop_last = drop_last
        self.pad_id = pad_id
        self.mask_dtype = mask_dtype
        lengths = [len(example) for example in self.examples]
        self.max_seq_len = max_seq_len or max(lengths)
        self.shared_prefix = shared_prefix_length(self.examples) if packing and share_prefix else 0
        if packing:
            own = [length - self.shared_prefix for length in lengths]
            self.rows = pack_examples(own, self.max_seq_len - self.shared_prefix)
        else:
            self.rows = [(index,) for index in range(len(self.examples))]
        # Tokens of the examples in each unit (an example, or a packed row): what a step trains on.
        self.unit_lengths = [sum(lengths[index] for index in row) for row in self.rows]
        # Token slots each unit fills, for length grouping and padding stats; less than the above
        # when a shared prefix is held once per row.
        self.row_lengths = [self.shared_prefix + sum(lengths[index] - self.shared_prefix for index in row)
                            for row in self.rows]
        if drop_last and len(self.rows) < batch_size:
            raise ConfigError(f"drop_last=True with batch_size={batch_size} leaves no batch: there are only {len(self.rows)} {'packed rows' if packing else 'examples'}.")

    @property
    def num_batches(self) -> int:
        """Batches per epoch, the same for every epoch (for schedules and progress bars)."""
        full, rest = divmod(len(self.rows), self.batch_size)
        return full + (1 if rest and not self.drop_last else 0)

    def batches(self, epoch: int) -> EpochBatches:
        return EpochBatches(self, self.batch_units(epoch))

    def batch_units(self, epoch: int) -> list[list[int]]:
        """Per batch of `epoch`, the unit indices it holds: a function of (seed, epoch) only."""
        rng = random.Random(f"tuneforge-batches:{self.seed}:{epoch}")
        order = list(range(len(self.rows)))
        rng.shuffle(order)
        if self.group_by_length:
            order = self._grouped_by_length(order)
        batches = [order[start : start + self.batch_size] for start in range(0, len(order), self.batch_size)]
        if self.drop_last and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.group_by_length:
            rng.shuffle(batches)
        return batches

    def _grouped_by_length(self, order: list[int]) -> list[int]:
        size = self.batch_size * MEGA_BATCH_FACTOR
        grouped = []
        for start in range(0, len(order), size):
            grouped += sorted(order[start : start + size], key=lambda unit: -self.row_lengths[unit])
        return grouped

    def collate(self, units: Sequence[int]) -> dict[str, torch.Tensor]:
        if self.packing:
            rows = [[self.examples[index] for index in self.rows[unit]] for unit in units]
            return collate_packed(rows, self.pad_id, self.mask_dtype, self.shared_prefix)
        return collate_padded([self.examples[unit] for unit in units], self.pad_id)

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of the token slots of `epoch`'s batches that are padding (each batch is padded to
        its longest row)."""
        real = padded = 0
        for units in self.batch_units(epoch):
            lengths = [self.row_lengths[unit] for unit in units]
            real += sum(lengths)
            padded += max(lengths) * len(lengths)
        return 1.0 - real / padded


def build_batches(tokenized: Sequence[TokenizedExample], batch_size: int, epoch: int = 0, **plan_options) -> EpochBatches:
    """The batches of one epoch; shorthand for `BatchPlan(tokenized, batch_size, **plan_options).batches(epoch)`."""
    return BatchPlan(tokenized, batch_size, **plan_options).batches(epoch)
