"""An experiment from a script: a graph of your own, the peers' events as they happen, a typed result.

    .venv/bin/python examples/script_swarm.py    # 6 peers on a ring, then on a graph drawn anew each round

`Swarm` runs what `p2pfed run` runs, plus what a TOML file cannot hold: a networkx graph, a function
round -> graph, or each peer's own text (`texts=[Path("notes/"), "some text", ...]`).
"""

import asyncio
from pathlib import Path

import networkx as nx

from p2pfed import RoundFinished, Swarm

EXPERIMENT = Path(__file__).resolve().parent / "default.toml"
SMALL = {"num_peers": 6, "seeds": [0], "schemes": ["fedavg", "validation"], "training": {"rounds": 4}}


def pairs_of_the_round(round_index: int) -> nx.Graph:
    """A random 2-regular graph each round: peers meet other neighbours as they go."""
    return nx.random_regular_graph(2, 6, seed=round_index)


async def main() -> None:
    ring = Swarm(EXPERIMENT, topology=nx.cycle_graph(6), **SMALL).run()  # blocking, in memory
    print(f"ring: best {ring.best}, validation {ring.test_ppl('validation'):.3f}, fedavg {ring.test_ppl('fedavg'):.3f}")
    async with Swarm(EXPERIMENT, topology=pairs_of_the_round, **SMALL) as run:  # in a background thread
        async for e in run.events():  # SwarmEvent(scheme, seed, peer, event): the embedded Peer's events
            record = e.event.record if isinstance(e.event, RoundFinished) else None
            if record and record.round and e.peer == "peer0":
                print(f"{e.scheme} round {record.round}: peer0 heard {', '.join(record.neighbours)}, "
                      f"test ppl {record.test_ppl:.3f}")
        result = await run.result()
    print(f"a graph per round: validation {result.test_ppl('validation'):.3f}")


if __name__ == "__main__":  # worker processes (workers = 2) import this file: run only in the main one
    asyncio.run(main())
