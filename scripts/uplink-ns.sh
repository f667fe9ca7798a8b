# Sourced by the uplink benchmarks: a store's uplink, emulated. `uplink_up RATE_MBIT` creates a
# network namespace joined to the host by a veth pair, and caps the namespace's egress with a
# `tbf` qdisc; `in_ns CMD…` runs a command inside it; `uplink_sent_bytes` reads the bytes the
# qdisc has sent (everything on the wire: frames, headers, WebSocket and S3 alike);
# `uplink_down` removes both. Needs root. Nothing leaves the machine.
#
# `netem` is not available on this kernel, so no delay is added: the round trip is the veth's,
# and the limit is the rate.
NS=bh-uplink
HOST_IF=bh-up0
NS_IF=bh-up1
HOST_IP=10.213.77.1
NS_IP=10.213.77.2

uplink_up() {
  if [[ $(id -u) != 0 ]]; then
    echo "$(basename "$0"): needs root for ip netns and tc" >&2
    exit 2
  fi
  uplink_down
  ip netns add "$NS"
  ip link add "$HOST_IF" type veth peer name "$NS_IF"
  ip link set "$NS_IF" netns "$NS"
  ip addr add "$HOST_IP/24" dev "$HOST_IF"
  ip link set "$HOST_IF" up
  ip netns exec "$NS" ip addr add "$NS_IP/24" dev "$NS_IF"
  ip netns exec "$NS" ip link set "$NS_IF" up
  ip netns exec "$NS" ip link set lo up
  # The store's uplink: its egress, capped.
  ip netns exec "$NS" tc qdisc add dev "$NS_IF" root tbf rate "${1}mbit" burst 32kb latency 100ms
}

uplink_down() {
  ip netns del "$NS" 2>/dev/null || true
  ip link del "$HOST_IF" 2>/dev/null || true
}

in_ns() { ip netns exec "$NS" "$@"; }

uplink_sent_bytes() {
  ip netns exec "$NS" tc -s qdisc show dev "$NS_IF" | awk '/Sent/ {print $2; exit}'
}
