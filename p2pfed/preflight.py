"""Everything about an experiment that can fail before work starts, checked in the calling process.

A mistake found here is one line and exit status 2 before the run folder is made, whether the jobs would have
run here or in worker processes: the schemes and ranks, a script's graph and texts, the model source, the data
folder and its groups, each seed's graph (parameters that depend on the number of peers) and data split (enough
text for every peer), attacks that need a second group, and the adapter targets of every layout.
"""

from __future__ import annotations

from p2pfed.config import ExperimentConfig
from p2pfed.inputs import JobInputs
from p2pfed.job import Workspace, job_setup, open_workspace
from p2pfed.strategies import check_schemes, parse_scheme
from p2pfed.workers import workspace_key


def check_experiment(config: ExperimentConfig, inputs: JobInputs = JobInputs(), log=print,
                     workspaces: dict[str, Workspace] | None = None) -> Workspace:
    """Raise (ConfigError, CheckpointError, OSError) on anything that would fail later; return the workspace
    opened for the check (the model and the tokenized groups), which jobs in this process may reuse.
    `workspaces` caches them across the experiments of a sweep."""
    check_schemes(config)
    inputs.check(config)
    key = workspace_key(config)
    workspace = workspaces.get(key) if workspaces is not None else None
    if workspace is None:
        workspace = open_workspace(config, log=log)  # the model source, the data folder and its groups
        if workspaces is not None:
            workspaces[key] = workspace
    for scheme in {parse_scheme(s).has_experts: parse_scheme(s) for s in config.schemes}.values():
        workspace.host_for(scheme)  # LoRA and expert targets that name no module of the model
    for seed in config.seeds:
        data = inputs.data_for(workspace.base.tokenizer.encode, config.data, seed)
        job_setup(config, workspace, seed, inputs.graph, data)  # each seed's graph and split
    return workspace
