"""The plots of a run (curves, trust heat maps, topology, trust on attackers) and of a sweep, from results.json.

Made to read at any size: many panels go in a grid, not one row; the trust colour bar is labelled; pairs that
are not neighbours are masked, not drawn as zero trust; group colours have a legend; curves that overlap
differ in line style and marker; rounds are integer ticks. With mixed or dirichlet splits each seed has its own
groups: labels name every group a peer had.
"""

from __future__ import annotations

import math
from pathlib import Path

from p2pfed.config import peer_index
from p2pfed.strategies import parse_scheme

LINE_STYLES = ("-", "--", "-.", ":")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
NO_EDGE_COLOUR = "0.88"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def draw_plots(summary: dict, run_dir: str | Path) -> list[Path]:
    """Every plot of a run into `run_dir`; the paths written."""
    plt = _pyplot()
    run_dir = Path(run_dir)
    paths = [_curves(summary, run_dir, plt), _heatmaps(summary, run_dir, plt), _topology(summary, run_dir, plt),
             _attacker_trust(summary, run_dir, plt)]
    return [p for p in paths if p is not None]


def style(index: int) -> dict:
    """Line style and marker of the index-th curve: no two of the first 8 look alike, even in grey."""
    return {"linestyle": LINE_STYLES[index % len(LINE_STYLES)], "marker": MARKERS[index % len(MARKERS)]}


def _grid(plt, count: int, width: float, height: float, max_columns: int = 3):
    columns = min(count, max_columns)
    rows = math.ceil(count / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(width * columns + 1.2, height * rows), squeeze=False)
    flat = [axis for row in axes for axis in row]
    for axis in flat[count:]:
        axis.axis("off")
    return figure, flat[:count]


def _integer_rounds(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.xaxis.set_major_locator(MaxNLocator(integer=True))


def _save(figure, path: Path, plt) -> Path:
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def _curves(summary, run_dir: Path, plt) -> Path:
    figure, axis = plt.subplots(figsize=(7.5, 4.5))
    for i, (name, row) in enumerate(summary["schemes"].items()):
        axis.plot(row["curve"]["round"], row["curve"]["test_ppl_mean"], markersize=4, label=name, **style(i))
    axis.set_xlabel("round")
    axis.set_ylabel("test perplexity (mean over peers and seeds)")
    axis.set_title("Test perplexity per round")
    axis.grid(alpha=0.3)
    _integer_rounds(axis)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, run_dir / "curves.png", plt)


def _trust_schemes(summary) -> list[str]:
    return [s for s in summary["schemes"]
            if parse_scheme(s).shares_anything and any(summary["schemes"][s]["trust"].values())]


def peer_names(summary) -> list[str]:
    first = next(iter(summary["schemes"].values()))
    return sorted({*summary.get("groups", {}), *first["per_peer"]}, key=peer_index)


def groups_by_seed(summary) -> dict[str, dict[str, str]]:
    """Each seed's data group per peer (results.json written before groups were per seed: the one mapping)."""
    return summary.get("groups_by_seed") or {"": summary.get("groups", {})}


def group_label(summary, peer: str) -> str:
    """The peer's group, or every group it had over the seeds (mixed or dirichlet splits), '' if unknown."""
    groups = [g[peer] for g in groups_by_seed(summary).values() if peer in g]
    return "/".join(dict.fromkeys(groups))


def _neighbours(summary) -> set[tuple[str, str]]:
    edges = [e for seed_edges in (summary.get("edges_by_seed") or {"": summary.get("edges", [])}).values()
             for e in seed_edges]
    return {(u, v) for u, v in edges} | {(v, u) for u, v in edges}


def trust_matrix(summary, scheme: str, names: list[str]):
    """w_ij of `scheme` as a masked array: a pair that never were neighbours has no trust at all and is masked
    (drawn grey), unlike a neighbour given weight 0."""
    import numpy as np

    rows, edges = summary["schemes"][scheme]["trust"], _neighbours(summary)
    return np.ma.masked_invalid([[rows.get(i, {}).get(j, 0.0) if i == j or (i, j) in edges or j in rows.get(i, {})
                                  else math.nan for j in names] for i in names])


def _heatmaps(summary, run_dir: Path, plt) -> Path | None:
    schemes = _trust_schemes(summary)
    if not schemes:
        return None
    names = peer_names(summary)
    labels = [f"{n} ({group_label(summary, n)})" if group_label(summary, n) else n for n in names]
    colours = plt.get_cmap("viridis").with_extremes(bad=NO_EDGE_COLOUR)
    figure, axes = _grid(plt, len(schemes), 4.3, 4.3)
    image = None
    for k, (axis, scheme) in enumerate(zip(axes, schemes)):
        image = axis.imshow(trust_matrix(summary, scheme, names), vmin=0.0, vmax=1.0, cmap=colours)
        axis.set_title(scheme)
        axis.set_xticks(range(len(names)), names, rotation=90, fontsize=7)
        first_column = k % min(len(schemes), 3) == 0
        axis.set_yticks(range(len(names)), labels if first_column else names, fontsize=7)
        axis.set_xlabel("trusted neighbour j", fontsize=8)
        if first_column:
            axis.set_ylabel("peer i", fontsize=8)
    bar = figure.colorbar(image, ax=axes, shrink=0.8)
    bar.set_label("trust w_ij: peer i's weight on j (final round, mean over seeds); grey: not neighbours")
    return _save(figure, run_dir / "trust_heatmap.png", plt)


def _topology(summary, run_dir: Path, plt) -> Path:
    import networkx as nx
    from matplotlib.patches import Patch

    names = peer_names(summary)
    graph = nx.Graph()
    graph.add_nodes_from(names)
    graph.add_edges_from(tuple(e) for e in summary["edges"])
    position = nx.circular_layout(graph)
    seed_groups = next(iter(groups_by_seed(summary).values()))
    groups = list(dict.fromkeys(seed_groups[n] for n in names if n in seed_groups))
    colour_of = {g: plt.cm.tab10(i % 10) for i, g in enumerate(groups)}
    colours = [colour_of.get(seed_groups.get(n), "0.7") for n in names]
    schemes = _trust_schemes(summary) or [None]
    figure, axes = _grid(plt, len(schemes), 4.3, 4.4)
    for axis, scheme in zip(axes, schemes):
        rows = summary["schemes"][scheme]["trust"] if scheme else {}
        # An edge's width is the trust both ends put on each other (w_ij + w_ji).
        widths = [0.5 + 8 * (rows.get(u, {}).get(v, 0.0) + rows.get(v, {}).get(u, 0.0)) if rows else 1.0
                  for u, v in graph.edges()]
        nx.draw_networkx(graph, position, ax=axis, node_color=colours, width=widths, edge_color="0.4",
                         font_size=7, node_size=420)
        axis.set_title(f"edges by {scheme} trust (w_ij + w_ji)" if scheme else "topology", fontsize=9)
        axis.axis("off")
    if groups:
        several = len(groups_by_seed(summary)) > 1 and any(
            g != seed_groups for g in groups_by_seed(summary).values())
        title = f"data group (seed {summary['seeds'][0]})" if several else "data group"
        figure.legend(handles=[Patch(color=colour_of[g], label=g) for g in groups], title=title,
                      loc="lower center", ncol=min(len(groups), 6), fontsize=8, bbox_to_anchor=(0.5, -0.02))
    graphs = {tuple(sorted(map(tuple, edges))) for edges in (summary.get("edges_by_seed") or {}).values()}
    if len(graphs) > 1:
        figure.suptitle(f"graph of seed {summary['seeds'][0]} (each seed draws its own)", fontsize=9)
    return _save(figure, run_dir / "topology.png", plt)


def _attacker_trust(summary, run_dir: Path, plt) -> Path | None:
    rows = {name: row["attack"] for name, row in summary["schemes"].items() if "attack" in row}
    if not rows:
        return None
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for i, (name, row) in enumerate(rows.items()):
        axis.plot(row["attacker_trust"]["round"], row["attacker_trust"]["mean"], label=name, **style(i))
    first = next(iter(rows.values()))
    axis.set(xlabel="round", ylabel="weight on attackers (mean over honest peers)",
             title=f"Trust on {', '.join(first['attackers'])} ({', '.join(first['kinds'])})")
    _integer_rounds(axis)
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, run_dir / "attacker_trust.png", plt)


def draw_sweep(rows: list[dict], path: str | Path) -> Path:
    """One column per sweep point (its values other than the scheme), a marker per scheme at its mean test
    perplexity with the std over peers and seeds as an error bar, and each seed's mean as a small dot."""
    plt = _pyplot()
    points = list(dict.fromkeys(row["label"] for row in rows))
    schemes = list(dict.fromkeys(row["scheme"] for row in rows))
    width = 0.8 / len(schemes)
    figure, axis = plt.subplots(figsize=(max(6.0, 1.2 * len(points) * max(1, len(schemes)) ** 0.5 + 2.5), 4.6))
    for k, scheme in enumerate(schemes):
        mine = [(i, r) for i, point in enumerate(points) for r in rows if r["label"] == point and r["scheme"] == scheme]
        xs = [i - 0.4 + width * (k + 0.5) for i, _ in mine]
        axis.errorbar(xs, [r["test_ppl_mean"] for _, r in mine], yerr=[r["test_ppl_std"] for _, r in mine],
                      color=plt.cm.tab10(k % 10), marker=MARKERS[k % len(MARKERS)], linestyle="none", capsize=3,
                      markersize=7, label=scheme)
        for x, (_, r) in zip(xs, mine):
            per_seed = list(r["per_seed"].values())
            axis.plot([x] * len(per_seed), per_seed, ".", color="0.35", markersize=4)
    rotate = len(points) > 3
    axis.set_xticks(range(len(points)), points, rotation=20 if rotate else 0, ha="right" if rotate else "center",
                    fontsize=8)
    axis.set_xlim(-0.6, len(points) - 0.4)
    axis.set_ylabel("test perplexity")
    axis.set_title("Test perplexity by sweep point: mean ± std over peers and seeds (dots: each seed)", fontsize=10)
    axis.grid(axis="y", alpha=0.3)
    axis.legend(title="scheme", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return _save(figure, Path(path), plt)
