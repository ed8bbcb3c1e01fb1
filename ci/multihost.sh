#!/usr/bin/env bash
# twinkle_dask on a Dask cluster spread over three simulated hosts: Linux network namespaces
# <prefix>-h0..h2 (10.231.0.1-3, addresses only on the veth ends made here) joined by a bridge
# living in a namespace of its own (<prefix>-br). `dask scheduler` runs on h0 with the driver,
# `dask worker --preload twinkle_dask.worker` processes on h1 and h2; ci/multihost_driver.py
# checks placement, calls and hand-offs host to host, a 1 Gbit/s link (tc tbf), a host cut off
# mid-call and mid-hand-off, then TLS between the hosts from DASK_DISTRIBUTED__COMM__* alone.
# Needs root and iproute2 (ip, tc); prints a SKIP line and exits 0 where namespaces are not allowed.
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
prefix="${TWINKLE_NETNS_PREFIX:-twmh}"
phases="${1:-main tls}"  # ci/multihost.sh ['main tls' | main | tls]

if [ "$(id -u)" != 0 ] || ! command -v ip >/dev/null || ! command -v tc >/dev/null; then
    echo "SKIP ci/multihost.sh: simulated hosts need root and iproute2 (ip, tc)"
    exit 0
fi
if ! ip netns add "$prefix-probe" 2>/dev/null; then
    echo "SKIP ci/multihost.sh: network namespaces are not allowed here (ip netns add failed)"
    exit 0
fi
ip netns del "$prefix-probe"

# shellcheck disable=SC1091
source "$root/ci/env.sh"

namespaces=("$prefix-br" "$prefix-h0" "$prefix-h1" "$prefix-h2")
teardown() {
    # every process still in our namespaces, by PID, then the namespaces (taking their interfaces)
    for ns in "${namespaces[@]}"; do
        if ip netns list | grep -qw "^$ns"; then
            for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
            ip netns del "$ns" 2>/dev/null || true
        fi
    done
}
teardown  # what an interrupted earlier run left
trap teardown EXIT

elapsed() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.2f", b - a }'; }
started=$EPOCHREALTIME
ip netns add "$prefix-br"
ip -n "$prefix-br" link add br0 type bridge
ip -n "$prefix-br" link set br0 up
for i in 0 1 2; do
    ns="$prefix-h$i"
    port="${prefix:0:6}p$i"
    ip netns add "$ns"
    ip -n "$prefix-br" link add "$port" type veth peer name eth0 netns "$ns"
    ip -n "$prefix-br" link set "$port" master br0 up
    ip -n "$ns" addr add "10.231.0.$((i + 1))/24" dev eth0
    ip -n "$ns" link set eth0 up
    ip -n "$ns" link set lo up
done
echo "[multihost] three hosts on a bridge: $(elapsed "$started") s"

cd "$root"
if [[ " $phases " == *" main "* ]]; then
    ip netns exec "$prefix-h0" timeout 240 python ci/multihost_driver.py main --prefix "$prefix"
fi
if [[ " $phases " != *" tls "* ]]; then
    exit 0
fi

# TLS between the hosts, configured only through Dask's configuration (environment variables)
certs="$(mktemp -d)"
chmod 700 "$certs"
openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=twinkle-ci-ca" \
    -keyout "$certs/ca.key" -out "$certs/ca.pem" 2>/dev/null
openssl req -newkey rsa:2048 -nodes -subj "/CN=twinkle-ci" -keyout "$certs/node.key" -out "$certs/node.csr" 2>/dev/null
printf 'subjectAltName=IP:10.231.0.1,IP:10.231.0.2,IP:10.231.0.3\n' > "$certs/ext"
openssl x509 -req -in "$certs/node.csr" -CA "$certs/ca.pem" -CAkey "$certs/ca.key" -CAcreateserial -days 2 \
    -extfile "$certs/ext" -out "$certs/node.pem" 2>/dev/null
export DASK_DISTRIBUTED__COMM__REQUIRE_ENCRYPTION=True
export DASK_DISTRIBUTED__COMM__TLS__CA_FILE="$certs/ca.pem"
for who in SCHEDULER WORKER CLIENT; do
    export "DASK_DISTRIBUTED__COMM__TLS__${who}__CERT=$certs/node.pem"
    export "DASK_DISTRIBUTED__COMM__TLS__${who}__KEY=$certs/node.key"
done
ip netns exec "$prefix-h0" timeout 120 python ci/multihost_driver.py tls --prefix "$prefix"
rm -rf "$certs"
echo "[multihost] all checks passed in $(elapsed "$started") s"
