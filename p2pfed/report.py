"""What a run leaves behind: results.json and the summary tables (the plots are p2pfed.plots)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from p2pfed.config import ExperimentConfig, peer_index
from p2pfed.load import to_dict
from p2pfed.routing import print_routing_table, routing_summary
from p2pfed.strategies import parse_scheme


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(config: ExperimentConfig | None, results, clean_results=()) -> dict:
    """results.json: per scheme, test perplexity mean +- std over peers and seeds, per peer, trust, bytes;
    with attackers, the honest peers' figures (and those of the same jobs run clean, if given). Without a
    config (a swarm run by hand), the schemes and seeds are those of the results."""
    names = list(config.schemes) if config is not None else list(dict.fromkeys(r.scheme for r in results))
    seeds = list(config.seeds) if config is not None else sorted({r.seed for r in results})
    schemes: dict[str, dict] = {}
    for scheme in names:
        jobs = [r for r in results if r.scheme == scheme]
        finals = [p.final_test_ppl for job in jobs for p in job.peers.values()]
        mean, std = _mean_std(finals)
        peers = sorted(jobs[0].peers, key=peer_index)
        per_peer = {name: statistics.fmean(job.peers[name].final_test_ppl for job in jobs) for name in peers}
        trust = {name: _mean_rows([job.peers[name].final_trust for job in jobs]) for name in peers}
        rounds = [r.round for r in jobs[0].peers[peers[0]].rounds if r.test_ppl is not None]
        curve = [statistics.fmean(r.test_ppl for job in jobs for p in job.peers.values() for r in p.rounds
                                  if r.round == k and r.test_ppl is not None) for k in rounds]
        schemes[scheme] = {
            "test_ppl_mean": mean,
            "test_ppl_std": std,
            "per_peer": per_peer,
            "trust": trust,
            "bytes_sent": round(statistics.fmean(sum(p.bytes_sent for p in job.peers.values()) for job in jobs)),
            "per_seed": {str(job.seed): statistics.fmean(p.final_test_ppl for p in job.peers.values())
                         for job in jobs},
            "curve": {"round": rounds, "test_ppl_mean": curve},
            "missing_updates": sum(len(r.missing) for job in jobs for p in job.peers.values() for r in p.rounds),
            "by_profile": _by_profile(jobs),
            "same_group_trust": _same_group_share(jobs),
        }
        if all(p.selected is not None for job in jobs for p in job.peers.values()):
            schemes[scheme]["selected"] = _selected_summary(jobs)
        if routing := routing_summary(jobs):
            schemes[scheme]["routing"] = routing  # CoMiGS: the specialists' share by data group
        if config is not None and config.attack:
            schemes[scheme]["attack"] = _attack_summary(config, jobs, [r for r in clean_results if r.scheme == scheme])
    first = results[0]
    by_seed = {str(job.seed): job for job in results}
    return {
        "schemes": schemes,
        "config": to_dict(config) if config is not None else None,
        "seeds": seeds,
        "groups": first.groups,  # the first seed's; with mixed or dirichlet splits each seed has its own:
        "groups_by_seed": {seed: job.groups for seed, job in by_seed.items()},
        "profiles": first.profiles,
        "edges": [list(edge) for edge in first.graph_edges],
        "edges_by_seed": {seed: [list(edge) for edge in job.graph_edges] for seed, job in by_seed.items()},
    }


def _selected_summary(jobs) -> dict:
    """training.select_best: the test perplexity of each peer's best-validation round, and which rounds won."""
    peers = [p for job in jobs for p in job.peers.values()]
    mean, std = _mean_std([p.selected.test_ppl for p in peers])
    return {"test_ppl_mean": mean, "test_ppl_std": std,
            "per_seed": {str(job.seed): statistics.fmean(p.selected.test_ppl for p in job.peers.values())
                         for job in jobs},
            "round_mean": statistics.fmean(p.selected.round for p in peers)}


def _same_group_share(jobs) -> float | None:
    """Mean over peers and seeds of the final trust on self and same-group peers, with each seed's groups."""
    shares = [sum(w for n, w in peer.final_trust.items() if job.groups.get(n) == job.groups.get(name))
              for job in jobs if job.groups for name, peer in job.peers.items() if peer.final_trust]
    return statistics.fmean(shares) if shares else None


def _attack_summary(config: ExperimentConfig, jobs, clean_jobs) -> dict:
    """How the honest peers fared: their test perplexity, and the trust they put on attackers per round."""
    attackers = sorted({name for attack in config.attack for name in attack.peers}, key=peer_index)
    honest = [name for name in sorted(jobs[0].peers, key=peer_index) if name not in attackers]
    mean, std = _mean_std([job.peers[n].final_test_ppl for job in jobs for n in honest])
    rounds = sorted({r.round for r in jobs[0].peers[honest[0]].rounds if r.round > 0})
    on_attackers = [statistics.fmean(sum(r.trust.get(a, 0.0) for a in attackers)
                                     for job in jobs for n in honest for r in job.peers[n].rounds if r.round == k)
                    for k in rounds]
    summary = {"attackers": attackers, "kinds": sorted({a.kind for a in config.attack}),
               "honest_test_ppl_mean": mean, "honest_test_ppl_std": std,
               "attacker_trust": {"round": rounds, "mean": on_attackers}}
    if clean_jobs:
        clean_mean, clean_std = _mean_std([job.peers[n].final_test_ppl for job in clean_jobs for n in honest])
        summary.update(clean_test_ppl_mean=clean_mean, clean_test_ppl_std=clean_std)
    return summary


def _by_profile(jobs) -> dict[str, dict[str, float]]:
    """Test perplexity mean +- std over the peers of each profile (and seeds): who gains from whom."""
    names = dict.fromkeys(jobs[0].profiles[p] for p in sorted(jobs[0].profiles, key=peer_index))
    rows = {}
    for profile in names:
        values = [p.final_test_ppl for job in jobs for name, p in job.peers.items() if job.profiles[name] == profile]
        mean, std = _mean_std(values)
        rows[profile] = {"test_ppl_mean": mean, "test_ppl_std": std, "peers": len(values) // len(jobs)}
    return rows



def _mean_rows(rows: list[dict[str, float]]) -> dict[str, float]:
    names = sorted({n for row in rows for n in row}, key=peer_index)
    return {n: statistics.fmean(row.get(n, 0.0) for row in rows) for n in names} if rows else {}


def load_results(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results.json (is {run_dir} a finished run folder?)")
    return json.loads(path.read_text(encoding="utf-8"))


def same_group_trust(summary: dict, scheme: str) -> float | None:
    """Mean over peers (and seeds) of the trust weight on self and same-group neighbours."""
    row = summary["schemes"][scheme]
    if "same_group_trust" in row:  # each seed's trust with its own groups
        return row["same_group_trust"]
    groups = summary["groups"]  # results.json written before groups were taken per seed
    rows = row["trust"]
    shares = [sum(w for n, w in row.items() if groups.get(n) == groups.get(peer)) for peer, row in rows.items() if row]
    return statistics.fmean(shares) if shares else None


def print_table(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    schemes = summary["schemes"]
    best = min(schemes, key=lambda s: schemes[s]["test_ppl_mean"])
    table = Table(title=f"Test perplexity, mean ± std over peers and seeds {summary['seeds']} (lower is better)")
    selected = all("selected" in row for row in schemes.values())
    columns = ("scheme", "test ppl", *(("best-val round",) if selected else ()), "vs local", "same-group trust",
               "MB sent")
    for column in columns:
        table.add_column(column, justify="left" if column == "scheme" else "right")
    local = schemes.get("local", {}).get("test_ppl_mean")
    for name, row in schemes.items():
        gain = f"{100 * (row['test_ppl_mean'] / local - 1):+.2f}%" if local else "-"
        share = same_group_trust(summary, name)
        style = "bold green" if name == best else None
        kept = (f"{row['selected']['test_ppl_mean']:.3f} ± {row['selected']['test_ppl_std']:.3f}",) if selected else ()
        table.add_row(name, f"{row['test_ppl_mean']:.3f} ± {row['test_ppl_std']:.3f}", *kept, gain,
                      "-" if share is None else f"{share:.2f}", f"{row['bytes_sent'] / 1e6:.2f}", style=style)
    console.print(table)
    if any("attack" in row for row in schemes.values()):
        _print_attack_table(summary, console)
    profiles = next(iter(schemes.values())).get("by_profile", {})
    if len(profiles) > 1:
        _print_profile_table(summary, console)
    print_routing_table(summary, console)


def _print_attack_table(summary: dict, console) -> None:
    from rich.table import Table

    rows = {name: row["attack"] for name, row in summary["schemes"].items()}
    first = next(iter(rows.values()))
    table = Table(title=f"Under attack ({', '.join(first['kinds'])} by {', '.join(first['attackers'])}): honest peers")
    for column in ("scheme", "honest test ppl", "clean", "change", "trust on attackers, last round"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    for name, row in rows.items():
        clean = row.get("clean_test_ppl_mean")
        change = f"{100 * (row['honest_test_ppl_mean'] / clean - 1):+.2f}%" if clean else "-"
        table.add_row(name, f"{row['honest_test_ppl_mean']:.3f} ± {row['honest_test_ppl_std']:.3f}",
                      f"{clean:.3f}" if clean else "-", change, f"{row['attacker_trust']['mean'][-1]:.3f}")
    console.print(table)


def _print_profile_table(summary: dict, console) -> None:
    from rich.table import Table

    schemes = summary["schemes"]
    profiles = list(next(iter(schemes.values()))["by_profile"])
    table = Table(title="Test perplexity by peer profile, mean ± std over its peers and seeds")
    table.add_column("scheme")
    for profile in profiles:
        count = next(iter(schemes.values()))["by_profile"][profile]["peers"]
        table.add_column(f"{profile} ({count} peers)", justify="right")
    for name, row in schemes.items():
        best = {p: min(schemes, key=lambda s: schemes[s]["by_profile"][p]["test_ppl_mean"]) for p in profiles}
        cells = []
        for profile in profiles:
            cell = row["by_profile"][profile]
            text = f"{cell['test_ppl_mean']:.3f} ± {cell['test_ppl_std']:.3f}"
            cells.append(f"[bold green]{text}[/]" if best[profile] == name else text)
        table.add_row(name, *cells)
    console.print(table)
