"""Benchmark: wall time, steps and bytes on the wire to a target test accuracy, for 4 GoSGD
gossip nodes against 4-process DistributedDataParallel and one process of plain SGD.

    python -m bench.time_to_accuracy [--model mlp|cnn|wide_mlp] [--target 0.95] [--p 0.1]
        [--max-steps 2000] [--eval-every 10] [--timeout-s 300] [--device cpu|cuda]
        [--repeats 1] [--json bench/results/time_to_accuracy.json] [--no-netns]
        [--straggler [--cap 0.4]] [--systems gossip,gossip-step,ddp,sgd]
        [--encoding fp32[,bf16,fp16,int8]] [--link-mbit N] [--defer-eval]

The systems, run one after the other, train the same model from the same initial weights
(`cluster_seed`), with the same per-worker batch size, learning rate and momentum:
  gossip  4 processes, each a GossipNode (push probability --p, peers = the other three on
          127.0.0.1, no mDNS), node i on shard i/4 of the training set;
  ddp     4 processes of DistributedDataParallel (gloo, gradients all-reduced every step,
          rendezvous through a TCP store on 127.0.0.1), rank i on shard i/4;
  sgd     1 process of plain SGD on the whole training set.
With --encoding, the nodes push in that wire encoding; a list runs gossip once per encoding,
one after the other in the same repeat (rows and summary entries `gossip-ENC`, fp32 plain
`gossip`). --model wide_mlp (wide.py) is a communication-heavy model: 2.47 M parameters for
little compute, so that the links, not the CPUs, set the pace.
A step is one optimizer step of one worker on one batch of --batch-size examples (every batch
is full: a short epoch tail is skipped, the same way in every worker).

The rule. The clock starts when every worker of the system is ready (data loaded, model built,
peers confirmed or process group up). Every worker evaluates its own model on the whole test
set every --eval-every steps. The target is reached at the first step k at which the mean test
accuracy of the workers' models at step k is >= --target (DDP's models agree to rounding: the
ranks' all-reduce results may differ in the last bits, and so, rarely, may an accuracy; sgd
has one). Wall time to target is when the slowest worker finished step k, less the time that
worker spent evaluating (reported apart). Gossip nodes stop at their next evaluation once the
target is reached (the parent sees all four), DDP ranks all-gather their accuracies and stop
when the same mean reaches the target, and every worker stops by itself at --max-steps or
after --timeout-s.

Deferred evaluation (--defer-eval). An evaluation takes the cores the workers train on: a
worker evaluating while others still train slows them, and their wall time counts it (DDP's
ranks evaluate together and then wait for each other; gossip nodes at equal speed do about
the same, but nothing makes them). With --defer-eval a worker only keeps a copy of its model
at each evaluation step (that copy's time is paused, like an evaluation), trains all
--max-steps (or until --timeout-s), and evaluates its copies once every worker of the system
has trained; the rule then reads the same curve. Nothing stops at the target, so --max-steps
should be little past it: a worker holds --max-steps / --eval-every + 1 copies of its model,
allocated before training starts.

Bytes on the wire. The benchmark runs in a private network namespace: it re-executes itself
under `unshare --net --mount` (root), brings its loopback up, and nothing but its own
processes talk there. Bytes are the loopback's transmitted bytes in /proc/net/dev, which is
per namespace (/sys/class/net/lo/statistics still shows the host's after `unshare -n` unless
sysfs is remounted), so every system is counted the same way: payload, gRPC or gloo framing,
TCP/IP headers and ACKs, membership calls. On loopback every packet is received as it is sent,
so rx equals tx; both are recorded. Bytes to target run from the start of training to the
evaluation at step k (each worker reads the counter there; the largest reading counts); setup
(rendezvous, DDP's initial broadcast, the gossip nodes' first Hellos) and the whole run are
reported apart. With --no-netns the host's loopback is read instead, other traffic included.

Shaped links (--link-mbit N, links.py). Inside that namespace every worker of every system runs
in a namespace of its own, a host with one veth (eth0, 10.77.0.<rank + 1>) on a bridge, both ends
shaped with tbf to N Mbit/s: DDP's gloo and the gossip nodes talk over links like real hosts'.
Bytes are then each worker's eth0 tx bytes, summed over the workers (to target: each counted
from the start of training to its evaluation at step k); setup and totals are read at the
bridge's ends. Every namespace and link is removed when the run ends, also on failure.

Repeats. One run of a system is one draw: gossip's message schedule depends on timing, and
every system on its initial model and data order. `--repeats N` runs every system N times;
repeat r > 0 seeds the initial model, the data order and the gossip draws from its own names
(repeat 0 is the single run's seeds), the systems of one repeat share them, and each ratio is
against the DDP run of the same repeat. The JSON has every run (`systems`, each row with its
`repeat`) and, per system, the median, min and max over the repeats that reached the target
(`summary`).

Stragglers. `--straggler` caps every worker at --cap cores with a cgroup v1 cpu quota (root),
applied once all workers are ready, and runs each system twice per repeat: all equal, then with
the last worker at a third of the cap; it reports each system's slowdown (wall time to target
with the straggler over the all-equal run of the same repeat). Its default systems are DDP,
`gossip-step` (gossip on the paper's coin per step) and `gossip` (the node's default schedule).

The parts: `systems` (what one worker of each system runs), `supervisor` (the parent: one
system at a time, its processes and what they report), `report` (the tables and the summary
over repeats), `straggler` (the caps and the slowdowns), `links` (shaped links), `wide` (the
benchmark's models), `__main__` (the command line).
"""
