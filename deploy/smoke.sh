#!/usr/bin/env bash
# deploy/smoke.sh: build the gosgd-node image offline and run the 4-node compose demo end to end.
#
#   sudo bash deploy/smoke.sh        (from anywhere; needs root, apt and PyPI, no image registry)
#
# Steps, each skipped when its result is already there (the script is safe to rerun):
#   1. apt-get install docker.io docker-compose debootstrap, when missing; start dockerd (overlay2,
#      else vfs, else vfs without iptables) when no daemon answers, and stop it again at the end
#      if this script started it.
#   2. Base image: $BASE_IMAGE if present or pullable; otherwise a local stand-in built with
#      debootstrap (Debian bookworm minbase + python3 + python3-venv) and `docker import`,
#      cached as $STANDIN_IMAGE.
#   3. deploy/wheels/: torch from `pip download torch==$TORCH_VERSION` (it must be a +cpu wheel:
#      the script stops rather than let a CUDA torch in), then every other dependency with
#      `pip wheel`. The host's python3 must match the base image's (3.11 for bookworm).
#   4. docker build --network none --build-arg WHEELS=deploy/wheels: proves the offline build.
#   5. Compose project $PROJECT up (deploy/docker-compose.yml); waits at most $SMOKE_TIMEOUT s
#      until each node has printed its `done:` line with test accuracy >= $MIN_ACCURACY,
#      checking on the way: mDNS advertising in every log, 3 peers found, the Docker health
#      status (gosgd-health; `unhealthy` fails, a check that never finished is a warning),
#      the Prometheus endpoint, and the mDNS services as seen from the host on the bridge.
#   5b. Two more nodes on the same network with no --peers at all (mDNS alone) must find each
#      other and exchange messages: the proof that discovery works without the seed fallback.
#   6. Prints a summary; every container and network is removed on any exit (trap).
# Exit status 0 when every check passed. Images and the wheel folder are kept for reruns.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
COMPOSE_FILE=$ROOT/deploy/docker-compose.yml
WHEELS_DIR=$ROOT/deploy/wheels
CACHE=${CACHE:-/var/cache/gosgd-smoke}
BASE_IMAGE=${BASE_IMAGE:-python:3.11-slim-bookworm}
STANDIN_IMAGE=${STANDIN_IMAGE:-gosgd-standin/python:3.11-bookworm}
IMAGE=gosgd-p2p:latest  # the image deploy/docker-compose.yml runs
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PROJECT=${PROJECT:-gosgd-smoke}
NODES=(node-0 node-1 node-2 node-3)
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-900}
MIN_ACCURACY=${MIN_ACCURACY:-0.95}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
HOST_PYTHON=${HOST_PYTHON:-python3}

say() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*"; }
die() { say "FAILED: $*" >&2; exit 1; }
started=$SECONDS

[ "$(id -u)" = 0 ] || die "run as root (apt-get, dockerd, debootstrap)"

# --- 1. tools and the Docker daemon ---------------------------------------------------------
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v docker-compose >/dev/null || docker compose version >/dev/null 2>&1 \
    || need+=(docker-compose)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    mkdir -p "$CACHE"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
        >"$CACHE/apt.log" 2>&1 || { tail -n 20 "$CACHE/apt.log" >&2; die "apt-get install failed"; }
fi
if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
else
    COMPOSE=(docker-compose)
fi

DOCKERD_PID=
start_dockerd() {  # start_dockerd DOCKERD_ARGS...: 0 when the daemon answers within 60 s
    mkdir -p "$CACHE"
    dockerd "$@" >"$CACHE/dockerd.log" 2>&1 &
    DOCKERD_PID=$!
    for _ in $(seq 60); do
        docker info >/dev/null 2>&1 && return 0
        kill -0 "$DOCKERD_PID" 2>/dev/null || break
        sleep 1
    done
    kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
    DOCKERD_PID=
    return 1
}
if ! docker info >/dev/null 2>&1; then
    say "starting dockerd"
    # overlay2 and iptables work on this project's hosts; the others are fallbacks for kernels
    # without overlayfs or nf_tables (containers on one bridge need no NAT to talk)
    start_dockerd --storage-driver overlay2 || start_dockerd --storage-driver vfs \
        || start_dockerd --storage-driver vfs --iptables=false \
        || die "dockerd did not start; see $CACHE/dockerd.log"
    say "dockerd running ($(docker info -f '{{.Driver}}' 2>/dev/null) storage)"
fi

cleanup() {
    local status=$?
    say "tearing down"
    docker rm -f "$PROJECT-mdns-only-0" "$PROJECT-mdns-only-1" >/dev/null 2>&1 || true
    "${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" down -v --remove-orphans >/dev/null 2>&1 \
        || true
    [ -n "${BROWSE_PID:-}" ] && kill "$BROWSE_PID" 2>/dev/null
    if [ -n "$DOCKERD_PID" ]; then
        kill "$DOCKERD_PID" 2>/dev/null && wait "$DOCKERD_PID" 2>/dev/null
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- 2. the base image ------------------------------------------------------------------------
if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 \
    || timeout 120 docker pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
    base=$BASE_IMAGE
else
    base=$STANDIN_IMAGE
    if ! docker image inspect "$STANDIN_IMAGE" >/dev/null 2>&1; then
        say "$BASE_IMAGE cannot be pulled: building stand-in $STANDIN_IMAGE with debootstrap"
        rootfs=$CACHE/rootfs
        rm -rf "$rootfs"
        debootstrap --variant=minbase --include=python3,python3-venv bookworm "$rootfs" \
            "$DEBIAN_MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
            || die "debootstrap failed; see $CACHE/debootstrap.log"
        chroot "$rootfs" python3 -c "import venv, ensurepip" || die "stand-in lacks python3-venv"
        rm -rf "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/lib/apt/lists/*
        tar -C "$rootfs" -c . | docker import \
            --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$STANDIN_IMAGE" >/dev/null
        rm -rf "$rootfs"
    fi
fi
say "base image: $base"

# --- 3. the wheel folder ----------------------------------------------------------------------
py_base=$(docker run --rm "$base" python3 -c 'import sys; print("%d.%d" % sys.version_info[:2])')
py_host=$("$HOST_PYTHON" -c 'import sys; print("%d.%d" % sys.version_info[:2])')
[ "$py_base" = "$py_host" ] \
    || die "host $HOST_PYTHON is $py_host, the base image's python3 is $py_base: set HOST_PYTHON"
say "filling deploy/wheels (python $py_host)"
quiet_pip() {  # pip, without the warnings about index folders this host's pip.conf names
    "$HOST_PYTHON" -m pip "$@" 2> >(grep -v 'is ignored: it is neither a file nor' >&2)
}
quiet_pip download -q --no-deps -d "$WHEELS_DIR" "torch==$TORCH_VERSION"
torch_whl=$(find "$WHEELS_DIR" -name "torch-$TORCH_VERSION*.whl" | sort | tail -n 1)
case $(basename "${torch_whl:-none}") in
    torch-"$TORCH_VERSION"+cpu-*) ;;
    *) die "torch==$TORCH_VERSION resolved to '${torch_whl:-nothing}', not a +cpu wheel" ;;
esac
# the project's dependencies, from a copy of the sources (pip would build inside the work tree)
src=$(mktemp -d)
cp -r "$ROOT/pyproject.toml" "$ROOT/README.md" "$ROOT/gosgd_p2p" "$src/"
quiet_pip wheel -q -w "$WHEELS_DIR" "$torch_whl" "$src" "setuptools>=68" wheel
rm -rf "$src" "$WHEELS_DIR"/gosgd_p2p-*.whl  # the image installs the sources themselves
if [ -n "$(find "$WHEELS_DIR" -name 'nvidia_*' -o -name 'triton-*')" ]; then
    die "CUDA wheels found in $WHEELS_DIR; remove them"
fi
say "$(find "$WHEELS_DIR" -name '*.whl' | wc -l) wheels, $(du -sh "$WHEELS_DIR" | cut -f1)"

# --- 4. the image, built without network ------------------------------------------------------
say "building $IMAGE offline (docker build --network none)"
docker build --network none -t "$IMAGE" -f "$ROOT/Dockerfile" \
    --build-arg BASE_IMAGE="$base" --build-arg WHEELS=deploy/wheels "$ROOT" \
    >"$CACHE/build.log" 2>&1 \
    || { tail -n 30 "$CACHE/build.log" >&2; die "offline image build failed"; }
size=$(docker image inspect -f '{{.Size}}' "$IMAGE" | awk '{ printf "%.0f MB", $1 / 1e6 }')
say "image: $IMAGE, $size, user $(docker image inspect -f '{{.Config.User}}' "$IMAGE")"

# --- 5. the compose demo ----------------------------------------------------------------------
"${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" down -v --remove-orphans >/dev/null 2>&1 || true
say "starting ${#NODES[@]} nodes: ${COMPOSE[*]} -f deploy/docker-compose.yml up"
"${COMPOSE[@]}" -p "$PROJECT" -f "$COMPOSE_FILE" up -d --no-build >/dev/null 2>&1 \
    || die "compose up failed"

cid() {  # the container of compose service $1 (v1 and v2 name them differently)
    docker ps -aq --filter "label=com.docker.compose.project=$PROJECT" \
        --filter "label=com.docker.compose.service=$1" | head -n 1
}
# mDNS as seen from the host, on the compose bridge (the bridge's gateway address)
net=$(docker inspect -f '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' \
    "$(cid node-0)")
gateway=$(docker network inspect -f '{{range .IPAM.Config}}{{.Gateway}}{{end}}' "$net")
BROWSE_OUT=$CACHE/mdns-browse.txt
BROWSE_PY=${BROWSE_PY:-$ROOT/.venv/bin/python}  # any python with zeroconf (the project's venv)
"$BROWSE_PY" -c 'import zeroconf' 2>/dev/null || BROWSE_PY="true"  # skipped: reported below
"$BROWSE_PY" - "$gateway" "${#NODES[@]}" >"$BROWSE_OUT" 2>&1 <<'EOF' &
import sys, time
from zeroconf import ServiceBrowser, Zeroconf, IPVersion
zc = Zeroconf(interfaces=[sys.argv[1]], ip_version=IPVersion.V4Only)
seen = set()
def on_change(zeroconf, service_type, name, state_change):
    info = zeroconf.get_service_info(service_type, name, timeout=2000)
    if info is not None and name not in seen:
        seen.add(name)
        node_id = info.properties.get(b"id", b"?").decode()
        print(f"{node_id} {info.parsed_addresses()[0]}:{info.port}", flush=True)
ServiceBrowser(zc, "_gosgd._tcp.local.", handlers=[on_change])
deadline = time.monotonic() + 90
while len(seen) < int(sys.argv[2]) and time.monotonic() < deadline:
    time.sleep(0.5)
zc.close()
EOF
BROWSE_PID=$!

scrape() {  # scrape IP: "N samples, step S" from the node's /metrics, nothing if unreachable
    "$HOST_PYTHON" - "$1" <<'EOF' 2>/dev/null || true
import sys, urllib.request
try:
    text = urllib.request.urlopen(f"http://{sys.argv[1]}:9100/metrics", timeout=3).read().decode()
except OSError:
    sys.exit()
lines = [line for line in text.splitlines() if line.startswith("gosgd_")]
steps = [int(float(line.split()[-1])) for line in lines if line.startswith("gosgd_steps_total")]
if lines:
    print(f"{len(lines)} samples, step {steps[0] if steps else '?'}")
EOF
}
declare -A healthy health_log metrics
deadline=$((SECONDS + SMOKE_TIMEOUT))
while :; do
    done_count=0
    for n in "${NODES[@]}"; do
        c=$(cid "$n")
        [ -n "$c" ] || die "no container for $n"
        state=$(docker inspect -f '{{.State.Status}} {{.State.ExitCode}}' "$c")
        if [ "${state% *}" = running ]; then
            # the Docker HEALTHCHECK (gosgd-health): healthy once is enough, unhealthy fails
            health=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$c")
            case "${healthy[$n]:-}:$health" in
                healthy:*) ;;
                *:healthy | *:unhealthy) healthy[$n]=$health ;;
                *) healthy[$n]=$health
                   health_log[$n]=$(docker inspect -f \
                       '{{if .State.Health}}{{range .State.Health.Log}}{{.Output}}{{end}}{{end}}' \
                       "$c" | tail -n 1) ;;
            esac
            ip=$(docker inspect -f '{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}' "$c")
            scraped=$(scrape "$ip")
            [ -n "$scraped" ] && metrics[$n]=$scraped  # the last scrape before the node ended
        elif [ "$state" != "exited 0" ]; then
            docker logs --tail 30 "$c" >&2 || true
            die "$n is '$state'"
        fi
        if docker logs "$c" 2>/dev/null | grep ' done: step ' >/dev/null; then
            done_count=$((done_count + 1))
        fi
    done
    [ "$done_count" = "${#NODES[@]}" ] && break
    [ "$SECONDS" -lt "$deadline" ] \
        || die "only $done_count of ${#NODES[@]} nodes done after ${SMOKE_TIMEOUT}s"
    sleep 3
done

# --- 5b. mDNS alone: two more nodes on the same network, with no seed at all ----------------
done_line() { docker logs "$1" 2>/dev/null | grep ' done: step ' | tail -n 1 || true; }
done_field() {  # done_field LINE NAME: the word after NAME in a node's `done:` line
    sed -n "s/.* $2 \([^ ]*\).*/\1/p" <<<"$1"
}
say "mDNS-only check: 2 more nodes on the compose network, without --peers"
for i in 0 1; do
    docker rm -f "$PROJECT-mdns-only-$i" >/dev/null 2>&1 || true  # left by an aborted run
    docker run -d --name "$PROJECT-mdns-only-$i" --network "$net" --read-only --tmpfs /tmp \
        -v "$ROOT/deploy/compose-token:/run/secrets/cluster-token:ro" \
        "$IMAGE" --listen 0.0.0.0:7070 --cluster mdns-only --wait-for-peers 1 --wait-timeout 60 \
        --token-file /run/secrets/cluster-token \
        --steps 100 --eval-every 0 --threads 1 >/dev/null
done
mdns_only=()
for i in 0 1; do
    c=$PROJECT-mdns-only-$i
    status=$(timeout 300 docker wait "$c" || echo timeout)
    line=$(done_line "$c")
    received=$(done_field "$line" received)
    if ! docker logs "$c" 2>&1 | grep '1 peers ready' >/dev/null || [ "$status" != 0 ] \
        || [ "${received:-0}" = 0 ]; then
        docker logs --tail 20 "$c" >&2
        die "mDNS-only node $i: exit $status, received ${received:-nothing}: no peer by mDNS"
    fi
    node_id=$(awk '{ print $2 }' <<<"$line")
    mdns_only+=("$node_id: accuracy $(done_field "$line" accuracy), received $received")
done

# --- 6. checks and summary ------------------------------------------------------------------
failures=0
fail() { say "$*"; failures=$((failures + 1)); }
echo
echo "== summary: ${#NODES[@]} containers (${COMPOSE[*]}), image $IMAGE from $base =="
printf '%-7s %-20s %-5s %-15s %-8s %-9s %-9s %s\n' \
    service node-id mdns peers accuracy weight health metrics
weights=()
founders=0
LOG_DIR=${SMOKE_LOG_DIR:-$(mktemp -d /tmp/gosgd-smoke.XXXXXX)}
for n in "${NODES[@]}"; do
    c=$(cid "$n")
    log=$(docker logs "$c" 2>&1)
    printf '%s\n' "$log" >"$LOG_DIR/$n.log"
    grep -q "(founder," <<<"$log" && founders=$((founders + 1))
    line=$(done_line "$c")
    acc=$(done_field "$line" accuracy)
    weight=$(done_field "$line" weight)
    weights+=("$weight")
    mdns=no
    grep -q "mDNS: advertising" <<<"$log" && mdns=yes
    peers=$(grep -o '[0-9]* peers ready after [0-9.]* s' <<<"$log" | head -n 1 \
        | sed 's/ peers ready after / in /')
    printf '%-7s %-20s %-5s %-15s %-8s %-9.6f %-9s %s\n' "$n" "$(awk '{ print $2 }' <<<"$line")" \
        "$mdns" "${peers:-none}" "$acc" "$weight" "${healthy[$n]:-none}" "${metrics[$n]:-none}"
    [ "$mdns" = yes ] || fail "$n: no 'mDNS: advertising' in its log"
    [ -n "$peers" ] || fail "$n: never saw its 3 peers"
    awk -v a="$acc" -v m="$MIN_ACCURACY" 'BEGIN { exit !(a >= m) }' \
        || fail "$n: accuracy $acc < $MIN_ACCURACY"
    case ${healthy[$n]:-none} in
        healthy) ;;
        unhealthy) fail "$n: Docker health check: unhealthy" ;;
        *) say "$n: WARNING: no health check finished while it ran:" \
               "${health_log[$n]:-no check ran}" ;;
    esac
    [ -n "${metrics[$n]:-}" ] || fail "$n: /metrics not reached"
    { grep -E "Traceback|ERROR" <<<"$log" || true; } | head -n 3 | sed "s/^/  $n log: /"
done
wait "$BROWSE_PID" 2>/dev/null || true
BROWSE_PID=
if [ "$BROWSE_PY" = true ]; then
    echo "mDNS from the host: skipped (no python with zeroconf; set BROWSE_PY)"
else
    found=$(sort -u "$BROWSE_OUT" | grep -c ':7070' || true)
    echo "mDNS from the host on the compose bridge ($gateway): $found _gosgd._tcp services"
    sed 's/^/  /' "$BROWSE_OUT"
    [ "$found" -ge "${#NODES[@]}" ] || fail "the host saw $found mDNS services"
fi
total=$(printf '%s\n' "${weights[@]}" | awk '{ s += $1 } END { printf "%.6f", s }')
echo "total weight $total ($founders founders, $((${#NODES[@]} - founders)) joined; logs in $LOG_DIR)"
awk -v t="$total" -v f="$founders" 'BEGIN { exit !(t - f < 1e-6 && f - t < 1e-6) }' \
    || fail "total weight $total is not the founders' $founders"
echo "mDNS only, no seeds (2 more nodes, 100 steps): ${mdns_only[0]}; ${mdns_only[1]}"
echo "elapsed $((SECONDS - started)) s"
[ "$failures" = 0 ] || die "$failures check(s) failed"
say "PASSED"
