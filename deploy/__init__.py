"""Wiring, no logic: the `kvmesh` command and the launchers that start the parts.

`cli.py` is the console script (one subcommand per role, imported lazily); `local.py` is
`kvmesh serve` (the whole stack on one machine, as child processes, which `local_children.py`
starts and stops); `ray_*.py` run the same roles as Ray actors; `worker_plan.py` says which
workers both launchers start (colocated, or prefill and decode roles) and how they share GPUs;
`internal_auth.py` makes a deployment's internal token and tenant secret; `errors.py` holds
every launcher error. Cluster configs sit beside them (`ray/`, `redis/`, `grafana/`). The
launchers start each role as a `kvmesh <role>` child process, so they import no role's code
beyond the router's API-key parsing and `InvalidConfig` and the worker's `WorkerConfig`
defaults; `cli.py` imports the one role CLI asked for (its `register`). No other package
imports this one.
"""
