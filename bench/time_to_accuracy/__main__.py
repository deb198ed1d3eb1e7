"""The command line of the time-to-accuracy benchmark (see the package's docstring)."""

from __future__ import annotations

import argparse
import contextlib
import shlex
import sys
import time

import torch

from bench.cgroup import CpuCaps, unavailable
from bench.netns import (
    PRIVATE_LOOPBACK,
    SHARED_LOOPBACK,
    bring_up_loopback,
    enter_private_namespace,
    in_private_namespace,
)
from bench.report import write_json
from bench.time_to_accuracy import __doc__ as DOC  # the benchmark's description
from bench.time_to_accuracy.links import SHAPED_LINKS, ShapedLinks
from bench.time_to_accuracy.report import (
    RULE,
    print_summary,
    print_table,
    ratios_vs_ddp,
    summarize,
)
from bench.time_to_accuracy.straggler import SYSTEMS as STRAGGLER_SYSTEMS
from bench.time_to_accuracy.straggler import capper, print_slowdowns, slowdowns
from bench.time_to_accuracy.supervisor import run_system
from bench.time_to_accuracy.systems import (
    GOSSIP,
    KNOWN_SYSTEMS,
    SETTINGS,
    SYSTEMS,
    WORKERS,
    gloo_cuda_problem,
)
from bench.time_to_accuracy.wide import BENCH_MODELS
from gosgd_p2p.wire import ENCODINGS


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m bench.time_to_accuracy", description=DOC.splitlines()[0]
    )
    parser.add_argument("--model", choices=BENCH_MODELS, default="mlp")
    parser.add_argument("--dataset", choices=("digits", "synthetic"), default="digits")
    parser.add_argument("--target", type=float, default=0.95, help="test accuracy (0.95)")
    parser.add_argument("--p", type=float, default=0.1, help="gossip push probability (0.1)")
    parser.add_argument("--batch-size", type=int, default=32, help="per worker (32)")
    parser.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (0.05)")
    parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum (0.9)")
    parser.add_argument("--max-steps", type=int, default=2000, help="per worker (2000)")
    parser.add_argument("--eval-every", type=int, default=10, help="steps (10)")
    parser.add_argument(
        "--defer-eval", action="store_true",
        help="keep a copy of every worker's model at each evaluation step and evaluate the "
        "copies after training, so that no evaluation shares the cores with training; "
        "every worker trains --max-steps",
    )  # fmt: skip
    parser.add_argument("--timeout-s", type=float, default=300.0, help="per system (300)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (1)")
    parser.add_argument(
        "--systems", default=None,
        help=f"of {','.join(KNOWN_SYSTEMS)}, in this order (default {','.join(SYSTEMS)}; "
        f"with --straggler {STRAGGLER_SYSTEMS})",
    )  # fmt: skip
    parser.add_argument(
        "--straggler", action="store_true",
        help="cap every worker at --cap cores (cgroup cpu quota) and run each system twice: "
        "all equal, then the last worker at a third of the cap",
    )  # fmt: skip
    parser.add_argument("--cap", type=float, default=0.4, help="cores per worker (0.4)")
    parser.add_argument(
        "--encoding", default="fp32",
        help="gossip's wire encoding; a comma-separated list runs gossip once per encoding",
    )  # fmt: skip
    parser.add_argument(
        "--link-mbit", type=float, default=0.0, metavar="N",
        help="every worker a host of its own on a bridge, its link shaped to N Mbit/s (tbf)",
    )  # fmt: skip
    parser.add_argument(
        "--repeats", type=int, default=1,
        help="runs of every system, each seeding the initial model, data order and draws anew",
    )  # fmt: skip
    parser.add_argument("--json", default="bench/results/time_to_accuracy.json")
    parser.add_argument("--no-netns", action="store_true", help="count the host's loopback")
    args = parser.parse_args()
    chosen = args.systems or (STRAGGLER_SYSTEMS if args.straggler else ",".join(SYSTEMS))
    systems = [s for s in chosen.split(",") if s]
    if not systems or any(s not in KNOWN_SYSTEMS for s in systems):
        parser.error(f"--systems: a comma-separated subset of {','.join(KNOWN_SYSTEMS)}")
    if args.straggler:
        why = unavailable()
        if why is not None:
            parser.error(f"--straggler: cannot cap CPU: {why}")
    encodings = [e for e in args.encoding.split(",") if e]
    if not encodings or any(e not in ENCODINGS for e in encodings):
        parser.error(f"--encoding: a comma-separated subset of {','.join(ENCODINGS)}")
    if args.link_mbit < 0 or (args.link_mbit and args.no_netns):
        parser.error("--link-mbit: a rate > 0, in the private namespace (not with --no-netns)")
    if min(args.max_steps, args.eval_every, args.batch_size, args.threads, args.repeats) < 1:
        parser.error(
            "--max-steps, --eval-every, --batch-size, --threads and --repeats must be >= 1"
        )
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available here")

    # bytes: this namespace's loopback, entered by re-executing ourselves
    if args.no_netns:
        counting = SHARED_LOOPBACK
    elif in_private_namespace():
        bring_up_loopback("time_to_accuracy")
        counting = PRIVATE_LOOPBACK
    else:
        enter_private_namespace("time_to_accuracy")
        return  # not reached: the process now runs the namespaced copy

    ddp_device, ddp_note = args.device, None
    if args.device == "cuda" and "ddp" in systems:
        ddp_note = gloo_cuda_problem()
        if ddp_note is not None:
            ddp_device = "cpu"
            print(f"DDP runs on the CPU: gloo cannot all-reduce CUDA tensors here ({ddp_note})")

    all_rows = []
    variants = (False, True) if args.straggler else (False,)
    runs = [(s, e) for s in systems for e in (encodings if s in GOSSIP else ["fp32"])]
    with contextlib.ExitStack() as stack:
        if args.link_mbit:  # removed on the way out, whatever happens
            stack.enter_context(ShapedLinks(WORKERS, args.link_mbit))
            counting = f"{SHAPED_LINKS} to {args.link_mbit:g} Mbit/s"
        for repeat in range(args.repeats):
            for straggler in variants:
                rows = []
                for system, encoding in runs:
                    name = f"{system} ({encoding})" if system in GOSSIP else system
                    what = " with a straggler" if straggler else ""
                    print(f"repeat {repeat}: running {name}{what} ...", end=" ", flush=True)
                    started = time.monotonic()
                    device = ddp_device if system == "ddp" else args.device
                    with CpuCaps() as caps:  # removed, with every group it made, after the run
                        on_start = capper(caps, args.cap, straggler) if args.straggler else None
                        row = run_system(system, args, device, repeat, encoding, on_start)
                    row["straggler"] = straggler
                    rows.append(row)
                    print(f"{time.monotonic() - started:.1f} s, processes included", flush=True)
                ratios_vs_ddp(rows)
                print_table(rows, args, counting, repeat)
                all_rows += rows
    equal_rows = [r for r in all_rows if not r["straggler"]]
    summary = summarize(equal_rows, systems)
    if args.repeats > 1:
        print_summary(summary, args.repeats)
    extra = {}
    if args.straggler:
        summary_slow = summarize([r for r in all_rows if r["straggler"]], systems)
        print("with the straggler:")
        print_summary(summary_slow, args.repeats)
        slow = slowdowns(all_rows)
        print_slowdowns(slow, args.cap)
        extra = {
            "straggler": {"cap_cores": args.cap, "slow_cores": args.cap / 3},
            "summary_straggler": summary_slow,
            "slowdown": slow,
        }
    write_json(
        args.json,
        "time_to_accuracy",
        command=shlex.join(["python", "-m", "bench.time_to_accuracy", *sys.argv[1:]]),
        settings={
            name: getattr(args, name) for name in (*SETTINGS, "device", "encoding", "link_mbit")
        },
        threads_per_worker=args.threads,
        ddp_device=ddp_device,
        ddp_device_note=ddp_note,
        rule=RULE,
        bytes_counted=f"/proc/net/dev tx bytes; {counting}",
        repeats=args.repeats,
        summary=summary,
        **extra,
        systems=all_rows,
    )


if __name__ == "__main__":
    main()
