"""Deterministic, resumable, sharded batches of example indices.

Each epoch uses a permutation drawn from `seed + epoch`, so the order depends on nothing but the seed
and the epoch number. The sampler's whole state is `(epoch, batch)`: saving it in a checkpoint and
restoring it continues with exactly the batch that would have come next.

With `world_size` ranks, every global batch holds `world_size * batch_size` indices and rank r takes
its own slice; the epoch is padded by wrapping around so that every rank always gets a full batch
(a rank with no data would stall the others at the gradient all-reduce).
"""

from __future__ import annotations

import torch

from rlhfkit.errors import ConfigError, RlhfkitError


def check_batch_size(num_items: int, batch_size: int, world_size: int = 1, *, key: str = "train.batch_size",
                     what: str = "training examples") -> None:
    """Refuse a global batch larger than the data: the epoch would repeat examples inside one batch
    (8 examples in a batch of 64 means each seen 8 times per "epoch"), and a huge batch would be
    allocated before anything else could complain."""
    if batch_size * world_size > num_items:
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise ConfigError(key, f"{batch_size}{per} is larger than the {num_items} {what}; lower it to at most "
                               f"{max(1, num_items // world_size)} or add data")


class BatchSampler:
    def __init__(
        self,
        num_items: int,
        batch_size: int,
        *,
        seed: int,
        shuffle: bool = True,
        rank: int = 0,
        world_size: int = 1,
        lengths: list[int] | None = None,
        group_by_length: bool = False,
    ) -> None:
        if num_items <= 0:
            raise ValueError("BatchSampler needs at least one item")
        self.num_items = num_items
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.lengths = lengths
        self.group_by_length = group_by_length and lengths is not None
        self.epoch = 0
        self.batch = 0
        self._order: list[int] | None = None

    @property
    def global_batch(self) -> int:
        return self.batch_size * self.world_size

    def batches_per_epoch(self) -> int:
        return -(-self.num_items // self.global_batch)

    def _epoch_order(self, epoch: int) -> list[int]:
        if self.shuffle:
            gen = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.num_items, generator=gen).tolist()
        else:
            order = list(range(self.num_items))
        if self.group_by_length:
            # Sort inside chunks of 32 global batches: batches hold similar lengths (little padding)
            # while the chunk order stays random.
            chunk = 32 * self.global_batch
            lengths = self.lengths
            order = [i for s in range(0, len(order), chunk)
                     for i in sorted(order[s:s + chunk], key=lambda j: -lengths[j])]  # type: ignore[index]
        total = self.batches_per_epoch() * self.global_batch
        while len(order) < total:
            order += order[: total - len(order)]
        return order

    def next(self) -> list[int]:
        """Indices of this rank's next batch; moves to the next epoch when one ends."""
        if self.batch >= self.batches_per_epoch():
            self.epoch += 1
            self.batch = 0
            self._order = None
        if self._order is None:
            self._order = self._epoch_order(self.epoch)
        start = self.batch * self.global_batch + self.rank * self.batch_size
        self.batch += 1
        return self._order[start : start + self.batch_size]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batch": self.batch, "seed": self.seed, "num_items": self.num_items}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_items") != self.num_items:
            raise RlhfkitError(
                f"the checkpoint was taken on {state.get('num_items')} training items but the data now has "
                f"{self.num_items}; resume needs the same data"
            )
        self.epoch, self.batch, self.seed = int(state["epoch"]), int(state["batch"]), int(state["seed"])
        self._order = None
