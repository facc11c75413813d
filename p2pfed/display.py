"""Progress on the terminal (rich) for `p2pfed run` and `p2pfed sweep`: one bar for the whole run or sweep and one
per job. A run shows every job's bar from the start; a sweep shows the bars of the jobs running now."""

from __future__ import annotations

from contextlib import contextmanager

from p2pfed.config import ExperimentConfig
from p2pfed.experiment import Listener, job_label


@contextmanager
def progress_bars(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:<44}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console) as progress:
        yield progress


def job_rounds(config: ExperimentConfig) -> int:
    """A job's peer-rounds: what its bar counts."""
    return config.num_peers * config.training.rounds


class Overall:
    """The whole run's (or sweep's) bar, in peer-rounds, described by the jobs done."""

    def __init__(self, bars, label: str, jobs: int, rounds: int):
        self.bars, self.label, self.jobs, self.done = bars, label, jobs, 0
        self.task = bars.add_task(self._description(), total=rounds)

    def _description(self) -> str:
        return f"[bold]{self.label}[/]: {self.done}/{self.jobs} jobs"

    def advance(self, rounds: int) -> None:
        self.bars.advance(self.task, rounds)

    def job_done(self) -> None:
        self.done += 1
        self.bars.update(self.task, description=self._description())


class JobBars(Listener):
    """Rich bars for one experiment's jobs: each job's peer-rounds, and the overall bar."""

    def __init__(self, bars, config: ExperimentConfig, overall: Overall, prefix: str = "", upfront: bool = True):
        self.bars, self.config, self.overall, self.prefix = bars, config, overall, prefix
        self.upfront = upfront  # a run lists every job from the start; a sweep only those running
        self.per_job = job_rounds(config)
        self.tasks: dict[tuple[str, int], int] = {}
        self.counted: dict[tuple[str, int], int] = {}  # peer-rounds each job has shown
        self.finished: set[tuple[str, int]] = set()
        if upfront:
            for seed in config.seeds:
                for scheme in config.schemes:
                    self._task(scheme, seed)

    def _task(self, scheme: str, seed: int) -> int:
        if (scheme, seed) not in self.tasks:
            label = f"{self.prefix}{job_label(scheme, seed)}"
            self.tasks[scheme, seed] = self.bars.add_task(label, total=self.per_job)
        return self.tasks[scheme, seed]

    def job_started(self, scheme: str, seed: int) -> None:
        self._task(scheme, seed)

    def progress(self, scheme: str, seed: int, rounds: int) -> None:
        if (scheme, seed) in self.finished:
            return
        self.bars.advance(self._task(scheme, seed), rounds)
        self.counted[scheme, seed] = self.counted.get((scheme, seed), 0) + rounds
        self.overall.advance(rounds)

    def job_finished(self, result, resumed: bool) -> None:
        key = (result.scheme, result.seed)
        self.finished.add(key)
        if resumed:
            self.overall.advance(self.per_job)
        else:
            # A job ends with its last round; bars of libp2p jobs or short ones may not have reached the end.
            self.overall.advance(max(0, self.per_job - self.counted.get(key, 0)))
        self.overall.job_done()
        if key in self.tasks:
            if self.upfront:
                self.bars.update(self.tasks[key], completed=self.per_job,
                                 description=f"{self.prefix}{job_label(*key)}{' (done before)' if resumed else ''}")
            else:
                self.bars.remove_task(self.tasks.pop(key))
