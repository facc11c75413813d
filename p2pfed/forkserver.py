"""Light peer processes for the libp2p runtime: one parent loads everything once, then forks a child per peer.

A `p2pfed peer` process spends seconds of CPU importing torch, transformers, peft and libp2p and loading the
frozen base, and holds its own copy of all of it. `python -m p2pfed.forkserver PEER.toml LOG ...` does that
work once: it imports those modules, loads the peers' workspace (base model, tokens, the scheme's host) and
then forks one child per peer file. A child runs exactly what `p2pfed peer PEER.toml --quiet` runs (its
output in LOG), on the workspace it inherited: those pages stay shared with the parent and the other
children until written (copy on write).

Forking is safe here because the parent has started no threads that matter: torch is set to one thread before
any work (no OpenMP pool), numpy's OpenBLAS is told to start none, transformers' progress bars (and their
monitor thread) are off, and trio only ever runs in the children.

The parent reports on its stdout, one line each: `started NAME PID` per child, then `exited NAME CODE` as
each ends (CODE as `p2pfed peer` exits: 0 done, 1 stopped, 2 configuration error, 3 silent neighbours),
and exits 0 once every child has. p2pfed.launch reads these lines.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import traceback
from pathlib import Path


def main(argv: list[str]) -> int:
    if len(argv) < 2 or len(argv) % 2:
        print("usage: python -m p2pfed.forkserver PEER.toml LOG [PEER.toml LOG ...]", file=sys.stderr)
        return 2
    # Before numpy and torch load: no thread may run when the children are forked.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # Ctrl-C reaches the children too (one process group): each stops as `p2pfed peer` does; this parent
    # waits for them and reports their statuses.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    pairs = list(zip(argv[0::2], argv[1::2]))
    workspace = _preload(pairs[0][0])
    gc.freeze()  # the parent's objects move out of the collector's sight: collections do not touch their pages
    names = {}
    for path, log in pairs:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(path, log, workspace)  # never returns
        names[pid] = Path(path).stem
        print(f"started {names[pid]} {pid}", flush=True)
    while names:
        pid, status = os.wait()
        if pid in names:
            print(f"exited {names.pop(pid)} {os.waitstatus_to_exitcode(status)}", flush=True)
    return 0


def _preload(path: str):
    """The workspace the children share: what every peer of the job would load for itself. None when the
    file cannot be read (each child then meets the same error and reports it as `p2pfed peer` does)."""
    import torch

    from p2pfed import cli, peer  # noqa: F401 - imported here once, for every child
    from p2pfed.job import open_workspace
    from p2pfed.load import load_peer
    from p2pfed.net import libp2p_endpoint  # noqa: F401
    from p2pfed.strategies import parse_scheme

    try:
        config = load_peer(path)
    except Exception:  # noqa: BLE001 - the children report it, one per peer
        return None
    torch.set_num_threads(config.threads or 1)  # before any torch work: no thread pool to fork over
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its monitor thread would be one more thread at fork time
    hf_logging.set_verbosity_error()
    try:
        workspace = open_workspace(config.as_experiment(), log=lambda *_: None)
        workspace.host_for(parse_scheme(config.scheme))
    except Exception:  # noqa: BLE001 - the same: each child loads for itself and reports what fails
        return None
    return workspace


def _child(path: str, log: str, workspace) -> None:
    code = 1
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C stops a peer as it stops `p2pfed peer`
        descriptor = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(descriptor, 1)
        os.dup2(descriptor, 2)
        os.close(descriptor)
        from p2pfed.cli import main as p2pfed_main
        from p2pfed.job import preloaded

        if workspace is None:
            code = p2pfed_main(["peer", path, "--quiet"])
        else:
            with preloaded(workspace):
                code = p2pfed_main(["peer", path, "--quiet"])
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    except BaseException:  # noqa: BLE001 - the log says what happened; the exit status says that it did
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
