"""`p2pfed run EXPERIMENT.toml`, `sweep`, `peer PEER.toml`, `id`, `init` (p2pfed.scaffold) and `report`."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from datetime import datetime
from pathlib import Path

from p2pfed.checkpoint import CheckpointError
from p2pfed.config import ConfigError
from p2pfed.errors import first_error
from p2pfed.load import load_experiment, load_peer, parse_override, with_plugins
from p2pfed.scaffold import add_init_command


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pfed", description="Decentralized, personalized LoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (every scheme and seed) into a run folder")
    run.add_argument("experiment", nargs="?", help="an experiment TOML file, e.g. examples/default.toml")
    _run_folder_options(run, "run")
    _engine_option(run)

    sweep = commands.add_parser("sweep", help="run an experiment over the product of grids of config values")
    sweep.add_argument("experiment", nargs="?", help="an experiment TOML file, e.g. examples/default.toml")
    sweep.add_argument("--grid", dest="grids", action="append", default=[], metavar="KEY=[V1,V2,...]",
                       help="values of a config key, e.g. --grid 'topology=[ring,complete]' --grid 'seeds=[0,1]'")
    _run_folder_options(sweep, "sweep")
    _engine_option(sweep)

    peer = commands.add_parser("peer", help="run one peer as its own process over libp2p")
    peer.add_argument("config", help="a peer TOML file (name, scheme, listen, neighbours, state_dir, ...)")
    peer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set training.rounds=5")
    peer.add_argument("--quiet", action="store_true", help="no line per round")
    _plugin_option(peer)

    ident = commands.add_parser("id", help="print a peer's libp2p peer ID (what its neighbours list for it)")
    ident.add_argument("config", help="a peer TOML file")
    ident.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    add_init_command(commands)  # `p2pfed init N --out DIR`: a swarm's peer files (p2pfed.scaffold)

    show = commands.add_parser("report", help="print the table and redraw the plots of a finished run, or "
                                              "summarize the state folders of peers run by hand")
    show.add_argument("paths", nargs="+", metavar="RUN_DIR|STATE_DIR",
                      help="a run folder, or peers' state folders (each holds result.json), or folders of them")
    show.add_argument("--out", help="where a report on state folders goes (default: their common parent)")
    _plugin_option(show)

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args.run_dir = None  # the run folder in use, once known: named when Ctrl-C stops the run
    try:
        handler = getattr(args, "handler", None) or {"run": _run, "sweep": _sweep, "peer": _peer, "id": _id,
                                                       "report": _report}[args.command]
        return handler(args)
    except BaseException as raised:
        error = first_error(raised)  # trio wraps a peer's error in one ExceptionGroup per nursery
        if isinstance(error, KeyboardInterrupt):
            print(_stopped(args), file=sys.stderr)
            return 130
        if isinstance(error, (ConfigError, CheckpointError)):
            print(f"p2pfed: configuration error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):  # a missing file, a state_dir that is a file, an address in use
            print(f"p2pfed: {error}", file=sys.stderr)
            return 2
        if type(error).__name__ == "BrokenProcessPool":
            print(f"p2pfed: a worker process died ({error}); {_kept(args)}", file=sys.stderr)
            return 1
        raise


def _run_folder_options(command, name: str) -> None:
    command.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                         help="override a config key, e.g. --set training.rounds=5 --set 'schemes=[\"local\"]'")
    command.add_argument("--out", help=f"the {name} folder (default: OUTPUT_DIR/NAME-TIMESTAMP); it must be new "
                                       f"or empty, unless --resume or --force")
    command.add_argument("--resume", nargs="?", const=True, default=False, metavar=f"{name.upper()}_DIR",
                         help=f"run only what the {name} folder is missing (the folder's own config, or the "
                              f"experiment's if given, which must be the same)")
    command.add_argument("--force", action="store_true", help=f"start a {name} folder in use afresh")
    _plugin_option(command)


def _plugin_option(command) -> None:
    command.add_argument("--plugin", dest="plugins", action="append", default=[], metavar="MODULE_OR_FILE",
                         help="a module or .py file registering trust rules or aggregators, added to the config's "
                              "plugins (repeatable)")


def _engine_option(command) -> None:
    command.add_argument("--engine", choices=("process", "ray"), default="process",
                         help="where the jobs run: worker processes here (workers = N), or Ray tasks on the "
                              "cluster RAY_ADDRESS names, else a local Ray instance (pip install 'p2pfed[ray]')")


def _engine_where(args, config) -> str:
    if args.engine == "ray":
        return f"as Ray tasks on {os.environ.get('RAY_ADDRESS') or 'a local Ray instance'}"
    return "one libp2p process per peer" if config.runtime == "libp2p" else f"in process, {config.workers} worker(s)"


def _stopped(args) -> str:
    return f"p2pfed: stopped; {_kept(args)}" if args.run_dir else "p2pfed: stopped before any job started"


def _kept(args) -> str:
    if not args.run_dir:
        return "no run folder was made"
    done = len(list((Path(args.run_dir)).rglob("jobs/*.json")))
    return (f"{done} finished job(s) kept in {args.run_dir}; `p2pfed {args.command} --resume {args.run_dir}` "
            f"runs the rest")


def _where(args) -> tuple[Path | None, bool]:
    """The folder named by --out or --resume, and whether to resume."""
    if isinstance(args.resume, str):
        if args.out and Path(args.out) != Path(args.resume):
            raise ConfigError(f"--resume {args.resume} and --out {args.out}: name the folder once")
        return Path(args.resume), True
    if args.resume and not args.out:
        raise ConfigError("--resume: name the folder (--resume DIR, or --out DIR --resume)")
    return (Path(args.out) if args.out else None), bool(args.resume)


def _run(args) -> int:
    from rich.console import Console

    from p2pfed import report
    from p2pfed.api import Swarm
    from p2pfed.display import JobBars, Overall, job_rounds, progress_bars
    from p2pfed.experiment import check_engine, default_run_dir, quiet_transformers

    out, resume = _where(args)
    if args.experiment:
        swarm = Swarm(load_experiment(args.experiment, with_plugins(args.experiment, args.overrides, args.plugins)))
    elif resume:
        _no_plugins_on_resume(args)
        swarm = Swarm.resume(out)
        if args.overrides:  # only keys that change no result may differ (workers): the folder checks it
            keys = {".".join(path): value for path, value in map(parse_override, args.overrides)}
            swarm = Swarm(swarm.config, **keys)
    else:
        raise ConfigError("run: give an experiment file (p2pfed run EXPERIMENT.toml), or --resume RUN_DIR")
    config = swarm.config
    check_engine(args.engine, config)
    quiet_transformers()
    console = Console()
    out = out or default_run_dir(config)
    swarm.check(out, resume=resume, force=args.force, log=console.print)  # before anything is drawn or made
    where = _engine_where(args, config)
    console.print(f"[bold]{config.name}[/]: {config.num_peers} peers, schemes {', '.join(config.schemes)}, "
                  f"seeds {list(config.seeds)}, {where} -> {out}")
    jobs = len(config.schemes) * len(config.seeds)
    with progress_bars(console) as bars:
        overall = Overall(bars, "all jobs", jobs, jobs * job_rounds(config))
        listener = JobBars(bars, config, overall)
        args.run_dir = out
        result = swarm.run(out, resume=resume, force=args.force, listener=listener, log=console.print,
                           engine=args.engine)
    summary = result.to_json()
    report.print_table(summary, console)
    console.print(f"results.json, events.jsonl and plots in {out} ({summary['wall_time_s']:.0f} s)")
    return 0


def _sweep(args) -> int:
    from rich.console import Console

    from p2pfed.display import JobBars, Overall, job_rounds, progress_bars
    from p2pfed.experiment import quiet_transformers
    from p2pfed.sweep import check_sweep, plan_sweep, run_sweep, saved_points

    out, resume = _where(args)
    if args.experiment:
        if not args.grids:
            raise ConfigError("sweep: give at least one --grid KEY=[V1,V2,...]")
        points = plan_sweep(args.experiment, args.grids, with_plugins(args.experiment, args.overrides, args.plugins))
    elif resume:
        _no_plugins_on_resume(args)
        if args.grids or args.overrides:
            raise ConfigError("sweep --resume SWEEP_DIR runs the sweep as it was planned: no --grid or --set")
        points = saved_points(out)
    else:
        raise ConfigError("sweep: give an experiment file and --grid KEY=[...], or --resume SWEEP_DIR")
    quiet_transformers()
    console = Console()
    first = points[0].config
    out = out or Path(first.output_dir) / f"sweep-{first.name}-{datetime.now():%Y%m%d-%H%M%S}"
    checked = check_sweep(points, out, resume=resume, force=args.force, log=console.print, engine=args.engine)
    where = f", {_engine_where(args, first)}" if args.engine == "ray" else ""
    console.print(f"[bold]sweep[/] of {first.name}: {len(points)} points{where} -> {out}")
    jobs = sum(len(p.config.schemes) * len(p.config.seeds) for p in points)
    rounds = sum(len(p.config.schemes) * len(p.config.seeds) * job_rounds(p.config) for p in points)
    with progress_bars(console) as bars:
        overall = Overall(bars, f"sweep, {len(points)} points", jobs, rounds)
        args.run_dir = out
        summary = run_sweep(points, out, resume=resume, force=args.force, log=console.print, checked=checked,
                            engine=args.engine,
                            listener_for=lambda p: JobBars(bars, p.config, overall, f"{p.name[:3]} ", upfront=False))
    _print_sweep(summary, console)
    console.print(f"summary.json, summary.csv and summary.png in {out}; a run folder per point")
    return 0


def _no_plugins_on_resume(args) -> None:
    if args.plugins:
        raise ConfigError("--plugin: a resumed folder imports the plugins its saved config names; give none")


def _print_sweep(summary: dict, console) -> None:
    """Test perplexity by point (its values other than the scheme) and scheme; the best of each row in green."""
    from rich.table import Table

    rows = summary["rows"]
    schemes = list(dict.fromkeys(row["scheme"] for row in rows))
    table = Table(title="Test perplexity by sweep point and scheme, mean ± std over peers and seeds")
    table.add_column("point")
    for scheme in schemes:
        table.add_column(scheme, justify="right")
    for label in dict.fromkeys(row["label"] for row in rows):
        cells = {row["scheme"]: row for row in rows if row["label"] == label}
        best = min(cells, key=lambda s: cells[s]["test_ppl_mean"])
        texts = [f"{cells[s]['test_ppl_mean']:.3f} ± {cells[s]['test_ppl_std']:.3f}" if s in cells else "-"
                 for s in schemes]
        table.add_row(label, *[f"[bold green]{t}[/]" if s == best else t for s, t in zip(schemes, texts)])
    console.print(table)


def _peer(args) -> int:
    import trio

    from p2pfed.experiment import quiet_transformers
    from p2pfed.peer import finished_before

    config = load_peer(args.config, with_plugins(args.config, args.overrides, args.plugins))
    done = finished_before(config)
    if done is not None:  # at once: no model to load, no neighbours to wait for
        print(f"{config.name}: finished before: all {done.rounds[-1].round} rounds are done (test perplexity "
              f"{done.final_test_ppl:.3f}), results in {Path(config.state_dir) / 'result.json'}; nothing to do "
              f"(raise training.rounds to train on, or move {config.state_dir} away to start afresh)", flush=True)
        return 0
    quiet_transformers()
    import torch

    # The process is the peer's own, often beside other peers on the machine: one thread unless `threads` says.
    torch.set_num_threads(config.threads or 1)
    logging.getLogger("p2pfed").setLevel(logging.INFO)  # waiting, resumption, dropped updates, failed sends
    for handler in logging.getLogger().handlers:  # main's stderr handler: every line names its peer already
        if type(handler) is logging.StreamHandler:
            handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return trio.run(_serve_peer, config, args.quiet)


async def _serve_peer(config, quiet: bool) -> int:
    """Run the peer until its last round, or until SIGTERM/SIGINT stops it (checkpointed; rerun to resume)."""
    import signal

    import trio

    from p2pfed.peer import Peer, RoundFinished
    from p2pfed.peerlog import SILENT_NEIGHBOUR_EXIT

    stopped, silent, started = False, None, []
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                nonlocal stopped
                async for _ in signals:
                    stopped = True
                    for running in started:  # a swarm member tells the members it leaves (bounded to 2 s)
                        await running.leave()
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with Peer(config) as peer:
                started.append(peer)
                print(f"{config.name}: peer ID {peer.peer_id}, listening on {', '.join(peer.listen_addrs)}", flush=True)
                shown: list[int] = []  # the rounds whose line is printed
                if not quiet:
                    nursery.start_soon(_print_rounds, peer, RoundFinished, shown)
                result = await peer.finished()
                with trio.move_on_after(1.0):  # the last round's line before the summary
                    while not quiet and (shown or [-1])[-1] < result.rounds[-1].round:
                        await trio.sleep(0.01)
                silent = peer.silent_summary()  # while the endpoint still knows each neighbour's state
                print(f"{config.name}: finished round {result.rounds[-1].round}, test perplexity "
                      f"{result.final_test_ppl:.3f}", flush=True)
            nursery.cancel_scope.cancel()
    if stopped:
        print(f"{config.name}: stopped; run the same command to resume from {config.state_dir or '(no state_dir)'}",
              file=sys.stderr)
        return 1
    if silent:
        print(silent, file=sys.stderr, flush=True)
        return SILENT_NEIGHBOUR_EXIT
    return 0


async def _print_rounds(peer, round_finished, shown: list[int]) -> None:
    from p2pfed.peerlog import round_line

    async with peer.subscribe() as events:
        async for event in events:
            if isinstance(event, round_finished):
                print(round_line(peer.name, event.record), flush=True)
                shown.append(event.record.round)


def _id(args) -> int:
    from p2pfed.net.identity import peer_id_of
    from p2pfed.peer import key_pair_of

    config = load_peer(args.config, args.overrides)
    print(peer_id_of(key_pair_of(config)))
    return 0


def _report(args) -> int:
    from p2pfed import plots, report
    from p2pfed.plugins import import_plugins
    from p2pfed.runfolder import RESULTS_FILE, load_state_folders

    import_plugins(args.plugins)  # the scheme names of the results are looked up to draw them
    if len(args.paths) == 1 and (Path(args.paths[0]) / RESULTS_FILE).is_file():
        run_dir = Path(args.paths[0])
        summary = report.load_results(run_dir)
        import_plugins((summary.get("config") or {}).get("plugins", []))  # those the run named (absolute paths)
    else:  # the state folders of peers run by hand, each with its result.json
        jobs = load_state_folders(args.paths)
        summary = report.summarize(None, jobs)
        run_dir = Path(args.out) if args.out else Path(os.path.commonpath([Path(p).resolve() for p in args.paths]))
        if not args.out and (run_dir / "result.json").is_file():
            run_dir = run_dir.parent  # one state folder: beside it, not inside it
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / RESULTS_FILE).write_text(json.dumps(summary, indent=2), encoding="utf-8")
        print(run_dir / RESULTS_FILE)
    report.print_table(summary)
    for path in plots.draw_plots(summary, run_dir):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
