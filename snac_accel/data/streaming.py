"""Streaming (``--streaming``): a `datasets.IterableDataset` per process, and its checkpointed position.

The stream is split across processes with ``split_dataset_by_node`` and shuffled with a buffer;
`StreamingLoader` records how many rows each loader worker has consumed, and registered with
``accelerator.register_for_checkpointing`` it puts that position into checkpoints.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional, Sequence

import datasets
import torch
from accelerate.logging import get_logger

from .clips import MAX_REPLACEMENTS, ExcerptSpec, excerpt_from_row, row_name, sample_seed
from .loaders import default_num_workers, make_loader
from .sources import DataError, audio_column

logger = get_logger(__name__)


def check_stream(source: Any, name: str, spec: ExcerptSpec, probes: int = 16) -> None:
    """Refuse a streamed source whose first rows hold no usable clip (streams cannot be probed at random)."""
    feature = datasets.Audio(sampling_rate=spec.sample_rate, num_channels=1)
    problems = []
    for row, example in enumerate(source.take(probes)):
        clip = excerpt_from_row(feature, example["audio"], spec, None)
        if clip.audio is not None:
            return
        problems.append(f"{row_name(example['audio'], f'row {row}')}: {clip.problem}")
    raise DataError(f"the streamed source {name} has no usable clip among its first {len(problems)} rows"
                    + (": " + "; ".join(problems[:3]) if problems else " (it is empty)"))


def mix_streams(sources: Sequence[Any], weights: Optional[Sequence[float]], seed: int) -> Any:
    """One stream from several: by ``weights`` when given, else alternating.

    ``all_exhausted`` rather than the default ``first_exhausted``: an epoch ends when every source
    has given each of its rows at least once (small sources repeat as their weight asks), so no
    row of a large but lightly weighted source is silently never trained on.
    """
    if len(sources) == 1:
        return sources[0]
    return datasets.interleave_datasets(list(sources), probabilities=list(weights) if weights else None, seed=seed,
                                        stopping_strategy="all_exhausted")


class StreamingClips(torch.utils.data.IterableDataset):
    """Excerpts from a `datasets.IterableDataset` for one process: split by node, shuffled, endless.

    Each loader worker reads its own shards (datasets splits them), decodes inside the worker and
    goes on to the next epoch when its part runs out, so every process yields batches for as long
    as training asks (no rank waits at an epoch end). Items carry ``position`` = (worker, epoch,
    rows read in that epoch); starting from ``positions`` skips rows without decoding them. The
    row stream of (seed, epoch, rank, worker) is fixed, and an excerpt's randomness is seeded from
    (seed, rank, worker, epoch, row), so a resumed run continues the same stream.
    """

    def __init__(self, stream: Any, spec: ExcerptSpec, seed: int = 0, rank: int = 0, world_size: int = 1,
                 shuffle_buffer_size: int = 1000) -> None:
        from datasets.distributed import split_dataset_by_node

        stream = audio_column(stream)
        if shuffle_buffer_size > 1:
            stream = stream.shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        self.stream = split_dataset_by_node(stream, rank=rank, world_size=world_size) if world_size > 1 else stream
        self.spec, self.seed, self.rank = spec, seed, rank
        self.positions: dict[int, tuple[int, int]] = {}

    def rows(self, epoch: int) -> Iterator[dict[str, Any]]:
        """The undecoded rows this process (and, inside a loader worker, this worker) reads in ``epoch``."""
        self.stream.set_epoch(epoch)
        return iter(self.stream)

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        worker = info.id if info is not None else 0
        feature = datasets.Audio(sampling_rate=self.spec.sample_rate, num_channels=1)
        epoch, skip = self.positions.get(worker, (0, 0))
        bad: list[str] = []
        while True:
            read = 0
            for example in self.rows(epoch):
                read += 1
                if read <= skip:
                    continue
                raw = example["audio"]
                generator = torch.Generator().manual_seed(sample_seed(self.seed, self.rank, worker, epoch, read))
                clip = excerpt_from_row(feature, raw, self.spec, generator)
                if clip.audio is None:
                    bad.append(f"{row_name(raw, f'row {read} of epoch {epoch}')}: {clip.problem}")
                    if len(bad) >= MAX_REPLACEMENTS:
                        yield {"audio": None, "bad": bad, "position": (worker, epoch, read)}
                        bad = []
                    continue
                yield {"audio": clip.audio, "bad": bad, "position": (worker, epoch, read)}
                bad = []
            if read == 0:  # this worker was given no shard: the others carry the stream
                return
            epoch, skip = epoch + 1, 0


class StreamingLoader:
    """Batches from `StreamingClips` plus their position, for ``accelerator.register_for_checkpointing``.

    A torch loader takes batches from its workers in turn, always starting with worker 0; after a
    resume the next batch is due from another worker, so batches are handed out in the saved turn
    order (at most one batch per worker waits). ``state_dict`` gathers every process's positions
    (each process reads other rows), so it must be called on all processes, as
    ``accelerator.save_state`` does. Resuming with a different number of processes or workers
    restarts the saved epoch from its beginning.
    """

    def __init__(self, clips: StreamingClips, batch_size: int, num_workers: Optional[int], pin_memory: bool,
                 world_size: int = 1) -> None:
        self.clips = clips
        self.batch_size, self.pin_memory, self.world_size = batch_size, pin_memory, world_size
        self.num_workers = default_num_workers() if num_workers is None else num_workers
        self.positions: dict[int, tuple[int, int]] = {}
        self.last_worker = -1

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Nothing to do: the stream is endless and its position is restored by `load_state_dict`."""

    def _active_workers(self) -> int:
        """Workers that get rows: datasets gives each worker whole shards, none to those beyond them."""
        shards = getattr(self.clips.stream, "n_shards", None) or 1
        return max(1, min(max(1, self.num_workers), shards))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        self.clips.positions = dict(self.positions)
        loader = make_loader(self.clips, None, self.num_workers, self.pin_memory, batch_size=self.batch_size,
                             persistent=False)
        active = self._active_workers()
        due = (self.last_worker + 1) % active
        waiting: dict[int, list[dict[str, Any]]] = {}
        for batch in loader:
            waiting.setdefault(batch["position"][0], []).append(batch)
            if sum(map(len, waiting.values())) > 4 * active:  # a worker stopped early: take what has come
                logger.warning("a streaming worker stopped yielding; batch order no longer follows the saved turns")
                due = next(w for w, queue in waiting.items() if queue)
            while waiting.get(due):
                ready = waiting[due].pop(0)
                worker, epoch, read = ready.pop("position")
                self.positions[worker], self.last_worker = (epoch, read), worker
                due = (due + 1) % active
                yield ready

    def state_dict(self) -> dict[str, Any]:
        mine = {"rank": self.clips.rank, "positions": dict(self.positions), "last_worker": self.last_worker}
        if self.world_size > 1:
            from accelerate.utils import gather_object

            ranks = gather_object([mine])
        else:
            ranks = [mine]
        return {"num_workers": max(1, self.num_workers), "world_size": self.world_size,
                "ranks": {entry["rank"]: entry for entry in ranks}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = state["ranks"].get(self.clips.rank, {})
        positions, self.last_worker = mine.get("positions", {}), int(mine.get("last_worker", -1))
        if state["num_workers"] != max(1, self.num_workers) or state["world_size"] != self.world_size:
            epoch = min((e for r in state["ranks"].values() for e, _ in r["positions"].values()), default=0)
            logger.warning(f"the checkpoint streamed with {state['world_size']} processes x {state['num_workers']} "
                           f"workers, this run has {self.world_size} x {max(1, self.num_workers)}: restarting "
                           f"epoch {epoch} of the stream from its beginning")
            positions, self.last_worker = {w: (epoch, 0) for w in range(max(1, self.num_workers))}, -1
        self.positions = {int(w): (int(e), int(r)) for w, (e, r) in positions.items()}
