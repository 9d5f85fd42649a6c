"""Test-only data sources, selected in a real run with `data._target_=tests.faults._sources.FaultySource`
(the launch helpers put the repo on PYTHONPATH). Extra keys are force-added: `+data.crash_step=5`."""

from __future__ import annotations

from motif_train.data.synthetic import SyntheticSource


class FaultySource(SyntheticSource):
    """Synthetic data with injected faults, like a real loader would have them.

    crash_step: `next_step` raises on `crash_rank` at that step (a real exception inside the loop).
    skip_step: at that step rank r reports 3 + 2r skipped samples, one message each (the loader's
    `last_skipped` / `last_skipped_count` contract), so 2 ranks skip 3 + 5 = 8.
    Every rank also has one `startup_notes` line.
    """

    def __init__(self, *, crash_step: int | None = None, crash_rank: int = 1, skip_step: int | None = None,
                 **kw) -> None:
        super().__init__(**kw)
        self.crash_step, self.crash_rank, self.skip_step = crash_step, crash_rank, skip_step
        self.startup_notes = [f"faulty source on rank {self.dp_rank}: crash_step={crash_step} skip_step={skip_step}"]
        self.last_skipped: list[str] = []
        self.last_skipped_count = 0

    def next_step(self, step: int):
        if step == self.crash_step and self.dp_rank == self.crash_rank:
            raise RuntimeError(f"injected data fault on rank {self.dp_rank} at step {step}")
        batches = super().next_step(step)
        n = 3 + 2 * self.dp_rank if step == self.skip_step else 0
        self.last_skipped = [f"fake/r{self.dp_rank}/{i:03d}: skipped: injected" for i in range(n)]
        self.last_skipped_count = n
        return batches
