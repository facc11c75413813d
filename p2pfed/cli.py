"""`p2pfed run EXPERIMENT.toml`, `p2pfed peer PEER.toml` and `p2pfed report RUN_DIR`."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from p2pfed.checkpoint import CheckpointError
from p2pfed.config import ConfigError
from p2pfed.errors import first_error
from p2pfed.load import load_experiment, load_peer


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="p2pfed", description="Decentralized, personalized LoRA fine-tuning.")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run an experiment (every scheme and seed) into a run folder")
    run.add_argument("experiment", help="an experiment TOML file, e.g. examples/default.toml")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config key, e.g. --set training.rounds=5 --set 'schemes=[\"local\"]'")
    run.add_argument("--out", help="the run folder (default: OUTPUT_DIR/NAME-TIMESTAMP)")

    peer = commands.add_parser("peer", help="run one peer as its own process over libp2p")
    peer.add_argument("config", help="a peer TOML file (name, scheme, listen, neighbours, state_dir, ...)")
    peer.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                      help="override a config key, e.g. --set training.rounds=5")
    peer.add_argument("--quiet", action="store_true", help="no line per round")

    ident = commands.add_parser("id", help="print a peer's libp2p peer ID (what its neighbours list for it)")
    ident.add_argument("config", help="a peer TOML file")
    ident.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")

    show = commands.add_parser("report", help="print the table and redraw the plots of a finished run")
    show.add_argument("run_dir")

    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "peer":
            return _peer(args)
        if args.command == "id":
            return _id(args)
        return _report(args)
    except BaseException as raised:
        error = first_error(raised)  # trio wraps a peer's error in one ExceptionGroup per nursery
        if isinstance(error, (ConfigError, CheckpointError)):
            print(f"p2pfed: configuration error: {error}", file=sys.stderr)
            return 2
        if isinstance(error, OSError):  # a missing file, a state_dir that is a file, an address in use
            print(f"p2pfed: {error}", file=sys.stderr)
            return 2
        raise


def _run(args) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from p2pfed import report
    from p2pfed.experiment import job_label, new_run_dir, quiet_transformers, run_experiment

    config = load_experiment(args.experiment, args.overrides)
    quiet_transformers()
    console = Console()
    run_dir = new_run_dir(config, args.out)
    where = ("one libp2p process per peer" if config.runtime == "libp2p"
             else f"in process, {config.workers} worker(s)")
    console.print(f"[bold]{config.name}[/]: {config.num_peers} peers, schemes {', '.join(config.schemes)}, "
                  f"seeds {list(config.seeds)}, {where} -> {run_dir}")
    per_job = config.num_peers * config.training.rounds
    with Progress(TextColumn("{task.description:<24}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as progress:
        tasks = {job_label(scheme, seed): progress.add_task(job_label(scheme, seed), total=per_job)
                 for seed in config.seeds for scheme in config.schemes}
        summary = run_experiment(config, run_dir, lambda label, n: progress.advance(tasks[label], n),
                                 log=console.print)
    report.print_table(summary, console)
    console.print(f"results.json, events.jsonl and plots in {run_dir} ({summary['wall_time_s']:.0f} s)")
    return 0


def _peer(args) -> int:
    import trio

    from p2pfed.experiment import quiet_transformers

    config = load_peer(args.config, args.overrides)
    quiet_transformers()
    logging.getLogger("p2pfed").setLevel(logging.INFO)  # resumption, dropped updates, unreachable neighbours
    return trio.run(_serve_peer, config, args.quiet)


async def _serve_peer(config, quiet: bool) -> int:
    """Run the peer until its last round, or until SIGTERM/SIGINT stops it (checkpointed; rerun to resume)."""
    import signal

    import trio

    from p2pfed.peer import Peer, RoundFinished

    stopped = False
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:
            async def stop_on_signal() -> None:
                nonlocal stopped
                async for _ in signals:
                    stopped = True
                    nursery.cancel_scope.cancel()
                    return

            nursery.start_soon(stop_on_signal)
            async with Peer(config) as peer:
                print(f"{config.name}: peer ID {peer.peer_id}, listening on {', '.join(peer.listen_addrs)}", flush=True)
                if not quiet:
                    nursery.start_soon(_print_rounds, peer, RoundFinished)
                result = await peer.finished()
                print(f"{config.name}: finished round {result.rounds[-1].round}, test perplexity "
                      f"{result.final_test_ppl:.3f}", flush=True)
            nursery.cancel_scope.cancel()
    if stopped:
        print(f"{config.name}: stopped; run the same command to resume from {config.state_dir or '(no state_dir)'}",
              file=sys.stderr)
        return 1
    return 0


async def _print_rounds(peer, round_finished) -> None:
    async with peer.subscribe() as events:
        async for event in events:
            if isinstance(event, round_finished):
                r = event.record
                ppl = "-" if r.test_ppl is None else f"{r.test_ppl:.3f}"
                missing = f", missing {', '.join(r.missing)}" if r.missing else ""
                print(f"{peer.name}: round {r.round}, test ppl {ppl}{missing}", flush=True)


def _id(args) -> int:
    from p2pfed.net.identity import peer_id_of
    from p2pfed.peer import key_pair_of

    config = load_peer(args.config, args.overrides)
    print(peer_id_of(key_pair_of(config)))
    return 0


def _report(args) -> int:
    from p2pfed import report

    summary = report.load_results(args.run_dir)
    report.print_table(summary)
    for path in report.draw_plots(summary, Path(args.run_dir)):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
