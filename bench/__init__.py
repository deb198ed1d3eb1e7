"""The project's benchmarks, run as modules from the repository root.

    python -m bench.transport         PushState against raw TCP and bare gRPC on loopback
    python -m bench.overhead          what gossip costs the training loop, at p = 0, 0.1, 1.0
    python -m bench.sender_placement  where the sender runs: GIL or CPU
    python -m bench.gil               what message handling costs a thread that needs the GIL
    python -m bench.wire_codec        the chunk codec and the flat snapshot, in one process
    python -m bench.gpu_micro         the device side of a push and a merge (CUDA)
    python -m bench.time_to_accuracy  gossip against DDP and plain SGD, to a target accuracy
    python -m bench.soak              a local gosgd-node cluster under churn for minutes
    python -m bench.freeze            daemons SIGSTOPped for minutes: the weight stays exact
    python -m bench.experiments       the GoSGD paper's comparisons in gosgd-sim
    bash bench/gpu_run.sh             the GPU set, on a CUDA host

The scripts share these modules, and none imports another script:

    report     writing a result as JSON, with the date and the machine
    timing     timing repeated calls
    procs      child processes: a job's result, reaping, dying with the parent, RSS
    netns      a private network namespace, its loopback's byte counter, free ports
    workloads  the model, batch and training step of the overhead-style trainers
    sink       a GossipNode that takes every push and drops it unmerged

Results go to bench/results/; docs/benchmarks.md quotes them, with their dates.
"""
