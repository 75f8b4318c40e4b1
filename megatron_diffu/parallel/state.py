"""`ProcessGrid`: the TP x DP x PP layout of the ranks and their process groups.

Rank order is Megatron's: ``rank = pp_rank * (dp * tp) + dp_rank * tp + tp_rank`` (TP fastest,
so a TP group sits on one node). `ProcessGrid.build` needs `torch.distributed` initialised and
creates every group on every rank in the same order (a `new_group` requirement), including
size-1 groups: a real group of size 1 is safe to pass to any collective, whereas `None` would
mean the WORLD group to torch. Only `ProcessGrid.single()` (no torch.distributed at all) has
`None` groups; every helper in `parallel/` treats `None` or size 1 as "no communication".

Extra groups beyond DESIGN.md: `embedding_group` (first + last pipeline stage of one
(dp, tp) position: the tied-embedding gradient all-reduce when PP > 1), `amax_group` (the TP x DP
ranks of one pipeline stage: every rank holding a shard or a replica of a stage's weights, the FP8
amax reduction group, Megatron's `get_amax_reduction_group`; no context parallelism here), and the
global-rank lists `tp_ranks`, `dp_ranks`, `pp_ranks`, `amax_ranks` of this rank's groups.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch.distributed as dist

Group = Any  # torch.distributed.ProcessGroup or None


@dataclass
class ProcessGrid:
    tp_size: int = 1
    pp_size: int = 1
    dp_size: int = 1
    tp_rank: int = 0
    pp_rank: int = 0
    dp_rank: int = 0
    rank: int = 0
    world_size: int = 1
    tp_group: Group = None
    pp_group: Group = None
    dp_group: Group = None
    mp_group: Group = None  # tp x pp: model-parallel group (grad norm, loss broadcast)
    embedding_group: Group = None
    world_group: Group = None
    amax_group: Group = None  # tp x dp of this pipeline stage: FP8 amax reduction
    tp_ranks: list[int] = field(default_factory=lambda: [0])
    dp_ranks: list[int] = field(default_factory=lambda: [0])
    pp_ranks: list[int] = field(default_factory=lambda: [0])
    amax_ranks: list[int] = field(default_factory=lambda: [0])

    # ------------------------------------------------------------------ construction
    @classmethod
    def single(cls) -> "ProcessGrid":
        """One process, no torch.distributed: every group None, every size 1, every rank 0."""
        return cls()

    @staticmethod
    def rank_of(pp_rank: int, dp_rank: int, tp_rank: int, tp_size: int, dp_size: int) -> int:
        return pp_rank * dp_size * tp_size + dp_rank * tp_size + tp_rank

    @classmethod
    def build(cls, tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1) -> "ProcessGrid":
        """Build the grid over the whole world (torch.distributed must be initialised)."""
        tp, pp = int(tensor_model_parallel_size), int(pipeline_model_parallel_size)
        if not dist.is_available() or not dist.is_initialized():
            raise RuntimeError(
                "ProcessGrid.build needs torch.distributed initialised: call "
                "megatron_diffu.parallel.launch.init_distributed() first (or torchrun), "
                "or use ProcessGrid.single() for a one-process run")
        world, rank = dist.get_world_size(), dist.get_rank()
        dp = validate_layout(world, tp, pp)
        coords = {r: (r // (dp * tp), (r // tp) % dp, r % tp) for r in range(world)}  # (pp, dp, tp)
        pp_rank, dp_rank, tp_rank = coords[rank]
        ro = lambda p, d, t: cls.rank_of(p, d, t, tp, dp)  # noqa: E731
        mine: dict[str, Any] = {}

        def make(kind: str, rank_lists: list[list[int]]) -> None:
            # every rank creates every group in the same order; keep the one containing us
            for ranks in rank_lists:
                group = dist.new_group(ranks)
                if rank in ranks:
                    mine[kind] = (group, ranks)

        make("tp", [[ro(p, d, t) for t in range(tp)] for p in range(pp) for d in range(dp)])
        make("dp", [[ro(p, d, t) for d in range(dp)] for p in range(pp) for t in range(tp)])
        make("pp", [[ro(p, d, t) for p in range(pp)] for d in range(dp) for t in range(tp)])
        make("mp", [[ro(p, d, t) for p in range(pp) for t in range(tp)] for d in range(dp)])
        make("emb", [sorted({ro(0, d, t), ro(pp - 1, d, t)}) for d in range(dp) for t in range(tp)])
        make("amax", [[ro(p, d, t) for d in range(dp) for t in range(tp)] for p in range(pp)])
        return cls(tp_size=tp, pp_size=pp, dp_size=dp, tp_rank=tp_rank, pp_rank=pp_rank, dp_rank=dp_rank,
                   rank=rank, world_size=world, tp_group=mine["tp"][0], pp_group=mine["pp"][0],
                   dp_group=mine["dp"][0], mp_group=mine["mp"][0], embedding_group=mine["emb"][0],
                   world_group=dist.group.WORLD, amax_group=mine["amax"][0], tp_ranks=mine["tp"][1],
                   dp_ranks=mine["dp"][1], pp_ranks=mine["pp"][1], amax_ranks=mine["amax"][1])

    # ------------------------------------------------------------------ pipeline helpers
    @property
    def is_first_stage(self) -> bool:
        return self.pp_rank == 0

    @property
    def is_last_stage(self) -> bool:
        return self.pp_rank == self.pp_size - 1

    @property
    def next_rank(self) -> int:
        """Global rank of the next pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank + 1) % self.pp_size]

    @property
    def prev_rank(self) -> int:
        """Global rank of the previous pipeline stage (wraps around)."""
        return self.pp_ranks[(self.pp_rank - 1) % self.pp_size]

    @property
    def tp_src_rank(self) -> int:
        """Global rank of TP rank 0 in this rank's TP group (for broadcasts within TP)."""
        return self.tp_ranks[0]

    def __repr__(self) -> str:  # groups are noisy; show the layout
        return (f"ProcessGrid(rank={self.rank}/{self.world_size}, tp={self.tp_rank}/{self.tp_size}, "
                f"dp={self.dp_rank}/{self.dp_size}, pp={self.pp_rank}/{self.pp_size})")


def validate_layout(world_size: int, tp: int, pp: int) -> int:
    """Check world = tp * pp * dp; return dp. Errors name the flags to change."""
    if tp < 1 or pp < 1:
        raise ValueError(f"--tensor-model-parallel-size ({tp}) and --pipeline-model-parallel-size ({pp}) must be >= 1")
    if world_size % (tp * pp):
        raise ValueError(
            f"world size {world_size} is not divisible by tensor_model_parallel_size * "
            f"pipeline_model_parallel_size = {tp} * {pp} = {tp * pp}: launch a multiple of {tp * pp} "
            f"processes or change --tensor-model-parallel-size / --pipeline-model-parallel-size")
    return world_size // (tp * pp)


def group_size(group: Optional[Group]) -> int:
    """World size of a group; None means 'no communication' (size 1)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size(group)


def group_rank(group: Optional[Group]) -> int:
    if group is None or not dist.is_available() or not dist.is_initialized():
        return 0
    return dist.get_rank(group)
