"""Training rows streamed from the sources, per host, the same global batches on any host count.

Every row slot j of the global batch (of size B) owns `lanes` lanes per source, lane
`j + B * (step % lanes)` serving it at `step`; a lane is one document in flight, tokenised when
it is read and followed by EOS and the lane's next document. Lane l of L = B * lanes reads, each
epoch, the shards at positions l, l + L, ... of the epoch's shuffled shard order, so a host
reads only the shards of its own slots' lanes. A source with fewer shards than lanes (the
built-in corpora, a few files) is read into memory once, and lane l takes documents l, l + L,
... of its epochs' shuffled orders. Each document enters its lane at a token offset drawn from
its id and the epoch, wrapping round to its start, so a short run sees the middles of long
documents, not only their openings. Which source fills a slot is drawn by the mixture weights
from `(seed, step)`.

Nothing here depends on the host count: host p materialises slots `[p * B / P, (p + 1) * B / P)`
of the batches one host would make. The state is five integers per lane (where its document is,
how much of it is used), gathered from every host into the checkpoint, so a run resumes exactly,
on any number of hosts; memory holds one document per lane, whatever the corpus's size.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from spellm_jax.data import sources
from spellm_jax.data.iterator import epoch_order

STATE_KIND = "streamed"
Position = tuple[int, int, int]


class SourceLanes:
    """Where each lane of one source finds its documents."""

    def __init__(self, spec: sources.SourceSpec, num_lanes: int, seed: int, source_index: int
                 ) -> None:
        self.spec, self.num_lanes = spec, num_lanes
        self.seed, self.source_index = seed, source_index
        self.shards = sources.shards(spec, "train")
        self.in_memory: list[tuple[str, str]] | None = None
        self._token_cache: dict[str, np.ndarray] = {}
        if len(self.shards) < num_lanes:
            self.in_memory = list(sources.split_documents(spec, "train"))
            if not self.in_memory:
                raise ValueError(f"{spec.entry}: no training documents.")

    def _order(self, epoch: int, size: int) -> np.ndarray:
        return np.random.default_rng([self.seed, self.source_index, epoch]).permutation(size)

    def read(self, lane: int, position: Position | None) -> Iterator[tuple[Position, str, str]]:
        """`(position, doc_id, text)` of lane `lane`'s documents from `position` on (its start
        for None); a position is `(epoch, shard, document)`, or `(item, 0, 0)` in memory."""
        if self.in_memory is not None:
            item, size = (lane if position is None else position[0]), len(self.in_memory)
            while True:
                epoch, index = divmod(item, size)
                yield (item, 0, 0), *self.in_memory[self._order(epoch, size)[index]]
                item += self.num_lanes
        epoch, first, start = position or (0, 0, 0)
        empty_epochs = 0
        while empty_epochs < 2:  # a whole epoch read without a training document: give up
            mine, found = self._order(epoch, len(self.shards))[lane::self.num_lanes], False
            for k in range(first, len(mine)):
                for number, (doc_id, text) in enumerate(
                        self.shards[mine[k]].documents(start), start):
                    if sources.in_split(self.spec, doc_id, "train"):
                        found = True
                        yield (epoch, k, number), doc_id, text
                start = 0
            empty_epochs = 0 if found else empty_epochs + 1
            epoch, first = epoch + 1, 0
        raise ValueError(f"{self.spec.entry}: lane {lane}'s shards hold no training documents.")

    def tokens(self, doc_id: str, text: str, tokenizer: Any) -> np.ndarray:
        """A document's ids followed by EOS (kept for the next lane where the source is in
        memory: its documents come round again and again)."""
        if self.in_memory is not None and doc_id in self._token_cache:
            return self._token_cache[doc_id]
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        eos = tokenizer.eos_token_id
        ids = np.asarray([*ids, eos] if not ids or ids[-1] != eos else ids, np.int32)
        if self.in_memory is not None:
            self._token_cache[doc_id] = ids
        return ids

    def next_position(self, position: Position) -> Position:
        """The position to read from after the document at `position`."""
        if self.in_memory is not None:
            return position[0] + self.num_lanes, 0, 0
        return position[0], position[1], position[2] + 1


class Lane:
    """One document in flight: its tokens (rotated) and how many are used."""

    def __init__(self, source: SourceLanes, index: int, tokenizer: Any, seed: int) -> None:
        self.source, self.index, self.tokenizer, self.seed = source, index, tokenizer, seed
        self.position: Position | None = None  # of the current document
        self.tokens, self.used = np.zeros(0, np.int32), 0
        self._reader: Iterator | None = None

    def _load(self, position: Position, doc_id: str, text: str) -> None:
        ids = self.source.tokens(doc_id, text, self.tokenizer)
        digest = hashlib.sha1(f"{self.seed}/{position[0]}/{doc_id}".encode()).hexdigest()
        self.position, self.tokens, self.used = position, np.roll(ids, -(int(digest[:8], 16)
                                                                        % len(ids))), 0

    def take(self, count: int) -> np.ndarray:
        """The next `count` tokens, reading further documents as needed."""
        pieces = []
        while count:
            if self.used == len(self.tokens):
                if self._reader is None:
                    start = None if self.position is None else self.source.next_position(
                        self.position)
                    self._reader = self.source.read(self.index, start)
                self._load(*next(self._reader))
            piece = self.tokens[self.used:self.used + count]
            self.used += len(piece)
            pieces.append(piece)
            count -= len(piece)
        return np.concatenate(pieces)

    def state(self) -> list[int]:
        return [0, 0, 0, 0, 0] if self.position is None else [1, *self.position, self.used]

    def restore(self, state: Sequence[int]) -> None:
        self._reader, self.position = None, None
        self.tokens, self.used = np.zeros(0, np.int32), 0
        if state[0]:
            position = tuple(int(v) for v in state[1:4])
            found, doc_id, text = next(self.source.read(self.index, position))
            if found != position:
                raise ValueError(f"{self.source.spec.entry}: the document at {position} of the "
                                 "saved data state is not there; the source changed since the "
                                 "checkpoint. Resume with the same data, or a fresh --workdir.")
            self._load(position, doc_id, text)
            self.used = int(state[4])


class MemoryRows:
    """Rows already packed in memory (the teacher's generations): each epoch in a new order."""

    def __init__(self, tokens: np.ndarray, loss_mask: np.ndarray, seed: int) -> None:
        self.tokens, self.loss_mask, self.seed = tokens, loss_mask, seed
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its order)

    def row(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Row `index` of the endless stream of epochs."""
        epoch, position = divmod(index, len(self.tokens))
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, epoch_order(self.seed, epoch, len(self.tokens)))
        chosen = self._order[1][position]
        return self.tokens[chosen], self.loss_mask[chosen]


@dataclasses.dataclass(frozen=True)
class DocumentSource:
    """A `data.corpora` source as the batches see it."""

    name: str
    weight: float
    lanes: SourceLanes


@dataclasses.dataclass(frozen=True)
class PackedSource:
    """Packed in-memory rows as the batches see them: the slot-th row of each batch."""

    name: str
    weight: float
    rows: MemoryRows


class StreamedBatches:
    """This host's slices of global batches mixed from several sources by weight."""

    def __init__(self, row_sources: Sequence[DocumentSource | PackedSource], tokenizer: Any,
                 seq_len: int, global_batch_size: int, lanes_per_slot: int, seed: int,
                 process_index: int = 0, process_count: int = 1) -> None:
        if global_batch_size % process_count:
            raise ValueError(f"global_batch_size={global_batch_size} is not divisible by "
                             f"process_count={process_count}; every host must get the same number "
                             "of rows. Choose a multiple of the host count.")
        if lanes_per_slot < 1:
            raise ValueError(f"data.lanes={lanes_per_slot}; each row slot needs at least one lane.")
        self.row_sources, self.seq_len, self.seed = list(row_sources), seq_len, seed
        self.names = [source.name for source in self.row_sources]
        weights = np.asarray([source.weight for source in self.row_sources], np.float64)
        self.weights = weights / weights.sum()
        self.global_batch_size, self.lanes_per_slot = global_batch_size, lanes_per_slot
        self.process_index, self.process_count = process_index, process_count
        self.per_host, self.step = global_batch_size // process_count, 0
        self.lanes = {(s, slot + global_batch_size * t): Lane(source.lanes,
                                                                slot + global_batch_size * t,
                                                                tokenizer, seed)
                      for s, source in enumerate(self.row_sources)
                      if isinstance(source, DocumentSource)
                      for slot in self._slots(process_index) for t in range(lanes_per_slot)}

    def _slots(self, process_index: int) -> range:
        return range(process_index * self.per_host, (process_index + 1) * self.per_host)

    def source_of_rows(self, step: int) -> np.ndarray:
        """The source of each row slot of global batch `step` `[global_batch_size]`."""
        if len(self.row_sources) == 1:
            return np.zeros(self.global_batch_size, np.int64)
        rng = np.random.default_rng([self.seed, 0x5EED, step])
        return rng.choice(len(self.row_sources), size=self.global_batch_size, p=self.weights)

    def _row(self, source: int, slot: int) -> tuple[np.ndarray, np.ndarray]:
        row_source = self.row_sources[source]
        if isinstance(row_source, PackedSource):
            return row_source.rows.row(self.step * self.global_batch_size + slot)
        lane = self.lanes[source, slot + self.global_batch_size * (self.step % self.lanes_per_slot)]
        return lane.take(self.seq_len), np.ones(self.seq_len, bool)

    def next(self) -> dict[str, np.ndarray]:
        """This host's slice of the next global batch: `input_ids` int32 and `loss_mask` bool,
        both `[per_host, seq_len]`."""
        chosen = self.source_of_rows(self.step)
        rows = [self._row(int(chosen[slot]), slot) for slot in self._slots(self.process_index)]
        self.step += 1
        return {"input_ids": np.stack([r[0] for r in rows]).astype(np.int32),
                "loss_mask": np.stack([r[1] for r in rows])}

    def peek_tokens(self, batches: int) -> np.ndarray:
        """The tokens of this host's next `batches` batches `[batches * per_host, seq_len]`,
        without moving the stream."""
        state = self._lane_states()
        step = self.step
        tokens = np.concatenate([self.next()["input_ids"] for _ in range(batches)])
        self.step = step
        for lane, values in zip(self.lanes.values(), state, strict=True):
            lane.restore(values)
        return tokens

    def _lane_states(self) -> np.ndarray:
        return np.asarray([lane.state() for lane in self.lanes.values()], np.int64).reshape(-1, 5)

    def get_state(self) -> dict[str, Any]:
        """The step and every lane's position, from all hosts (a collective on a multi-process
        run: every process calls it; hosts simulated in one process give only their own lanes)."""
        import jax

        local, hosts = self._lane_states(), [self.process_index]
        if jax.process_count() == self.process_count > 1:
            from jax.experimental import multihost_utils

            gathered = np.asarray(multihost_utils.process_allgather(local))
            hosts, local = list(range(self.process_count)), gathered.reshape(-1, 5)
        keys = [f"{s}/{lane}" for p in hosts for (s, lane) in self._host_lanes(p)]
        return {"kind": STATE_KIND, "sources": self.names, "seed": self.seed,
                "global_batch_size": self.global_batch_size, "lanes": self.lanes_per_slot,
                "step": self.step, "lane_states": dict(zip(keys, local.tolist(), strict=True))}

    def _host_lanes(self, process_index: int) -> list[tuple[int, int]]:
        """Host `process_index`'s lanes, in the order of `self.lanes` on that host."""
        return [(s, slot + self.global_batch_size * t) for s, source in enumerate(self.row_sources)
                if isinstance(source, DocumentSource)
                for slot in self._slots(process_index) for t in range(self.lanes_per_slot)]

    def set_state(self, state: dict[str, Any]) -> None:
        """Continue exactly where the batches that produced `state` were (on any host count)."""
        if state.get("kind") != STATE_KIND:
            raise ValueError("the checkpoint's data state is from spellm_jax's older in-memory "
                             "corpus reader; resume it with that version, or start a fresh "
                             "--workdir.")
        expected = {"sources": self.names, "global_batch_size": self.global_batch_size,
                    "lanes": self.lanes_per_slot, "seed": self.seed}
        for key, value in expected.items():
            if state[key] != value:
                raise ValueError(f"the saved data state has {key}={state[key]}, this run has "
                                 f"{value}; resuming would not continue the same stream. Resume "
                                 "with the same data.corpora, data.lanes, batch size and seed.")
        missing = [f"{s}/{lane}" for s, lane in self.lanes if f"{s}/{lane}" not in
                   state["lane_states"]]
        if missing:
            raise ValueError(f"the saved data state lacks lanes {missing[:4]} of this host; it "
                             "was written by a host that saw only its own lanes.")
        self.step = int(state["step"])
        for (s, lane_index), lane in self.lanes.items():
            lane.restore(state["lane_states"][f"{s}/{lane_index}"])
