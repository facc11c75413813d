"""Many hosts on one machine: a swarm of `p2pfed peer` processes, each in its own Linux network namespace.

    sudo .venv/bin/python examples/namespaces.py                          # 4 peers on a ring, plain links
    sudo .venv/bin/python examples/namespaces.py --latency-ms 100 --loss 0.01 --rounds 5
    sudo .venv/bin/python examples/namespaces.py --swarm lab              # join by one bootstrap address

The peer files come from `p2pfed init N --out DIR --listen-host 10.77.0.K ...`; peer K runs in namespace K at
10.77.0.K+1. With --latency-ms or --loss every connection between peers passes a relay in the hub namespace that
delays each chunk (one way) and holds back those that would lose a TCP segment by a retransmission timeout
(see docs/libp2p.md, "Many hosts on one machine"); with --netem the kernel's netem does it instead, where the
kernel has it. Needs root and iproute2; everything is torn down at the end,
also on Ctrl-C. Results: DIR/peerK/result.json, logs: DIR/peerK.log and DIR/relay.log.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from p2pfed.netlab import can_create_namespaces, netem_missing, remove_stale_namespaces
from p2pfed.netlab.harness import LabRunError, run_swarm
from p2pfed.netlab.relay import Link


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--peers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--topology", default="ring")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay of every link")
    parser.add_argument("--loss", type=float, default=0.0, help="probability that a TCP segment is lost")
    parser.add_argument("--seed", type=int, default=0, help="seed of the relay's loss draws")
    parser.add_argument("--netem", action="store_true",
                        help="let the kernel's netem delay and drop (where it has it) instead of the relay")
    parser.add_argument("--swarm", help="membership mode: peers join swarm NAME through peer0's address")
    parser.add_argument("--out", default=f"runs/namespaces-{time.strftime('%Y%m%d-%H%M%S')}")
    parser.add_argument("--timeout", type=float, default=600, help="seconds before every process is killed")
    args = parser.parse_args()

    signal.signal(signal.SIGTERM, _interrupt)  # kill PID tears down like Ctrl-C
    reason = can_create_namespaces()
    if reason:
        print(f"cannot run here: {reason}", file=sys.stderr)
        return 2
    if args.netem and netem_missing():
        print(f"--netem: {netem_missing()}; leave --netem out to use the relay", file=sys.stderr)
        return 2
    remove_stale_namespaces()
    out = Path(args.out)
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists and is not empty; give another --out", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    relayed = args.latency_ms > 0 or args.loss > 0
    link = Link(args.latency_ms / 1000, args.loss, args.seed) if relayed else None
    overrides = [f'topology="{args.topology}"', f"training.rounds={args.rounds}",
                 f"training.local_steps={args.local_steps}"]
    print(f"{args.peers} peers in {args.peers} namespaces, {args.topology}, "
          f"{f'links {args.latency_ms:g} ms, loss {args.loss:g}' if link else 'plain links'}"
          f"{f', swarm {args.swarm} (bootstrap)' if args.swarm else ''}; files in {out}", flush=True)
    try:
        run = run_swarm(args.peers, out, link=link, overrides=overrides, swarm=args.swarm, timeout_s=args.timeout,
                        emulate="netem" if args.netem else "relay",
                        on_line=lambda line: print(" ", line, flush=True))
    except LabRunError as error:
        print(f"failed: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("stopped; namespaces removed", file=sys.stderr)
        return 130
    print(f"done in {run.seconds:.0f} s, {run.mean_round_s():.2f} s per round after round 1"
          + (f"; {run.relay_counts}" if run.relay_counts else ""))
    for name, result in run.results.items():
        last = result.rounds[-1]
        missing = sum(len(r.missing) for r in result.rounds)
        print(f"  {name}: test ppl {last.test_ppl:.3f}, neighbours {', '.join(last.neighbours)}, "
              f"{missing} missing update(s) -> {out / name / 'result.json'}")
    return 0


def _interrupt(_signum, _frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
