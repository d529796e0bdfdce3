"""Launch `opt-ds train` with DeepSpeed's runner: `opt-ds launch CONFIG [overrides] --hostfile FILE`.

Checks, before anything starts on any node, that the hostfile is well formed and that its slots fit the
config (world size = TP x PP x DP, TP groups inside a node), then runs
`deepspeed --hostfile FILE --module opt_ds train CONFIG ...`. DeepSpeed itself, given a missing hostfile,
only warns and trains on the local machine; here that is an error. A SIGTERM or Ctrl-C to `opt-ds launch`
stops the whole job gracefully (opt_ds.job).
"""
from __future__ import annotations

import os
import re
import shlex
import shutil
import sys
from collections import OrderedDict
from pathlib import Path

from opt_ds.config import load_config
from opt_ds.errors import UserError
from opt_ds.ports import free_port

HOSTFILE_LINE = re.compile(r"^(\S+)\s+slots=(\d+)\s*$")


class HostfileError(UserError):
    pass


def parse_hostfile(path) -> "OrderedDict[str, int]":
    """Hosts and slots of a DeepSpeed hostfile (`host slots=N` per line, # comments)."""
    path = Path(path)
    if not path.is_file():
        raise HostfileError(f"hostfile {path} does not exist; write one line `hostname slots=GPUS` per node "
                            "(see launchers/hostfile.example)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise HostfileError(f"hostfile {path} is not UTF-8 text (byte {err.start}: {err.reason}); save it as plain "
                            "text, one `hostname slots=N` line per node") from None
    hosts = OrderedDict()
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        match = HOSTFILE_LINE.match(line)
        if not match:
            raise HostfileError(f"{path}:{number}: {raw.strip()!r} is not `hostname slots=N`")
        host, slots = match.group(1), int(match.group(2))
        if host in hosts:
            raise HostfileError(f"{path}:{number}: host {host} is listed twice; list each node once")
        if slots < 1:
            raise HostfileError(f"{path}:{number}: host {host} has slots={slots}; give it at least 1")
        hosts[host] = slots
    if not hosts:
        raise HostfileError(f"hostfile {path} lists no hosts; add lines like `worker-0 slots=8`")
    return hosts


def check_hosts_fit(hosts: dict, tensor: int) -> None:
    for host, slots in hosts.items():
        if slots % tensor:
            raise HostfileError(f"host {host} has {slots} slots, not a multiple of parallel.tensor={tensor}: a "
                                "tensor-parallel group must sit inside one node (NVLink); fix the slots or TP")


# DeepSpeed's multi-node launchers and the program each needs (its backend_exists()); slurm is opt_ds's own.
LAUNCHER_TOOLS = {"pdsh": "pdsh", "openmpi": "ompi_info", "mpich": "mpirun", "impi": "mpirun", "mvapich": "mpirun",
                  "slurm": "srun"}


def check_tools(args, hosts: dict) -> None:
    """What DeepSpeed's runner needs on this machine to start a hostfile job: ssh (its reachability check of
    the first host) and, for more than one node, the launcher's program. Missing, it ends in a traceback."""
    if "--no_ssh" not in args.runner_arg and "--no_ssh_check" not in args.runner_arg and not shutil.which("ssh"):
        raise HostfileError("ssh is not installed: DeepSpeed's runner reaches the hosts of a hostfile over ssh. "
                            "Install an ssh client (e.g. apt install openssh-client), or on one machine use "
                            "--num-gpus N instead of --hostfile")
    tool = LAUNCHER_TOOLS[args.launcher]
    if len(hosts) > 1 and not shutil.which(tool):
        raise HostfileError(f"--launcher {args.launcher} needs `{tool}`, which is not installed on this machine; "
                            f"install it, or choose another --launcher ({', '.join(LAUNCHER_TOOLS)})")


def add_arguments(parser) -> None:
    parser.add_argument("config", help="YAML run config ('-': none, defaults plus overrides)")
    parser.add_argument("overrides", nargs="*", help="section.key=value overrides")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--hostfile", help="DeepSpeed hostfile: one `hostname slots=N` line per node")
    where.add_argument("--num-gpus", type=int, help="run on this machine with N processes (GPUs, or CPU ranks)")
    parser.add_argument("--launcher", default="pdsh", choices=LAUNCHER_TOOLS,
                        help="multi-node launcher: pdsh, openmpi, ... (DeepSpeed's runner) or slurm (one srun task "
                             "per rank, so SLURM's signals reach every rank; see opt_ds/slurm.py)")
    parser.add_argument("--master-port", type=int, default=None,
                        help="rendezvous port on the first node (default: a port free on this machine, so runs "
                             "sharing a node do not collide)")
    parser.add_argument("--master-addr", default=None, help="address of the first node (default: DeepSpeed's choice)")
    parser.add_argument("--runner-arg", action="append", default=[], metavar="ARG",
                        help="extra argument for DeepSpeed's runner, repeatable (e.g. --runner-arg=--ssh_port=2222)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the command, do not run it")


def build_command(args, world_size: int) -> list:
    # DeepSpeed's runner, started through opt_ds.quiet so its start-up noise is filtered like the ranks'
    cmd = [sys.executable, "-m", "opt_ds.quiet", "--master_port", str(args.master_port)]
    if args.hostfile:
        cmd += ["--hostfile", str(args.hostfile), "--launcher", args.launcher]
    else:
        cmd += ["--num_gpus", str(world_size)]
    if args.master_addr:
        cmd += ["--master_addr", args.master_addr]
    cmd += args.runner_arg
    verbose = ["--verbose"] if getattr(args, "verbose", False) else []
    return cmd + ["--module", "opt_ds", "train", str(args.config), *args.overrides, *verbose]


def run(args) -> int:
    if args.master_port is None:
        args.master_port = free_port()
    if args.hostfile:
        hosts = parse_hostfile(args.hostfile)
        world_size = sum(hosts.values())
    else:
        if args.num_gpus < 1:
            raise HostfileError("--num-gpus must be >= 1")
        hosts, world_size = {"localhost": args.num_gpus}, args.num_gpus
    cfg = load_config(args.config, args.overrides, world_size=world_size)
    if args.hostfile:
        check_hosts_fit(hosts, cfg.tensor)
    if args.hostfile and args.launcher != "slurm" and not args.dry_run:
        check_tools(args, hosts)
    if args.hostfile and args.launcher == "slurm":
        from opt_ds.slurm import srun_command
        cmd = srun_command(hosts, master_addr=args.master_addr, master_port=args.master_port, config=args.config,
                           overrides=args.overrides, check_installed=not args.dry_run)
    else:
        cmd = build_command(args, world_size)
    print(f"[opt_ds] launching {cfg.layout} on {world_size} processes over {len(hosts)} node(s):\n  "
          + shlex.join(cmd), flush=True)
    if args.dry_run:
        return 0
    if cmd[0] == "srun":                        # become srun: a signal to the job script's child reaches srun,
        os.execvp(cmd[0], cmd)                  # which forwards it to every rank (no Python in between to die)
    from opt_ds.job import Job
    return Job(cmd, ranks_here=len(hosts) == 1).run()       # DeepSpeed's runner uses pdsh for 2+ nodes only
