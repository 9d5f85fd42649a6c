"""Offline bucket-balanced sampling plan: for each step of an epoch, one bucket and every rank's sample ids.

The plan is computed from the preprocessing manifest before training (DESIGN.md, "Data"). A *global sample
id* is the index into the concatenation of all shards' ``keys`` lists in manifest order. Every step draws
from ONE bucket on all ranks (``Step.samples`` has one row per rank, all rows the same length), so no rank
ever waits on another with a different shape. The per-rank batch of a bucket follows a token budget
(:func:`bucket_batch_size`): ``per_rank * tokens <= token_budget`` on every step, so the budget is the
number a user sizes activation memory with (a bucket whose ONE sample is over budget runs one per rank and
is listed in :func:`plan_stats`'s ``over_budget``).

Carried remainders (``carry=True``; the trainer's loader, and ``motif-plan --carry``, plan every epoch that starts
on two or more ranks this way, :func:`carries`). A step is *full* when it carries >= ``min_fill`` (90 %) of its
bucket's full per-rank batch ``b`` (:func:`full_batch_need`; ``b`` is the token-budget batch, so that is also >=
90 % of what the budget admits for the bucket). Per bucket, every rank takes its ``n // world_size`` samples
plus what the previous epoch carried in, cut into steps of ``b`` or, balanced, of ``q // steps`` or one more
when that keeps every step full (:func:`_carry_steps`). What cannot fill a step (a tail of ``t < need`` per
rank: 3 images where 32 fit, 1 clip where 2 fit) is neither a short step nor left out: those ``t * world_size``
samples are *carried* into the next epoch's plan (``Plan.carried``), which trains them (``Plan.carried_in``) in
its first step of the bucket, for the epoch they belong to. Each sample not left out is thus trained once per
epoch, at most one epoch late. A carried-in sample whose own instance of the new epoch is not carried on trains
twice in that plan, once for each epoch (``Plan.repeats``; never in one step: the carried-in fill the bucket's
first step, those repeats its last); of the totals it could schedule the plan takes the one that repeats fewest.
Only the ``< world_size`` remainder of a bucket is left out (``dropped``), from a window that moves over the
bucket each epoch, so no sample is left out in two consecutive epochs. Short steps remain only where a bucket's
own samples fill less than one full step per rank (``n // world_size < b`` and under 90 % of it): carrying there
would put one sample twice into a step. The carry is a function of the counts, the world size and the epoch —
:func:`carried_in_per_rank`, an integer recursion over the stage's epochs that is periodic, so O(need) — and the
carried ids a fixed prefix of the bucket's order, so every plan is recomputed exactly from (seed, epoch) on
resume. After a world-size change inside an epoch (:func:`replan`) the next epoch counts its carry at the new
world size, so up to a bucket's tail of samples may then train twice or miss that epoch (``carry_lost`` names
carried-in ids the resized plan could not place). ``carry=False`` (the default of :func:`build_plan` and
:func:`replan`) is the standalone epoch below, unchanged: nothing carried, no id twice in a plan.

Tail folding without carry (:func:`_bucket_steps`): each bucket's ``q = n // world_size`` samples per rank are cut into
``s = ceil(q / b)`` steps. If the last step would carry less than ``min_fill`` of the budget (a *short*
step: 3 images where 32 fit; :func:`min_step_batch`), the bucket's steps are balanced instead (sizes
``q // s`` or one more) when that keeps every step at >= ``min_fill``; otherwise the short tail is left out
of this epoch (cheapest tails first, while the plan's total left-out stays <= ``max_drop`` of the stage),
and kept as a short step only when neither fits (a bucket smaller than one step, or the allowance is
spent). Left-out ids are random (the bucket is shuffled per epoch), so nothing is left out systematically
across epochs.

Utilization (used / stage samples, used = trained in this plan or carried into the next) per epoch: < ``world_size``
samples per bucket are always left out (every rank takes the same number), plus (without carry) folded tails
within ``max_drop``; it is therefore >= 97% as soon as every bucket holds >= 34 * world_size samples, and >= 99%
on realistic data; it is lower only for tiny buckets (a bucket with fewer than ``world_size`` samples is dropped
entirely).

Everything is deterministic from (manifest, buckets, world_size, token_budget, seed, epoch, exclude):
random generators are seeded with a SHA-256 of the bucket name (never Python's salted ``hash``).
:func:`replan` handles a change of world size inside an epoch without repeating a consumed sample.
Plans are saved as a compressed ``.npz`` (no pickle).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .split import heldout_counts, heldout_ids_by_bucket

PLAN_FORMAT = 2  # 2: carry (meta[6]) and the carried_in / carried / carry_lost arrays; format 1 still loads
_U64 = 2**64
MIN_FILL = 0.9  # a step with fewer than this share of its bucket's full per-rank batch is "short"
MAX_DROP = 0.01  # folding short tails may leave out samples while the plan leaves out <= 1 % in total


def _stable_int(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little")


def _rng(seed: int, epoch: int, tag: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) % _U64, int(epoch) % _U64, _stable_int(tag)])


def bucket_batch_size(tokens: int, token_budget: int, *, attention_aware: bool = False,
                      ref_tokens: int | None = None, base_tokens: int | None = None) -> int:
    """Per-RANK batch size of a bucket whose samples have ``tokens`` DiT video tokens.

    Plain: ``max(1, token_budget // tokens)``: a rank never holds more than ``token_budget`` video tokens
    in a step (activation memory is linear in tokens with flash / cuDNN attention), unless one sample
    alone is larger.

    Attention-aware: the same bound, and batches of longer clips shrink further so that every bucket's
    step costs about the same compute. A sample of N tokens costs ``c(N) = N + N**2 / ref`` (linear layers
    ~N, self-attention ~N**2, the quadratic term normalised so that both halves weigh the same at
    ``ref``, the stage's largest bucket). The shortest bucket of the stage (``base``) fills the budget,
    ``b0 = token_budget // base``, and a bucket of N tokens gets ``round(b0 * c(base) / c(N))``, capped
    at the plain batch: rounding (not flooring) because the compute match is a target while the token
    bound is the hard limit (2 clips of 32,760 tokens next to 31,941-token ones stay 2, not 1).
    ``ref`` and ``base`` default to ``tokens`` (then it equals the plain rule); :func:`build_plan` passes
    the stage's largest and smallest bucket. Exact integer arithmetic.
    """
    tokens, token_budget = int(tokens), int(token_budget)
    if tokens < 1 or token_budget < 1:
        raise ValueError(f"tokens={tokens} and token_budget={token_budget} must be >= 1")
    plain = max(1, token_budget // tokens)
    if not attention_aware:
        return plain
    ref = tokens if ref_tokens is None else int(ref_tokens)
    base = tokens if base_tokens is None else int(base_tokens)
    if ref < 1 or base < 1:
        raise ValueError(f"ref_tokens={ref} and base_tokens={base} must be >= 1")
    # c(N) * ref = N (ref + N); round(x / y) == (2x + y) // (2y)
    target = max(1, token_budget // base) * base * (ref + base)
    cost = tokens * (ref + tokens)
    return max(1, min(plain, (2 * target + cost) // (2 * cost)))


def effective_tokens(tokens: int, *, attention_aware: bool, ref_tokens: int, base_tokens: int) -> float:
    """What one sample counts against the budget in the planner's cost model: N (plain), or
    ``N (ref + N) / (ref + base)`` (attention-aware: the stage's shortest bucket counts its tokens, longer
    clips more for their attention). A full step's ``per_rank * effective_tokens`` is ~ the budget."""
    if not attention_aware:
        return float(tokens)
    return tokens * (ref_tokens + tokens) / (ref_tokens + base_tokens)


def sample_ids_by_bucket(manifest: dict, *, heldout: bool = False) -> dict[str, np.ndarray]:
    """Global sample ids (int64, ascending) of every bucket named in the manifest's ``buckets``/``shards``:
    the TRAINING ids, i.e. without the held-out (validation) ids of the manifest's ``val_split``
    (``data/split.py``), so no plan — any epoch, stage, carry on or off, after ``replan`` — and no spare ever
    holds one. ``heldout=True``: every id, held-out ones included."""
    chunks: dict[str, list[np.ndarray]] = {name: [] for name in manifest.get("buckets", {})}
    start = 0
    for shard in manifest.get("shards", []):
        n = len(shard["keys"]) if "keys" in shard else int(shard["samples"])
        chunks.setdefault(shard["bucket"], []).append(np.arange(start, start + n, dtype=np.int64))
        start += n
    out = {k: (np.concatenate(v) if v else np.zeros(0, np.int64)) for k, v in chunks.items()}
    if not heldout:
        for b, held in heldout_ids_by_bucket(manifest).items():
            if held.size and b in out:
                out[b] = out[b][~np.isin(out[b], held)]
    return out


def _stage_buckets(manifest: dict, buckets: list[str]) -> list[str]:
    known = manifest.get("buckets", {})
    names = list(dict.fromkeys(str(b) for b in buckets))  # dedupe, keep order
    if not names:
        raise ValueError("no buckets given for the stage")
    for b in names:
        if b not in known:
            raise ValueError(f"bucket {b!r} is not in the manifest; the manifest has buckets: "
                             f"{', '.join(sorted(known)) or '(none)'}")
    return names


@dataclass(eq=False)
class Step:
    """One global step: every rank draws from ``bucket``; ``samples[r]`` are rank r's global sample ids."""

    bucket: str
    samples: np.ndarray  # int64, (world_size, per_rank)

    @property
    def per_rank(self) -> int:
        return int(self.samples.shape[1])


@dataclass(eq=False)
class Plan:
    """One epoch (or the rest of one, after :func:`replan`) of steps.

    ``total`` counts the samples the plan was built over (the stage's samples minus ``exclude``): this
    epoch's instances. Without carry every one of them is either scheduled exactly once or in ``dropped``.
    With carry (``carry=True``) each is scheduled, in ``carried`` (trained in the next epoch's plan) or in
    ``dropped`` (left out); the steps also hold ``carried_in`` (the previous epoch's carried ids, trained here for
    that epoch), so an id of ``carried_in`` may be scheduled twice in the plan (``repeats``), never in one step.
    ``carry_lost``: carried-in ids that could not be trained (only after a world-size change inside the epoch).
    """

    steps: list[Step]
    world_size: int
    epoch: int
    seed: int
    buckets: list[str]
    dropped: np.ndarray
    total: int
    token_budget: int = 0
    attention_aware: bool = False
    per_rank_batch: list[int] = field(default_factory=list)  # full-step batch, aligned with ``buckets``
    carry: bool = False
    carried_in: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    carried: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    carry_lost: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))

    @property
    def num_steps(self) -> int:
        return len(self.steps)

    @property
    def scheduled(self) -> int:
        """Sample instances in the steps (carried-in ones included)."""
        return int(sum(s.samples.size for s in self.steps))

    @property
    def utilization(self) -> float:
        """Used / total, used = trained in this plan or carried into the next (1.0 for an empty plan)."""
        return 1.0 - int(np.asarray(self.dropped).size) / self.total if self.total else 1.0

    @property
    def trained_fraction(self) -> float:
        """This epoch's instances trained in this plan / total (carried-out ones train in the next plan)."""
        return (self.scheduled - int(self.carried_in.size)) / self.total if self.total else 1.0

    def repeats(self) -> np.ndarray:
        """Ids scheduled twice in this plan (a carried-in instance and this epoch's own), ascending."""
        ids = self.scheduled_ids()
        if not ids.size:
            return ids
        u, c = np.unique(ids, return_counts=True)
        return u[c > 1]

    def scheduled_ids(self) -> np.ndarray:
        if not self.steps:
            return np.zeros(0, np.int64)
        return np.concatenate([s.samples.ravel() for s in self.steps])

    def to_arrays(self) -> dict[str, np.ndarray]:
        """Flat arrays (the ``.npz`` layout): step buckets as indices into ``buckets``, ids, offsets, shapes."""
        index = {b: i for i, b in enumerate(self.buckets)}
        shapes = np.array([s.samples.shape for s in self.steps], np.int64).reshape(-1, 2)
        offsets = np.zeros(len(self.steps) + 1, np.int64)
        np.cumsum(shapes[:, 0] * shapes[:, 1], out=offsets[1:])
        return {
            "format": np.array([PLAN_FORMAT], np.int64),
            "meta": np.array([self.world_size, self.epoch, self.seed, self.total, self.token_budget,
                              int(self.attention_aware), int(self.carry)], np.int64),
            "buckets": np.array(self.buckets, dtype=np.str_).reshape(-1),
            "per_rank_batch": np.array(self.per_rank_batch, np.int64).reshape(-1),
            "step_bucket": np.array([index[s.bucket] for s in self.steps], np.int32).reshape(-1),
            "step_shape": shapes,
            "offsets": offsets,
            "ids": self.scheduled_ids().astype(np.int64),
            "dropped": np.asarray(self.dropped, np.int64).reshape(-1),
            "carried_in": np.asarray(self.carried_in, np.int64).reshape(-1),
            "carried": np.asarray(self.carried, np.int64).reshape(-1),
            "carry_lost": np.asarray(self.carry_lost, np.int64).reshape(-1),
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:  # a file object: np.savez would otherwise append ".npz"
            np.savez_compressed(f, **self.to_arrays())

    @classmethod
    def load(cls, path: str | Path) -> Plan:
        with np.load(path, allow_pickle=False) as z:
            a = {k: z[k] for k in z.files}
        if int(a["format"][0]) not in (1, PLAN_FORMAT):
            raise ValueError(f"{path}: plan format {int(a['format'][0])}, expected {PLAN_FORMAT} (or 1)")
        world_size, epoch, seed, total, token_budget, aa, *rest = (int(v) for v in a["meta"])
        empty = np.zeros(0, np.int64)
        buckets = [str(b) for b in a["buckets"].tolist()]
        ids, offsets = a["ids"], a["offsets"]
        steps = [Step(buckets[int(bi)], ids[offsets[i]:offsets[i + 1]].reshape(int(shp[0]), int(shp[1])))
                 for i, (bi, shp) in enumerate(zip(a["step_bucket"], a["step_shape"], strict=True))]
        return cls(steps=steps, world_size=world_size, epoch=epoch, seed=seed, buckets=buckets,
                   dropped=a["dropped"], total=total, token_budget=token_budget, attention_aware=bool(aa),
                   per_rank_batch=[int(v) for v in a["per_rank_batch"]], carry=bool(rest and rest[0]),
                   carried_in=a.get("carried_in", empty), carried=a.get("carried", empty),
                   carry_lost=a.get("carry_lost", empty))


def min_step_batch(b: int, eff_tokens: float, token_budget: int, min_fill: float) -> int:
    """The smallest per-rank batch that is not a *short* step: ``min_fill`` of the budget in effective
    tokens, or the full batch ``b`` where even that carries less (a bucket whose samples do not divide
    the budget finely, e.g. one 114k-token clip under a 120k budget)."""
    return max(1, min(b, math.ceil(round(min_fill * token_budget / eff_tokens, 9))))  # round: 0.9*10 == 9


def _bucket_steps(q: int, b: int, need: int) -> tuple[list[int], int]:
    """Per-rank sizes of the steps of a bucket with ``q`` samples per rank, full batch ``b`` and no step
    under ``need`` if it can be helped.

    Returns (sizes, short tail): the tail is > 0 only when the last step is short and balancing cannot
    lift every step to ``need``; then it is the tail's per-rank size (what leaving it out costs).
    """
    if q <= 0:
        return [], 0
    s = -(-q // b)
    tail = q - (s - 1) * b
    if tail >= need:
        return [b] * (s - 1) + [tail], 0
    base, extra = divmod(q, s)
    if base >= need:  # spread the tail over the bucket's steps: every one stays >= need
        return [base + 1] * extra + [base] * (s - extra), 0
    return [b] * (s - 1) + [tail], tail


def full_batch_need(b: int, min_fill: float = MIN_FILL) -> int:
    """The smallest per-rank batch that is a *full* step with carry: ``min_fill`` of the bucket's full batch
    ``b`` (rounded up; ``b`` itself below 10 at 90 %: 2 of 2, 8 of 8, 9 of 10)."""
    return max(1, min(b, math.ceil(round(min_fill * b, 9))))  # round: 0.9 * 10 == 9


def _feasible(x: int, b: int, need: int) -> bool:
    """Can ``x`` samples per rank be cut into steps of ``need`` .. ``b`` each?"""
    return x == 0 or -(-x // b) * need <= x


def _carry_steps(q_own: int, t_in: int, b: int, need: int) -> tuple[list[int], int]:
    """Steps of a bucket with ``q_own`` of its own samples per rank and ``t_in`` carried in, all full (>=
    ``need``); returns (sizes, per-rank count carried into the next epoch, < ``need``).

    Of the totals ``x`` it could schedule (``q - need < x <= q``, ``q = q_own + t_in``; one is always feasible:
    the gaps between ``s`` and ``s + 1`` steps are shorter than ``need``), the largest ``x <= q_own`` — no
    carried-in sample also trains for this epoch —, else the smallest (the fewest such repeats)."""
    q = q_own + t_in
    ok = [x for x in range(q, max(-1, q - need), -1) if _feasible(x, b, need)]
    own = [x for x in ok if x <= q_own]
    x = own[0] if own else ok[-1]
    return _bucket_steps(x, b, need)[0], q - x


def carries(world_size: int) -> bool:
    """Whether the trainer's loader (and ``motif-plan --carry``) plans an epoch that starts on ``world_size``
    ranks with ``carry=True``: from two ranks on. On one rank nothing is ever left out (``n % 1 == 0``) and a
    bucket's tail is a short step of a few samples, so the standalone epoch is kept there: every sample of
    the epoch in that epoch, none twice."""
    return int(world_size) > 1


def carried_in_per_rank(n: int, world_size: int, b: int, need: int, epoch: int) -> int:
    """Per-rank count of a bucket's samples carried into ``epoch`` (``carry=True``), from its ``n`` samples:
    epoch 0 carries in nothing, epoch e what e - 1 carried out (:func:`_carry_steps` of ``n // world_size`` and
    the carry-in). A bucket that fills less than one full step on its own (``n // world_size < b``) never
    carries. Periodic in the epoch (the carry is < ``need``), so O(need) whatever the epoch."""
    q_n = int(n) // int(world_size)
    if epoch <= 0 or q_n < b:
        return 0
    t, seen, e = 0, {}, 0
    while e < epoch:
        if t in seen:  # a cycle: jump over its whole periods
            period = e - seen[t]
            for _ in range((epoch - e) % period):
                t = _carry_steps(q_n, t, b, need)[1]
            return t
        seen[t] = e
        t = _carry_steps(q_n, t, b, need)[1]
        e += 1
    return t


def build_plan(manifest: dict, buckets: list[str], *, world_size: int, token_budget: int, seed: int,
               epoch: int, attention_aware: bool = False, exclude: np.ndarray | None = None,
               min_fill: float = MIN_FILL, max_drop: float = MAX_DROP, carry: bool = False,
               carry_world_size: int | None = None) -> Plan:
    """Plan one epoch over the samples of ``buckets`` (minus ``exclude``, the already consumed ids).

    ``carry=True``: the epoch of a sequence (module doc, "Carried remainders"; :func:`_build_carry_plan`):
    every step full unless a bucket is smaller than one, the previous epoch's carried tails trained here,
    this epoch's carried into the next; ``carry_world_size`` is the world size the carry is counted at (the
    epoch's first: ``replan`` passes it; default ``world_size``). ``max_drop`` is not used then.
    Without carry (the default), as follows.

    Per bucket: shuffle its ids (generator seeded from (seed, epoch, bucket name)); per-rank batch
    ``b = bucket_batch_size(tokens, token_budget, ...)`` (attention-aware: ref / base = the stage's largest /
    smallest bucket); the last ``n % world_size`` ids go to ``dropped``; the rest are cut into steps of
    ``b`` per rank with the tail folded (:func:`_bucket_steps`). Short tails that balancing cannot fix are
    left out, cheapest (fewest samples) first, while all of ``dropped`` stays <= ``max_drop`` of the
    stage's samples; buckets of a single step are never left out (that would skip the bucket every epoch).
    Then the order of all steps is shuffled (seeded from (seed, epoch)) so buckets interleave.
    Raises ValueError for a bucket that is not in the manifest.
    """
    if world_size < 1:
        raise ValueError(f"world_size={world_size} must be >= 1")
    if token_budget < 1:
        raise ValueError(f"token_budget={token_budget} must be >= 1")
    if not 0 < min_fill <= 1 or not 0 <= max_drop < 1:
        raise ValueError(f"min_fill={min_fill} must be in (0, 1] and max_drop={max_drop} in [0, 1)")
    if carry:
        return _build_carry_plan(manifest, buckets, world_size=world_size, token_budget=token_budget, seed=seed,
                                 epoch=epoch, attention_aware=attention_aware, exclude=exclude, min_fill=min_fill,
                                 carry_world_size=carry_world_size or world_size)
    names = _stage_buckets(manifest, buckets)
    ids_by_bucket = sample_ids_by_bucket(manifest)
    tokens = {b: int(manifest["buckets"][b]["tokens"]) for b in names}
    ref, base = max(tokens.values()), min(tokens.values())
    excl = None if exclude is None else np.unique(np.asarray(exclude, np.int64))

    layouts: list[tuple[str, np.ndarray, list[int]]] = []
    dropped: list[np.ndarray] = []
    batches: list[int] = []
    tails: list[tuple[int, str, int]] = []  # (samples it would leave out, bucket, layout index)
    total = 0
    for name in names:
        ids = ids_by_bucket.get(name, np.zeros(0, np.int64))
        if excl is not None and excl.size:
            ids = ids[~np.isin(ids, excl, assume_unique=True)]
        total += ids.size
        ids = _rng(seed, epoch, f"bucket:{name}").permutation(ids)
        b = bucket_batch_size(tokens[name], token_budget, attention_aware=attention_aware, ref_tokens=ref,
                              base_tokens=base)
        batches.append(b)
        eff = effective_tokens(tokens[name], attention_aware=attention_aware, ref_tokens=ref, base_tokens=base)
        q = ids.size // world_size
        sizes, tail = _bucket_steps(q, b, min_step_batch(b, eff, token_budget, min_fill))
        if tail and len(sizes) > 1:
            tails.append((tail * world_size, name, len(layouts)))
        dropped.append(ids[q * world_size:])
        layouts.append((name, ids[:q * world_size], sizes))

    # Leave out the cheapest short tails first: each one removes one short step, so for a given number
    # of left-out samples this removes the most short steps.
    allowance = int(max_drop * total) - int(sum(d.size for d in dropped))
    for cost, _, i in sorted(tails):
        if cost > allowance:
            break
        allowance -= cost
        name, ids, sizes = layouts[i]
        keep = (sum(sizes) - sizes[-1]) * world_size
        layouts[i] = (name, ids[:keep], sizes[:-1])
        dropped.append(ids[keep:])

    steps: list[Step] = []
    for name, ids, sizes in layouts:
        start = 0
        for size in sizes:
            steps.append(Step(name, ids[start:start + size * world_size].reshape(world_size, size)))
            start += size * world_size
    order = _rng(seed, epoch, "step-order").permutation(len(steps))
    return Plan(steps=[steps[i] for i in order], world_size=int(world_size), epoch=int(epoch), seed=int(seed),
                buckets=names, dropped=np.sort(np.concatenate(dropped)) if dropped else np.zeros(0, np.int64),
                total=int(total), token_budget=int(token_budget), attention_aware=bool(attention_aware),
                per_rank_batch=batches)


def _build_carry_plan(manifest: dict, buckets: list[str], *, world_size: int, token_budget: int, seed: int,
                      epoch: int, attention_aware: bool, exclude: np.ndarray | None, min_fill: float,
                      carry_world_size: int) -> Plan:
    """``build_plan(carry=True)``. Per bucket, in a fixed order ``tau`` (its epoch-0 shuffle reversed, so that at
    epoch 0 the plan is the one without carry minus its tail steps, the same ids on the same ranks, wherever the
    two agree on which steps are full: :func:`min_step_batch` and :func:`full_batch_need`):

    ``tau[:r0]`` + ``tau[r0 + Z:]`` is where the ``r`` left-out ids are taken, a window moving by ``r0`` a
    epoch (``r0 = n % carry_world_size``; consecutive windows are disjoint); ``tau[r0:r0 + Z]`` (``Z = (need - 1)
    * carry_world_size``) holds the carried ids: an epoch carries out its prefix of ``k_out`` and carried in the
    prefix of ``k_in`` (the previous epoch's instances), so the two overlap as much as they can and only
    ``k_in - k_out`` carried-in ids also train for this epoch (``repeats``). In the bucket's list of sample
    instances the carried-in come first and those repeats last, so they never share a step (every step holds
    more than either). Without exclusions all of this follows from the counts; after a world-size change
    (``exclude``) a carried-in id that would share a step with its repeat drops the bucket's carry-in
    (``carry_lost``)."""
    names = _stage_buckets(manifest, buckets)
    ids_by_bucket = sample_ids_by_bucket(manifest)
    tokens = {b: int(manifest["buckets"][b]["tokens"]) for b in names}
    ref, base = max(tokens.values()), min(tokens.values())
    w, wc = int(world_size), int(carry_world_size)
    empty = np.zeros(0, np.int64)
    # set membership through dense masks over the id range (sorted-array searches over shuffled ids are ~10x slower)
    top = max([int(v[-1]) + 1 for v in ids_by_bucket.values() if v.size] + [1])
    excluded = np.zeros(top, bool)
    if exclude is not None and np.asarray(exclude).size:
        x = np.asarray(exclude, np.int64)
        excluded[x[(x >= 0) & (x < top)]] = True
    scratch = np.zeros(top, bool)

    def member(x: np.ndarray, of: np.ndarray) -> np.ndarray:
        scratch[of] = True
        out = scratch[x]
        scratch[of] = False
        return out

    def first_available(parts: list[np.ndarray], count: int, start: int = 0, skip: np.ndarray = empty) -> np.ndarray:
        """The first ``count`` ids of the concatenation of ``parts`` (cyclic from ``start``) not excluded and not in
        ``skip``; reads views chunk by chunk (no copy of a bucket-sized array: the loader's start-up memory)."""
        size = sum(x.size for x in parts)
        if count <= 0 or not size:
            return empty
        start, views, pos = int(start) % size, [], 0
        for x in parts:  # the parts from `start` on, then those before it
            lo = min(max(start - pos, 0), x.size)
            views.append(x[lo:])
            pos += x.size
        pos = 0
        for x in parts:
            views.append(x[:min(max(start - pos, 0), x.size)])
            pos += x.size
        out, got, chunk = [], 0, max(2 * count, 4096)
        if skip.size:
            scratch[skip] = True
        try:
            for v in views:
                for i in range(0, v.size, chunk):
                    c = v[i:i + chunk]
                    c = c[~excluded[c] & ~scratch[c]]
                    out.append(c[:count - got])
                    got += out[-1].size
                    if got >= count:
                        return np.concatenate(out)
        finally:
            if skip.size:
                scratch[skip] = False
        return np.concatenate(out) if out else empty

    steps: list[Step] = []
    batches: list[int] = []
    dropped, carried, carried_in, lost = [], [], [], []
    total = 0
    for name in names:
        all_ids = ids_by_bucket.get(name, empty)
        b = bucket_batch_size(tokens[name], token_budget, attention_aware=attention_aware, ref_tokens=ref,
                              base_tokens=base)
        batches.append(b)
        need = full_batch_need(b, min_fill)
        avail = all_ids[~excluded[all_ids]]
        n = int(avail.size)
        total += n
        perm0 = _rng(seed, 0, f"bucket:{name}").permutation(all_ids)  # the no-carry plan's epoch-0 order
        order = perm0 if epoch == 0 else _rng(seed, epoch, f"bucket:{name}").permutation(all_ids)  # this epoch's
        tau = perm0[::-1]
        r0 = int(all_ids.size) % wc
        zone = (need - 1) * wc if all_ids.size // wc >= b else 0
        free = [tau[:r0], tau[r0 + zone:]]  # where left-out ids are taken (views)

        k_in = carried_in_per_rank(all_ids.size, wc, b, need, epoch) * wc
        c_in = tau[r0:r0 + k_in]
        c_in = c_in[~excluded[c_in]]
        while True:
            k = int(c_in.size)
            eligible = n // w >= b
            if not eligible:  # smaller than one full step of its own: no carry (one sample twice in one step)
                if k:
                    lost.append(c_in)
                c_in, k = empty, 0
            q, r = (n + k) // w, (n + k) % w
            if eligible:
                sizes, tail = _carry_steps(n // w, q - n // w, b, need)
            else:
                sizes, tail = _bucket_steps(q, b, need)[0], 0  # a short step stays
            c_out = first_available([tau[r0:], tau[:r0]], tail * w)  # the zone's prefix (past it: after a resize)
            left = first_available(free, r, start=epoch * r0, skip=c_out)
            if left.size < r:  # only after a resize: the rest from the zone
                left = np.concatenate([left, first_available([tau[r0:r0 + zone]], r - left.size,
                                                             skip=np.concatenate([c_out, left]))])
            mine = order[~excluded[order] & ~member(order, np.concatenate([c_out, left]))]  # own, trained here
            is_rep = member(mine, c_in) if k else np.zeros(mine.size, bool)
            rep = mine[is_rep]  # carried in and trained for this epoch too: the bucket's last step
            lst = np.concatenate([c_in, mine[~is_rep], rep]).astype(np.int64)
            if lst.size != w * sum(sizes):
                raise AssertionError(f"carry plan of {name}: {lst.size} ids for steps {sizes} x {w}")
            if rep.size:  # the carried-in (first) and their repeats (last) in different steps: always without a
                ends = np.cumsum([w * x for x in sizes])  # resize; after one, drop the carry-in if they would not be
                last_in = int(np.searchsorted(ends, k - 1, side="right"))
                first_rep = int(np.searchsorted(ends, lst.size - rep.size, side="right"))
                if last_in >= first_rep:
                    lost.append(c_in)
                    c_in = empty
                    continue
            break
        if k:
            carried_in.append(c_in)
        start = 0
        for size in sizes:
            steps.append(Step(name, lst[start:start + size * w].reshape(w, size)))
            start += size * w
        dropped.append(left)
        carried.append(c_out)
    order = _rng(seed, epoch, "step-order").permutation(len(steps))

    def cat(parts):
        return np.sort(np.concatenate(parts)).astype(np.int64) if parts else empty

    return Plan(steps=[steps[i] for i in order], world_size=w, epoch=int(epoch), seed=int(seed), buckets=names,
                dropped=cat(dropped), total=int(total), token_budget=int(token_budget),
                attention_aware=bool(attention_aware), per_rank_batch=batches, carry=True,
                carried_in=cat(carried_in), carried=cat(carried), carry_lost=cat(lost))


def replan(manifest: dict, buckets: list[str], *, segments: list[tuple[int, int]], token_budget: int, seed: int,
           epoch: int, attention_aware: bool = False, min_fill: float = MIN_FILL,
           max_drop: float = MAX_DROP, carry: bool = False) -> tuple[Plan, int]:
    """Plan the rest of an epoch after world-size changes, without repeating a consumed sample.

    ``segments = [(start_step_in_epoch, world_size), ...]``, first start 0, starts non-decreasing (a segment
    of zero steps, e.g. a restart before the first step, consumes nothing).
    Plan 0 = build_plan(world size of segment 0); its first ``start_1`` steps are consumed; plan k is
    built over the stage minus everything consumed so far with the world size of segment k, and so on.
    Returns (final plan, offset): global step-in-epoch ``s >= offset`` is ``final.steps[s - offset]``.
    Consumed ids are never scheduled again; the ids a plan dropped but did not consume are planned again.
    ``carry=True``: every plan of the epoch carries in what the previous epoch (counted at segment 0's world size)
    carried out, minus what is consumed.
    """
    if not segments or int(segments[0][0]) != 0:
        raise ValueError(f"segments={segments!r}: give [(0, world_size), (start, world_size), ...]")
    starts = [int(s) for s, _ in segments]
    if any(b < a for a, b in zip(starts, starts[1:], strict=False)):
        raise ValueError(f"segments={segments!r}: start steps must be non-decreasing")
    kw = dict(token_budget=token_budget, seed=seed, epoch=epoch, attention_aware=attention_aware,
              min_fill=min_fill, max_drop=max_drop, carry=carry, carry_world_size=int(segments[0][1]))
    consumed: list[np.ndarray] = []
    plan = build_plan(manifest, buckets, world_size=int(segments[0][1]), **kw)
    for (start, _), (nxt, ws) in zip(segments, segments[1:], strict=False):
        n = int(nxt) - int(start)
        if n > plan.num_steps:
            raise ValueError(f"segment starting at step {start} has only {plan.num_steps} steps; "
                             f"the next segment cannot start at step {nxt}")
        consumed.extend(s.samples.ravel() for s in plan.steps[:n])
        exclude = np.concatenate(consumed) if consumed else np.zeros(0, np.int64)
        plan = build_plan(manifest, buckets, world_size=int(ws), exclude=exclude, **kw)
    return plan, starts[-1]


def naive_plan_utilization(manifest: dict, buckets: list[str], *, world_size: int, token_budget: int,
                           seed: int) -> float:
    """Utilization of naive per-rank bucketing (the baseline the offline plan replaces).

    Simulation: the stage's samples are randomly permuted and dealt round-robin, so each rank holds a
    random 1/world_size shard; each rank shuffles its shard into per-bucket queues. Per-rank batch b of a
    bucket = ``bucket_batch_size(tokens, token_budget)``. At each step a bucket is drawn at random with
    probability proportional to rank 0's remaining samples per bucket (rank 0 broadcasts its choice).
    If EVERY rank has >= b samples of it, the step happens and each rank consumes b (scheduled). Otherwise
    the ranks that had a full batch consume theirs and those samples are wasted (the step is skipped), and
    the ranks that lacked one discard their partial batch (a drop_last loader; such samples could never
    fill a batch again anyway). The epoch ends when rank 0 has no samples left; the other ranks' leftovers
    are wasted too. Returns scheduled / total. Typical: ~20-50% with 64 ranks on long-tailed data.
    """
    names = _stage_buckets(manifest, buckets)
    ids_by_bucket = sample_ids_by_bucket(manifest)
    label = np.concatenate([np.full(ids_by_bucket[b].size, i, np.int64) for i, b in enumerate(names)])
    total = int(label.size)
    if total == 0:
        return 1.0
    rng = _rng(seed, 0, "naive")
    rank = rng.permutation(total) % world_size  # rank of each sample
    counts = np.zeros((world_size, len(names)), np.int64)
    np.add.at(counts, (rank, label), 1)
    batch = np.array([bucket_batch_size(int(manifest["buckets"][b]["tokens"]), token_budget) for b in names])
    scheduled = 0
    while counts[0].sum() > 0:
        w = counts[0] / counts[0].sum()
        k = int(rng.choice(len(names), p=w))
        col = counts[:, k]
        full = col >= batch[k]
        if full.all():
            scheduled += world_size * int(batch[k])
            col -= batch[k]
        else:
            col[full] -= batch[k]
            col[~full] = 0
    return scheduled / total


def _id_bucket_lookup(manifest: dict, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sorted ids, bucket index per id) over the given buckets."""
    by = sample_ids_by_bucket(manifest)
    ids = np.concatenate([by.get(b, np.zeros(0, np.int64)) for b in names] + [np.zeros(0, np.int64)])
    lab = np.concatenate([np.full(by.get(b, np.zeros(0)).size, i, np.int64) for i, b in enumerate(names)]
                         + [np.zeros(0, np.int64)])
    order = np.argsort(ids, kind="stable")
    return ids[order], lab[order]


def plan_stats(plan: Plan, manifest: dict, *, min_fill: float = MIN_FILL) -> dict:
    """Totals, per-bucket numbers (samples = this epoch's instances of that bucket: trained here, carried into the
    next plan or left out) and what the steps carry:

    - ``batch_full_fraction``: steps with >= ``min_fill`` of their bucket's full per-rank batch
      (:func:`full_batch_need`); ``batch_share_min``: the smallest step's per-rank batch / the full one;
    - ``short_steps`` / ``short_fraction``: steps under :func:`min_step_batch` (less than ``min_fill`` of the
      budget although the bucket's full batch carries more);
    - ``fill_min`` / ``fill_mean`` and ``full_fraction`` (steps with fill >= ``min_fill``): a step's fill is
      ``per_rank * effective_tokens / token_budget`` (raw tokens / budget in plain mode);
    - ``max_tokens_per_rank`` and ``max_budget_ratio`` (its raw video tokens / token_budget, <= 1 unless a
      bucket's single sample is over budget: those are listed in ``over_budget``);
    - ``dropped`` (left out: neither trained here nor carried), ``carried_in`` (the previous epoch's remainder
      trained here), ``carried`` (this epoch's remainder, trained in the next plan), ``repeats`` (carried-in ids
      that also train for this epoch in this plan, never in the same step), ``carry_lost``, ``held_out`` (the
      stage's validation samples, per bucket too: never planned, not in ``samples`` / ``total``), ``utilization``
      (1 - dropped / total) and ``trained_fraction`` (this epoch's instances trained in this plan / total).
    """
    ids, lab = _id_bucket_lookup(manifest, plan.buckets)
    held = heldout_counts(manifest, plan.buckets)  # validation samples of these buckets: never in a plan

    def per_bucket_count(x) -> np.ndarray:
        x = np.asarray(x, np.int64)
        return np.bincount(lab[np.searchsorted(ids, x)], minlength=len(plan.buckets)) if x.size else \
            np.zeros(len(plan.buckets), np.int64)

    dropped = np.asarray(plan.dropped, np.int64)
    n_dropped, n_in, n_out = per_bucket_count(dropped), per_bucket_count(plan.carried_in), \
        per_bucket_count(plan.carried)
    repeats = plan.repeats()
    tokens = {b: int(manifest["buckets"][b]["tokens"]) for b in plan.buckets}
    ref, base = (max(tokens.values()), min(tokens.values())) if tokens else (1, 1)
    budget = max(1, plan.token_budget)
    per_bucket, fills, raw, shares, short, full_batch = {}, [], [], [], 0, 0
    for i, name in enumerate(plan.buckets):
        st = [s for s in plan.steps if s.bucket == name]
        sched = int(sum(s.samples.size for s in st))
        b = plan.per_rank_batch[i] if i < len(plan.per_rank_batch) else max((s.per_rank for s in st), default=0)
        eff = effective_tokens(tokens[name], attention_aware=plan.attention_aware, ref_tokens=ref, base_tokens=base)
        need = min_step_batch(b, eff, budget, min_fill)
        n_short = sum(s.per_rank < need for s in st)
        short += n_short
        full_batch += sum(s.per_rank >= full_batch_need(b, min_fill) for s in st)
        fills += [s.per_rank * eff / budget for s in st]
        raw += [s.per_rank * tokens[name] for s in st]
        shares += [s.per_rank / max(1, b) for s in st]
        per_bucket[name] = {"samples": sched - int(n_in[i]) + int(n_out[i]) + int(n_dropped[i]), "scheduled": sched,
                            "dropped": int(n_dropped[i]), "carried_in": int(n_in[i]), "carried": int(n_out[i]),
                            "per_rank_batch": int(b), "steps": len(st), "tokens": tokens[name],
                            "short_steps": int(n_short), "held_out": int(held.get(name, 0))}
    n = plan.num_steps
    fills_a = np.asarray(fills, np.float64)
    return {"utilization": plan.utilization, "trained_fraction": plan.trained_fraction, "steps": n,
            "scheduled": plan.scheduled, "total": plan.total, "dropped": int(dropped.size), "carry": plan.carry,
            "carried_in": int(np.asarray(plan.carried_in).size), "carried": int(np.asarray(plan.carried).size),
            "repeats": int(repeats.size), "carry_lost": int(np.asarray(plan.carry_lost).size),
            "held_out": int(sum(held.values())), "per_bucket": per_bucket,
            "batch_full_fraction": full_batch / n if n else 1.0,
            "batch_share_min": float(min(shares)) if n else 1.0,
            "short_steps": int(short), "short_fraction": short / n if n else 0.0,
            "full_fraction": float((fills_a >= min_fill - 1e-12).mean()) if n else 1.0,
            "fill_min": float(fills_a.min()) if n else 1.0, "fill_mean": float(fills_a.mean()) if n else 1.0,
            "max_tokens_per_rank": int(max(raw, default=0)),
            "max_budget_ratio": max(raw, default=0) / budget if plan.token_budget else 0.0,
            "over_budget": sorted(b for b in plan.buckets if tokens[b] > plan.token_budget)}


def write_report(plan: Plan, manifest: dict, path: str | Path, *, naive: float | None) -> dict:
    """Write ``path`` (JSON: stats, naive_utilization, world_size, seed, epoch, token_budget) and a PNG bar
    chart of per-bucket samples vs scheduled next to it (same name, ``.png``). Returns the report dict."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = plan_stats(plan, manifest)
    report.update(naive_utilization=naive, world_size=plan.world_size, seed=plan.seed, epoch=plan.epoch,
                  token_budget=plan.token_budget, attention_aware=plan.attention_aware)
    path.write_text(json.dumps(report, indent=2) + "\n")

    from matplotlib.backends.backend_agg import FigureCanvasAgg  # no global backend switch
    from matplotlib.figure import Figure

    names = list(report["per_bucket"])
    x = np.arange(len(names))
    fig = Figure(figsize=(max(6.0, 0.5 * len(names) + 2), 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.bar(x - 0.2, [report["per_bucket"][n]["samples"] for n in names], 0.4, label="samples")
    ax.bar(x + 0.2, [report["per_bucket"][n]["scheduled"] for n in names], 0.4, label="scheduled")
    ax.set_xticks(x, names, rotation=60 if len(names) > 6 else 0, ha="right" if len(names) > 6 else "center",
                  fontsize=8)
    ax.set_ylabel("samples")
    naive_txt = "n/a" if naive is None else f"{naive:.1%}"
    ax.set_title(f"utilization: ours {plan.utilization:.1%} vs naive {naive_txt} "
                 f"(world {plan.world_size}, epoch {plan.epoch})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path.with_suffix(".png"), dpi=100)
    return report
