"""One rank's share of a plan: its sample ids per step and its spare candidates, as flat numpy arrays.

`plan.Plan` holds every rank's rows (8 bytes per sample of the stage); a rank keeps only its own row of each
step plus, per bucket of the stage, the spare candidates dealt to it — so what it holds between plans is
O(stage samples / world size). The full plan exists only while this is built.

Spares: the candidates of a bucket are its ids the plan left out this epoch first, then the others (repeats),
dealt i ≡ rank (mod world size), so two ranks never hold the same candidate. `cand_step[j]` is the step in
which candidate j is planned on any rank (-1: in no step), so "never one planned in that step" is one array
comparison instead of a search over the plan. An id the plan schedules twice (a carried-in sample that also
trains for its own epoch, `plan.Plan.repeats`) is no candidate: it has two steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .plan import Plan


@dataclass(eq=False)
class RankPlan:
    """Steps [offset, offset + num_steps) of one (stage, epoch, segments) plan, seen from one rank.

    ids: int64 (sum of per-rank counts,) this rank's samples, step after step; ptr: int64 (num_steps + 1,)
    step i is ids[ptr[i]:ptr[i+1]]; step_bucket: int32 (num_steps,) index into `buckets`; n_micro: int32
    (num_steps,) micro-batches of the step (the same on every rank); cands / cand_step / cand_left: per
    bucket, int64 / int32 / bool (this rank's candidates,), in the order they are tried.
    """

    offset: int
    world_size: int
    buckets: list[str]
    ids: np.ndarray
    ptr: np.ndarray
    step_bucket: np.ndarray
    n_micro: np.ndarray
    cands: dict[str, np.ndarray]
    cand_step: dict[str, np.ndarray]
    cand_left: dict[str, np.ndarray]

    @property
    def num_steps(self) -> int:
        return int(self.step_bucket.shape[0])

    @property
    def end(self) -> int:
        """First step-in-epoch after this plan."""
        return self.offset + self.num_steps

    def step(self, s: int) -> tuple[str, np.ndarray, int]:
        """(bucket, this rank's ids, n_micro) of step-in-epoch s."""
        i = s - self.offset
        return self.buckets[int(self.step_bucket[i])], self.ids[self.ptr[i]:self.ptr[i + 1]], int(self.n_micro[i])

    def nbytes(self) -> int:
        """Bytes of every array held (the per-rank state the scale test compares across dataset sizes)."""
        arrays = [self.ids, self.ptr, self.step_bucket, self.n_micro, *self.cands.values(),
                  *self.cand_step.values(), *self.cand_left.values()]
        return int(sum(a.nbytes for a in arrays))

    def next_spare(self, bucket: str, s: int, start: int) -> int:
        """Index >= start of the first candidate of `bucket` not planned on any rank in step s; len() if none."""
        steps = self.cand_step[bucket][start:]
        hit = np.flatnonzero(steps != s - self.offset)
        return start + int(hit[0]) if hit.size else int(steps.shape[0]) + start

    @classmethod
    def of(cls, plan: Plan, offset: int, rank: int, grad_accum: int,
           bucket_ids: dict[str, np.ndarray]) -> RankPlan:
        """`bucket_ids`: every id of each bucket of the stage (ascending), e.g. `plan.sample_ids_by_bucket`."""
        n = len(plan.steps)
        index = {b: i for i, b in enumerate(plan.buckets)}
        per_rank = np.array([st.samples.shape[1] for st in plan.steps], np.int64)
        ptr = np.zeros(n + 1, np.int64)
        np.cumsum(per_rank, out=ptr[1:])
        ids = (np.concatenate([st.samples[rank] for st in plan.steps]).astype(np.int64) if n
               else np.zeros(0, np.int64))
        # All rows of a step have the same length, so n_micro is a function of the plan only: every rank runs
        # the same number of forward/backward passes.
        n_micro = np.minimum(grad_accum, per_rank).astype(np.int32)
        step_bucket = np.array([index[st.bucket] for st in plan.steps], np.int32)

        # Step of every planned id, dense over the id range (transient: 4 bytes a sample of the dataset), read
        # at this rank's candidates only. Sorted-array lookups, not np.intersect1d / setdiff1d: those hash
        # every id (seconds at 10⁶) where the bucket's ids are already ascending.
        every = plan.scheduled_ids()
        top = max([int(every.max()) + 1 if every.size else 0]
                  + [int(v[-1]) + 1 for v in bucket_ids.values() if len(v)])
        step_of = np.full(top, -1, np.int32)
        step_of[every] = np.repeat(np.arange(n, dtype=np.int32), [st.samples.size for st in plan.steps])
        twice = plan.repeats() if plan.carried_in.size else np.zeros(0, np.int64)
        dropped = np.asarray(plan.dropped, np.int64)
        cands, cand_step, cand_left = {}, {}, {}
        for b in plan.buckets:
            all_ids = np.asarray(bucket_ids.get(b, np.zeros(0, np.int64)), np.int64)
            if twice.size and all_ids.size:
                pos = np.minimum(np.searchsorted(twice, all_ids), twice.size - 1)
                all_ids = all_ids[twice[pos] != all_ids]
            is_left = np.zeros(all_ids.size, bool)
            if all_ids.size and dropped.size:
                pos = np.minimum(np.searchsorted(all_ids, dropped), all_ids.size - 1)
                is_left[pos[all_ids[pos] == dropped]] = True
            n_left = int(is_left.sum())
            order = np.concatenate([all_ids[is_left], all_ids[~is_left]])
            take = np.arange(rank, order.size, plan.world_size)
            cands[b] = order[take]
            cand_step[b] = step_of[cands[b]]
            cand_left[b] = take < n_left
        return cls(offset=int(offset), world_size=int(plan.world_size), buckets=list(plan.buckets), ids=ids,
                   ptr=ptr, step_bucket=step_bucket, n_micro=n_micro, cands=cands, cand_step=cand_step,
                   cand_left=cand_left)
