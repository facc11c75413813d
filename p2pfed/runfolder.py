"""A run folder that loses nothing: each job's records are written as the job finishes, a resumed run runs only
the jobs that are missing, and a folder that holds anything is not written into unless asked.

    RUN_DIR/config.json                  the experiment as run: what `p2pfed run --resume RUN_DIR` runs again
    RUN_DIR/inputs.json                  a script's own graph or texts: their digest (a resume must give the same)
    RUN_DIR/jobs/<scheme>-seed<k>.json   a finished job: every peer's round records (records.PeerResult JSON)
    RUN_DIR/jobs/clean/...               the same jobs without the attackers (compare_clean)
    RUN_DIR/results.json, events.jsonl, *.png    written once every job is in

`load_state_folders` reads the state folders of a swarm run by hand (`p2pfed peer`, one `result.json` each)
into the same job records, so that `p2pfed report` can summarize them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

from p2pfed.checkpoint import CheckpointError, load_checkpoint
from p2pfed.config import ConfigError, ExperimentConfig, peer_index
from p2pfed.job import JobResult
from p2pfed.load import from_dict, to_dict
from p2pfed.records import PeerResult

CONFIG_FILE = "config.json"
INPUTS_FILE = "inputs.json"
JOBS = "jobs"
RESULTS_FILE = "results.json"
EVENTS_FILE = "events.jsonl"
PLOT_FILES = ("curves.png", "trust_heatmap.png", "topology.png", "attacker_trust.png")
# Everything p2pfed writes into a run folder: what --force clears (nothing else is touched).
WRITTEN = (CONFIG_FILE, INPUTS_FILE, JOBS, RESULTS_FILE, EVENTS_FILE, "libp2p", "clean", *PLOT_FILES)
# Keys a resumed run may change: they do not change any result.
RESUMABLE_CHANGES = ("workers", "output_dir")
STATE_RESULT_FILE = "result.json"  # what `p2pfed peer` writes to its state folder (peer.RESULT_FILE)


class RunFolder:
    """One experiment's folder. The constructor only stores the path; `check` and `make` touch the disk."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    # -- before any work ---------------------------------------------------------------------

    def in_use(self) -> bool:
        return self.path.is_dir() and any(self.path.iterdir())

    def check(self, config: ExperimentConfig, *, resume: bool = False, force: bool = False,
              fingerprint: str | None = None) -> None:
        """Refuse (ConfigError) a folder this run may not write into: a file, or a folder in use without
        `resume` or `force`; with `resume`, one started with another config or other inputs."""
        if resume and force:
            raise ConfigError("--resume and --force: choose one (finish the run in the folder, or start afresh)")
        if self.path.exists() and not self.path.is_dir():
            raise ConfigError(f"--out {self.path}: is a file, not a folder")
        if not self.in_use() or force:
            return
        if not resume:
            raise ConfigError(f"--out {self.path}: the folder is not empty; --resume finishes the run in it, "
                              f"--force starts it afresh")
        saved = self.saved_config()
        for key, old, new in differences(to_dict(saved), to_dict(config)):
            if key not in RESUMABLE_CHANGES:
                raise ConfigError(f"{key}: {self.path} was started with {old!r}, not {new!r}; resume it as it was "
                                  f"(p2pfed run --resume {self.path}) or start afresh with --force")
        if self.saved_fingerprint() != fingerprint:
            raise ConfigError(f"{self.path} was started with another graph or other texts (or none) than this "
                              f"run's; resume it with the same ones, or start afresh with --force")
        for path in sorted((self.path / JOBS).rglob("*.json")):
            _read_job(path)  # a damaged record fails here, before any work

    def make(self, config: ExperimentConfig, *, force: bool = False, fingerprint: str | None = None) -> None:
        """Create the folder (clearing what p2pfed wrote there before, with `force`) and record the config."""
        if force:
            for name in WRITTEN:
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                elif target.exists():
                    target.unlink()
        (self.path / JOBS).mkdir(parents=True, exist_ok=True)
        if not (self.path / CONFIG_FILE).is_file():
            _write_json(self.path / CONFIG_FILE, to_dict(config))
        if fingerprint is not None and not (self.path / INPUTS_FILE).is_file():
            _write_json(self.path / INPUTS_FILE, {"fingerprint": fingerprint})

    def saved_config(self) -> ExperimentConfig:
        path = self.path / CONFIG_FILE
        if not path.is_file():
            raise ConfigError(f"{self.path}: no {CONFIG_FILE}, so not a run folder p2pfed can resume")
        try:
            return from_dict(ExperimentConfig, json.loads(path.read_text(encoding="utf-8"))).validate()
        except (ValueError, ConfigError) as error:
            raise ConfigError(f"{path}: not a run's config ({error})") from error

    def saved_fingerprint(self) -> str | None:
        path = self.path / INPUTS_FILE
        return json.loads(path.read_text(encoding="utf-8"))["fingerprint"] if path.is_file() else None

    # -- as jobs finish ----------------------------------------------------------------------

    def job_file(self, scheme: str, seed: int, clean: bool = False) -> Path:
        folder = self.path / JOBS / "clean" if clean else self.path / JOBS
        return folder / f"{re.sub(r'[^A-Za-z0-9._-]', '_', scheme)}-seed{seed}.json"

    def save_job(self, result: JobResult, clean: bool = False) -> Path:
        path = self.job_file(result.scheme, result.seed, clean)
        path.parent.mkdir(parents=True, exist_ok=True)
        _write_json(path, job_to_json(result), indent=None)
        return path

    def load_job(self, scheme: str, seed: int, clean: bool = False) -> JobResult | None:
        """The job's records if it finished in an earlier run, else None."""
        path = self.job_file(scheme, seed, clean)
        if not path.is_file():
            return None
        result = _read_job(path)
        if (result.scheme, result.seed) != (scheme, seed):
            raise ConfigError(f"{path}: holds {result.scheme} seed {result.seed}, not {scheme} seed {seed}")
        return result

    # -- at the end --------------------------------------------------------------------------

    def write_events(self, results: Iterable[JobResult]) -> Path:
        """events.jsonl: a line per (scheme, seed, peer, round), in job order (so a resumed run writes the same)."""
        import dataclasses

        path = self.path / EVENTS_FILE
        with open(path, "w", encoding="utf-8") as events:
            for result in results:
                for peer, peer_result in result.peers.items():
                    for record in peer_result.rounds:
                        line = {"scheme": result.scheme, "seed": result.seed, "peer": peer,
                                **dataclasses.asdict(record)}
                        events.write(json.dumps(line) + "\n")
        return path

    def write_results(self, summary: dict) -> Path:
        path = self.path / RESULTS_FILE
        _write_json(path, summary)
        return path


def differences(old, new, where: str = ""):
    """(dotted key, old, new) for every leaf where two plain configs differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        for key in [*old, *(k for k in new if k not in old)]:
            yield from differences(old.get(key), new.get(key), f"{where}.{key}" if where else key)
    elif old != new:
        yield where, old, new


def job_to_json(result: JobResult) -> dict:
    return {"scheme": result.scheme, "seed": result.seed, "graph_edges": [list(e) for e in result.graph_edges],
            "groups": result.groups, "profiles": result.profiles,
            "peers": {name: peer.to_json() for name, peer in result.peers.items()}}


def job_from_json(data: dict) -> JobResult:
    return JobResult(scheme=data["scheme"], seed=data["seed"],
                     peers={name: PeerResult.from_json(peer) for name, peer in data["peers"].items()},
                     graph_edges=[tuple(edge) for edge in data["graph_edges"]], groups=data["groups"],
                     profiles=data["profiles"])


def _read_job(path: Path) -> JobResult:
    try:
        return job_from_json(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(f"{path}: not a finished job's record ({type(error).__name__}: {error}); delete it to "
                          f"run that job again") from None


def _write_json(path: Path, data, indent: int | None = 2) -> None:
    """Write to a temporary file and rename it into place: a reader never sees half a file."""
    temporary = path.with_name(f".{path.name}.tmp")
    temporary.write_text(json.dumps(data, indent=indent), encoding="utf-8")
    os.replace(temporary, path)


# -- state folders of a swarm run by hand -----------------------------------------------------

def state_folders(paths: Sequence[str | os.PathLike]) -> list[Path]:
    """The peers' state folders among `paths`: each path is one (it holds result.json) or holds some."""
    found = []
    for path in map(Path, paths):
        if (path / STATE_RESULT_FILE).is_file():
            found.append(path)
        elif path.is_dir() and any((child / STATE_RESULT_FILE).is_file() for child in path.iterdir()):
            found.extend(sorted(c for c in path.iterdir() if (c / STATE_RESULT_FILE).is_file()))
        else:
            raise FileNotFoundError(f"{path}: no results.json (not a finished run folder), and neither a peer's "
                                    f"state folder ({STATE_RESULT_FILE}) nor a folder of them")
    return found


def load_state_folders(paths: Sequence[str | os.PathLike]) -> list[JobResult]:
    """A hand-run swarm's peers, one job per (scheme, seed) their checkpoints name. The graph is what the peers
    heard: an edge wherever a peer had the other as a neighbour or weighed it. Data groups are unknown."""
    jobs: dict[tuple[str, int], dict[str, PeerResult]] = {}
    for folder in state_folders(paths):
        result = PeerResult.from_json(json.loads((folder / STATE_RESULT_FILE).read_text(encoding="utf-8")))
        try:
            checkpoint = load_checkpoint(folder)
        except CheckpointError:
            checkpoint = None
        identity = checkpoint.meta.get("identity", {}) if checkpoint is not None else {}
        key = (identity.get("method", "unknown"), int(identity.get("seed", 0)))
        peers = jobs.setdefault(key, {})
        if result.name in peers:
            raise ConfigError(f"{folder}: a second state folder of {result.name} ({key[0]} seed {key[1]})")
        peers[result.name] = result
    return [_hand_run_job(scheme, seed, peers) for (scheme, seed), peers in sorted(jobs.items())]


def _hand_run_job(scheme: str, seed: int, peers: dict[str, PeerResult]) -> JobResult:
    names = sorted(peers, key=peer_index)
    edges = set()
    for name, peer in peers.items():
        for record in peer.rounds:
            for other in [*getattr(record, "neighbours", ()), *record.trust]:
                if other != name:
                    edges.add(tuple(sorted((name, other), key=peer_index)))
    return JobResult(scheme=scheme, seed=seed, peers={n: peers[n] for n in names},
                     graph_edges=sorted(edges, key=lambda e: (peer_index(e[0]), peer_index(e[1]))), groups={},
                     profiles=dict.fromkeys(names, "default"))
