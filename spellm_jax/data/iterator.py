"""Deterministic, resumable, per-host batches over packed sequences."""

from __future__ import annotations

from typing import Any

import numpy as np


def epoch_order(seed: int, epoch: int, size: int) -> np.ndarray:
    """The order of `size` rows in epoch `epoch`: a permutation seeded with `(seed, epoch)`."""
    return np.random.default_rng([seed, epoch]).permutation(size)


class BatchIterator:
    """Infinite epochs of global batches, reshuffled each epoch by a permutation seeded with
    `(seed, epoch)`; the last partial batch of an epoch is dropped.

    Host `process_index` of `process_count` gets rows `[process_index * per_host, (process_index
    + 1) * per_host)` of every global batch, so the hosts' slices concatenate to the global batch.
    The state (epoch, position, seed) is global: it restores on any number of hosts.
    """

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, global_batch_size: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> None:
        if tokens.ndim != 2 or loss_mask.shape != tokens.shape:
            raise ValueError(f"tokens {tokens.shape} and loss_mask {loss_mask.shape} must both be "
                             "[num_sequences, seq_len].")
        if global_batch_size < 1 or process_count < 1 or not 0 <= process_index < process_count:
            raise ValueError(f"need global_batch_size >= 1 and 0 <= process_index < process_count; "
                             f"got {global_batch_size}, {process_index}, {process_count}.")
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}; every host must get the same number "
                             "of rows. Choose a multiple of the host count.")
        if len(tokens) < global_batch_size:
            raise ValueError(f"the data has {len(tokens)} sequences, fewer than one global batch of "
                             f"{global_batch_size}; use more data, a shorter seq_len or a smaller batch.")
        self.tokens = np.asarray(tokens, np.int32)
        self.loss_mask = np.asarray(loss_mask, bool)
        self.global_batch_size = global_batch_size
        self.per_host = global_batch_size // process_count
        self.process_index = process_index
        self.batches_per_epoch = len(tokens) // global_batch_size
        self.seed, self.epoch, self.position = seed, 0, 0
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def _permutation(self) -> np.ndarray:
        if self._order is None or self._order[0] != self.epoch:
            self._order = (self.epoch, epoch_order(self.seed, self.epoch, len(self.tokens)))
        return self._order[1]

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self) -> dict[str, np.ndarray]:
        if self.position >= self.batches_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        start = self.position * self.global_batch_size + self.process_index * self.per_host
        rows = self._permutation()[start:start + self.per_host]
        self.position += 1
        return {"input_ids": self.tokens[rows], "loss_mask": self.loss_mask[rows]}

    def next(self) -> dict[str, np.ndarray]:
        """This host's slice of the next global batch: `input_ids` int32 and `loss_mask` bool,
        both `[per_host, seq_len]`."""
        return next(self)

    def get_state(self) -> dict[str, Any]:
        """JSON-serialisable position in the stream (plus the data shape it is only valid for)."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "num_sequences": len(self.tokens), "global_batch_size": self.global_batch_size}

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the iterator that produced `state` was."""
        for key, value in (("num_sequences", len(self.tokens)),
                           ("global_batch_size", self.global_batch_size)):
            if key in state and state[key] != value:
                raise ValueError(f"the saved data-iterator state has {key}={state[key]}, this data "
                                 f"has {value}; resuming would not continue the same stream. Use the "
                                 "same data and global batch size as the run being resumed.")
        self.seed, self.epoch, self.position = int(state["seed"]), int(state["epoch"]), int(state["position"])
