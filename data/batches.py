"""The training data as the recipe batches it: records tokenised (data/commonsense.py), the
validation records held out as upstream's `datasets` split picks them, each epoch's random
batches, and a batch right-padded into the tensors the loss takes (`Batch`).
"""

import math
from dataclasses import dataclass, fields

import numpy
import torch

from data.commonsense import IGNORE_INDEX, encode_cloze_record, encode_record, load_records


@dataclass
class Batch:
    """A right-padded training batch. tokens: (B, T) ids; real: (B, T) bool, False at padding. At
    position t the targets are token t+1's label or IGNORE_INDEX: `answer_targets` on answer tokens
    only (the Echo terms' positions A), `ce_targets` where the plain cross-entropy trains (every next
    token; the answer alone with --answer-only-loss)."""

    tokens: torch.Tensor
    real: torch.Tensor
    answer_targets: torch.Tensor
    ce_targets: torch.Tensor

    def to(self, device) -> "Batch":
        return Batch(*(getattr(self, f.name).to(device) for f in fields(self)))


def collate(examples, train_on_inputs: bool, pad_id: int) -> Batch:
    """Right-pad, and shift labels so position t holds the label of token t + 1."""
    T = max(len(ids) for ids, _ in examples)
    tokens = torch.full((len(examples), T), pad_id, dtype=torch.long)
    real = torch.zeros((len(examples), T), dtype=torch.bool)
    answer = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for i, (ids, labels) in enumerate(examples):
        tokens[i, :len(ids)] = torch.tensor(ids)
        real[i, :len(ids)] = True
        answer[i, :len(ids) - 1] = torch.tensor(labels[1:])
    if not train_on_inputs:
        return Batch(tokens, real, answer, answer)
    ce = torch.full_like(answer, IGNORE_INDEX)  # the recipe's loss: every real next token
    ce[:, :-1] = torch.where(real[:, 1:], tokens[:, 1:], IGNORE_INDEX)
    return Batch(tokens, real, answer, ce)


def encode_examples(records, tokenizer, cutoff: int, cloze: bool = False) -> list[tuple[list[int], list[int]]]:
    """(ids, answer-only labels) per record, in the protocol's template or the cloze form."""
    encode = encode_cloze_record if cloze else encode_record
    examples = []
    for i, record in enumerate(records):
        try:
            examples.append(encode(tokenizer, record, cutoff))
        except ValueError as e:  # only the cloze form refuses a record
            raise ValueError(f"--cloze: record {i} of --data: {e}") from None
    return examples


def split_validation(n: int, val_size: int, val_seed: int) -> tuple[list[int], list[int]]:
    """(train, validation) record indices as upstream's `datasets` train_test_split(test_size=
    val_size, shuffle=True, seed=val_seed) picks them: a permutation by numpy's default
    generator seeded with val_seed, whose first val_size entries are the validation records."""
    order = numpy.random.default_rng(val_seed).permutation(n).tolist()
    return order[val_size:], order[:val_size]


def random_batches(n: int, batch_size: int, seed: int) -> list[list[int]]:
    """The recipe's batches: a random order of the n examples, cut into batch_size pieces."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + batch_size] for i in range(0, n, batch_size)]


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort chunks of 64 batches by length, cut
    into batches, shuffle the batches."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    chunk = 64 * batch_size
    batches = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start:start + chunk], key=lambda i: -lengths[i])
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


# The batch order's seed is drawn from --seed and the epoch alone, never from a running generator,
# so a resumed run draws exactly what the uninterrupted one drew. The stride keeps the seeds of
# nearby --seed values apart (seed 1's epoch 0 is not seed 0's epoch 1).
EPOCH_SEED_STRIDE = 1000  # more epochs than any run has


class TrainingData:
    """The examples split as the recipe splits them (training, validation) and each step's batch
    of training examples."""

    def __init__(self, examples, val_size: int, val_seed: int, batch_size: int, seed: int, group_by_length: bool):
        train_idx, val_idx = split_validation(len(examples), val_size, val_seed)
        self.train, self.val = [examples[i] for i in train_idx], [examples[i] for i in val_idx]
        self.steps_per_epoch = math.ceil(len(self.train) / batch_size)
        self.batch_size, self.seed, self.group_by_length = batch_size, seed, group_by_length
        self.epoch, self.batches = None, []

    def batch(self, step: int) -> list[tuple[list[int], list[int]]]:
        """The examples of step `step`: its epoch's order depends on (seed, epoch) alone."""
        epoch, index = divmod(step, self.steps_per_epoch)
        if epoch != self.epoch:
            seed, lengths = self.seed * EPOCH_SEED_STRIDE + epoch, [len(ids) for ids, _ in self.train]
            self.batches = (length_grouped_batches(lengths, self.batch_size, seed) if self.group_by_length
                            else random_batches(len(lengths), self.batch_size, seed))
            self.epoch = epoch
        return [self.train[i] for i in self.batches[index]]


def read_records(data: str) -> list[dict]:
    """The records of --data's comma-separated files. One file given twice (under another name, a
    link or a copy: the same records) is a ValueError: trained on twice, and split at random, its
    records would validate on their own training copies."""
    files = []
    for path in data.split(","):
        records = load_records(path)
        twin = next((other for other, earlier in files if records and earlier == records), None)
        if twin is not None:
            raise ValueError(f"--data: {path} holds the same records as {twin}: one file given twice")
        files.append((path, records))
    return [r for _, records in files for r in records]


def micro_batch_slices(n: int, world: int, rank: int, micro_batch_size: int, micros: int) -> list[tuple[int, int]]:
    """This process's part of a step's n examples, as (start, end) of up to `micros` micro-batches:
    process `rank` takes the rank-th of `world` equal shares, the last one also the remainder."""
    share = n // world
    end = (rank + 1) * share if rank < world - 1 else n
    slices = []
    for m in range(micros):
        start = rank * share + m * micro_batch_size
        stop = min(start + micro_batch_size, end)
        if start < stop:
            slices.append((start, stop))
    return slices


# Rows per part of a micro-batch: sorted by length, parts of 4 of the recipe's random records pad
# 7-9% of their positions where the whole batch pads 28-38% (ARC-Easy; the four splits mixed),
# and 4 rows keep the matmuls large enough to run at full rate.
ROWS_PER_PART = 4


def padded_parts(lengths: list[int]) -> list[list[int]]:
    """The indices of a micro-batch's examples sorted by length, in parts of ROWS_PER_PART."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + ROWS_PER_PART] for i in range(0, len(order), ROWS_PER_PART)]
