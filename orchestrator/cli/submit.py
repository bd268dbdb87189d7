"""`limpq submit`: run a command on a Ray cluster through its job API, follow its logs, and exit
with the job's status (0 SUCCEEDED, 1 FAILED or STOPPED)."""

from __future__ import annotations

import argparse
import sys

from orchestrator.distributed.submission import (
    exit_code,
    follow,
    load_runtime_env,
    status_message,
    submit,
)


def _submit(args: argparse.Namespace) -> int:
    entrypoint = args.entrypoint[1:] if args.entrypoint[:1] == ["--"] else args.entrypoint
    runtime_env = load_runtime_env(args.runtime_env, args.working_dir)
    job = submit(entrypoint, args.address, runtime_env)
    print(f"submitted job {job.job_id} to {job.address}", flush=True)
    if args.no_wait:
        print(f"follow it with: ray job logs --follow {job.job_id}")
        return 0
    try:
        status = follow(job)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job.job_id} keeps running (ray job stop {job.job_id})", file=sys.stderr)
        raise
    code = exit_code(status)
    if code == 0:
        print(f"job {job.job_id} {status}")
    else:
        reason = status_message(job)
        print(f"job {job.job_id} {status}" + (f": {reason}" if reason else ""), file=sys.stderr)
    return code


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "submit",
        help="run a command on a Ray cluster (job API), follow its logs, exit with its status",
        description="Example: limpq submit -- python jobs/pipeline.py --config jobs/configs/demo.yaml",
    )
    parser.add_argument("--address", help="job API URL (default: RAY_API_SERVER_ADDRESS, RAY_ADDRESS, "
                                          "else http://127.0.0.1:8265)")
    parser.add_argument("--runtime-env", metavar="FILE", help="runtime env YAML, e.g. cluster/runtime_env.yaml")
    parser.add_argument("--working-dir", help="directory uploaded as the job's working directory "
                                              "(default: the runtime env's, else .)")
    parser.add_argument("--no-wait", action="store_true", help="print the job id and return without following")
    parser.add_argument("entrypoint", nargs=argparse.REMAINDER, help="-- then the command to run on the cluster")
    parser.set_defaults(func=_submit)
