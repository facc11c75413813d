"""What a run leaves behind: results.json, a summary table, and plots (curves, trust heat map, topology)."""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from pathlib import Path

from p2pfed.config import ExperimentConfig, peer_index
from p2pfed.load import to_dict
from p2pfed.strategies import parse_scheme


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def summarize(config: ExperimentConfig, results, clean_results=()) -> dict:
    """results.json: per scheme, test perplexity mean +- std over peers and seeds, per peer, trust, bytes;
    with attackers, the honest peers' figures (and those of the same jobs run clean, if given)."""
    schemes: dict[str, dict] = {}
    for scheme in config.schemes:
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
        }
        if config.attack:
            schemes[scheme]["attack"] = _attack_summary(config, jobs, [r for r in clean_results if r.scheme == scheme])
    first = results[0]
    return {
        "schemes": schemes,
        "config": to_dict(config),
        "seeds": list(config.seeds),
        "groups": first.groups,
        "profiles": first.profiles,
        "edges": [list(edge) for edge in first.graph_edges],
    }


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
    """Mean over peers of the trust weight on self and same-group neighbours."""
    groups = summary["groups"]
    rows = summary["schemes"][scheme]["trust"]
    shares = [sum(w for n, w in row.items() if groups.get(n) == groups.get(peer)) for peer, row in rows.items() if row]
    return statistics.fmean(shares) if shares else None


def print_table(summary: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    schemes = summary["schemes"]
    best = min(schemes, key=lambda s: schemes[s]["test_ppl_mean"])
    table = Table(title=f"Test perplexity, mean ± std over peers and seeds {summary['seeds']} (lower is better)")
    for column in ("scheme", "test ppl", "vs local", "same-group trust", "MB sent"):
        table.add_column(column, justify="left" if column == "scheme" else "right")
    local = schemes.get("local", {}).get("test_ppl_mean")
    for name, row in schemes.items():
        gain = f"{100 * (row['test_ppl_mean'] / local - 1):+.2f}%" if local else "-"
        share = same_group_trust(summary, name)
        style = "bold green" if name == best else None
        table.add_row(name, f"{row['test_ppl_mean']:.3f} ± {row['test_ppl_std']:.3f}", gain,
                      "-" if share is None else f"{share:.2f}", f"{row['bytes_sent'] / 1e6:.2f}", style=style)
    console.print(table)
    if any("attack" in row for row in schemes.values()):
        _print_attack_table(summary, console)
    profiles = next(iter(schemes.values())).get("by_profile", {})
    if len(profiles) > 1:
        _print_profile_table(summary, console)


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


def draw_plots(summary: dict, run_dir: str | Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    paths = [_curves(summary, run_dir, plt), _heatmaps(summary, run_dir, plt), _topology(summary, run_dir, plt),
             _attacker_trust(summary, run_dir, plt)]
    return [p for p in paths if p is not None]


def _curves(summary, run_dir: Path, plt) -> Path:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, row in summary["schemes"].items():
        axis.plot(row["curve"]["round"], row["curve"]["test_ppl_mean"], marker="o", markersize=3, label=name)
    axis.set_xlabel("round")
    axis.set_ylabel("test perplexity (mean over peers and seeds)")
    axis.set_title("Test perplexity per round")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    path = run_dir / "curves.png"
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _trust_schemes(summary) -> list[str]:
    return [s for s in summary["schemes"]
            if parse_scheme(s).shares_anything and any(summary["schemes"][s]["trust"].values())]


def _peer_names(summary) -> list[str]:
    return sorted(summary["groups"], key=peer_index)


def _heatmaps(summary, run_dir: Path, plt) -> Path | None:
    schemes = _trust_schemes(summary)
    if not schemes:
        return None
    names = _peer_names(summary)
    labels = [f"{n} ({summary['groups'][n]})" for n in names]
    figure, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes) + 1, 4.4), squeeze=False)
    for axis, scheme in zip(axes[0], schemes):
        rows = summary["schemes"][scheme]["trust"]
        matrix = [[rows.get(i, {}).get(j, 0.0) for j in names] for i in names]
        image = axis.imshow(matrix, vmin=0.0, vmax=1.0, cmap="viridis")
        axis.set_title(scheme)
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        axis.set_yticks(range(len(names)), labels if axis is axes[0][0] else names, fontsize=7)
        axis.set_xlabel("trusted neighbour j")
    axes[0][0].set_ylabel("peer i (row: its weights w_ij)")
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8)
    path = run_dir / "trust_heatmap.png"
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _topology(summary, run_dir: Path, plt) -> Path:
    import networkx as nx

    names = _peer_names(summary)
    graph = nx.Graph()
    graph.add_nodes_from(names)
    graph.add_edges_from(tuple(e) for e in summary["edges"])
    position = nx.circular_layout(graph)
    groups = sorted(set(summary["groups"].values()))
    colours = [plt.cm.tab10(groups.index(summary["groups"][n]) % 10) for n in names]
    schemes = _trust_schemes(summary) or [None]
    figure, axes = plt.subplots(1, len(schemes), figsize=(4.2 * len(schemes), 4.4), squeeze=False)
    for axis, scheme in zip(axes[0], schemes):
        rows = summary["schemes"][scheme]["trust"] if scheme else {}
        # An edge's width is the trust both ends put on each other (w_ij + w_ji).
        widths = [0.5 + 8 * (rows.get(u, {}).get(v, 0.0) + rows.get(v, {}).get(u, 0.0)) if rows else 1.0
                  for u, v in graph.edges()]
        nx.draw_networkx(graph, position, ax=axis, node_color=colours, width=widths, edge_color="0.4",
                         font_size=7, node_size=420)
        axis.set_title(f"topology, edges by {scheme} trust" if scheme else "topology")
        axis.axis("off")
    path = run_dir / "topology.png"
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def _attacker_trust(summary, run_dir: Path, plt) -> Path | None:
    rows = {name: row["attack"] for name, row in summary["schemes"].items() if "attack" in row}
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    styles = ["-", "--", ":", "-."]
    for i, (name, row) in enumerate(rows.items()):
        ax.plot(row["attacker_trust"]["round"], row["attacker_trust"]["mean"], styles[i % len(styles)],
                marker="o", label=name)
    first = next(iter(rows.values()))
    ax.set(xlabel="round", ylabel="weight on attackers (mean over honest peers)",
           title=f"Trust on {', '.join(first['attackers'])} ({', '.join(first['kinds'])})")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = run_dir / "attacker_trust.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
