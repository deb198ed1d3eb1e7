"""Soak test: a local gosgd-node cluster under churn for minutes; weight, memory and accuracy.

Starts N `gosgd-node` daemons on 127.0.0.1 (founders, all with weight 1), then every 20-40 s
(seeded) stops a random live node, with kill -9 (`--mode kill`) or SIGTERM (`--mode term`,
a graceful leave that hands the whole weight to a live peer), waits until it has exited, and
after a short pause restarts it with the same node id (`--restart-ids new`: a fresh one) and
checkpoint folder, seeded with a live node's address: it resumes its step and optimizer state
and rejoins with weight 0 through FetchState. At least `--min-alive` (3) nodes stay up. Every
~5 s it samples each live node's RSS (VmRSS) and its latest JSON record. The founders all wait
for their N-1 peers before training: a founder that trained early would make a later one join
with weight 0 instead of founding with 1.

The exact final total. Nodes run with a step budget that outlasts the run, so none finishes
by itself. At the end the nodes leave one at a time by SIGTERM, each waited for: every leave
hands the node's whole weight to a survivor (exact, the receiver merges it like any message),
and the last node, with no live peer left, keeps its weight ("weight X leaves with us" in its
stderr) and writes it in its final JSON record. The final total is therefore the sum of the
final-record weights of the incarnations stopped at the end (all 0 but the last one's). In
term mode it must equal N (within 1e-9); in kill mode it may only have dropped (<= N), by the
weights the kill -9ed incarnations held.

Also checked: no restart founds (which would invent weight), no node exits unexpectedly, the
stderr logs hold no traceback; and reported against the issue's targets: RSS grows < 10% after
warm-up, and test accuracy reaches 0.95.

Usage: python -m bench.soak --nodes 6 --minutes 10 --mode kill [--seed 0] [--out runs/soak-kill]
Writes <out>/soak.json and prints a table; the node logs are <out>/<slot>-<incarnation>.{jsonl,
err,out}. Exit status 1 when a weight check fails.

The parts: `cluster` (the node processes: start, stop, their logs), `churn` (the schedule:
found, churn, stop at the end; samples), `summary` (the checks and figures from what was
recorded), `report` (the printed table), `__main__` (the command line).
"""
