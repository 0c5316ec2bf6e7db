#!/usr/bin/env bash
# The built image, run for real: a store broker and a local HQ broker (mosquitto), and the gateway as compose runs
# it (non-root, read-only root filesystem, no capabilities, /var/lib/store-gateway on a volume). Checks that:
#   - the image's health check turns healthy;
#   - a till's sale reaches the HQ broker (the gateway's receipt check says HQ acknowledged it);
#   - the process runs as a user other than root, with no capabilities, and cannot write its root filesystem;
#   - the journal on the volume survives a container restart (the sale is still there, once).
#
#   bash docker/smoke-test.sh                      # builds localhost/store-gateway:smoke first
#   IMAGE=localhost/store-gateway:debian bash docker/smoke-test.sh    # an image built already
#
# With podman (docker works too: ENGINE=docker). The brokers run MOSQUITTO_IMAGE (eclipse-mosquitto:2 by
# default), anonymous and plain: this checks the gateway's image, not the store's broker settings. Build
# arguments for the image: PYTHON_IMAGE (a base to use instead of the pinned python image), and CA_BUNDLE (a
# CA file for pip behind a TLS-intercepting proxy). Run from a checkout; needs Python 3.11 with the gateway's
# simulators importable (the project's .venv) to make a realistic sale.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
ENGINE=${ENGINE:-podman}
MOSQUITTO_IMAGE=${MOSQUITTO_IMAGE:-eclipse-mosquitto:2}
PYTHON=${PYTHON:-.venv/bin/python}
run_id=sgsmoke$$
net=$run_id-net
work=
api_port=${API_PORT:-18080}

say() { printf '\n== %s\n' "$*"; }
cleanup() {
    "$ENGINE" rm -f "$run_id-gw" "$run_id-store" "$run_id-hq" >/dev/null 2>&1 || true
    "$ENGINE" volume rm -f "$run_id-data" >/dev/null 2>&1 || true
    "$ENGINE" network rm -f "$net" >/dev/null 2>&1 || true
    [[ -n $work ]] && rm -rf "$work"
}
trap cleanup EXIT
work=$(mktemp -d)
token=$("$PYTHON" -c 'import secrets; print(secrets.token_urlsafe(24))')

if [[ -z ${IMAGE:-} ]]; then
    IMAGE=localhost/store-gateway:smoke
    say "building $IMAGE"
    args=(-f docker/Dockerfile -t "$IMAGE")
    if [[ -n ${PYTHON_IMAGE:-} ]]; then
        args+=(--build-arg "PYTHON_IMAGE=$PYTHON_IMAGE")
    fi
    if [[ $ENGINE == podman ]]; then
        args+=(--format docker)  # podman's OCI format would drop the HEALTHCHECK
        if [[ -n ${CA_BUNDLE:-} ]]; then
            args+=(-v "$CA_BUNDLE:/etc/ssl/certs/ca-certificates.crt:ro")
        fi
    fi
    "$ENGINE" build "${args[@]}" .
fi

say "brokers: the store's and HQ's"
"$ENGINE" network create "$net" >/dev/null
printf 'listener 1883\nallow_anonymous true\n' >"$work/mosquitto.conf"
chmod 0644 "$work/mosquitto.conf"
for name in store hq; do
    "$ENGINE" run -d --name "$run_id-$name" --network "$net" --network-alias "$name-broker" \
        -v "$work/mosquitto.conf:/mosquitto/config/mosquitto.conf:ro" \
        "$MOSQUITTO_IMAGE" mosquitto -c /mosquitto/config/mosquitto.conf >/dev/null
done

say "the gateway: non-root, read-only, no capabilities, its journal on a volume"
mkdir -p "$work/config"
cat >"$work/config/store.yaml" <<END
gateway_id: gw-smoke
store: {id: hk-smoke, name: Smoke test store, timezone: Asia/Hong_Kong}
data_dir: /var/lib/store-gateway
store_broker: {host: store-broker, port: 1883}
hq: {host: hq-broker, port: 1883, topic_prefix: retail}
drivers:
  - type: mqtt
    name: store-mqtt
    routes:
      - {pattern: "store/pos/{device_id}/sale", kind: pos.sale}
devices:
  - {id: pos-01, profile: pos_terminal}
api: {enabled: true, host: 0.0.0.0, port: 8080, token: {file: /run/secrets/gateway_api_token}}
END
printf '%s\n' "$token" >"$work/token"
chmod -R a+rX "$work"
"$ENGINE" volume create "$run_id-data" >/dev/null
"$ENGINE" run -d --name "$run_id-gw" --network "$net" --init --read-only --tmpfs /tmp \
    --cap-drop ALL --security-opt no-new-privileges:true \
    -p "127.0.0.1:$api_port:8080" \
    -v "$work/config:/etc/store-gateway:ro" -v "$work/token:/run/secrets/gateway_api_token:ro" \
    -v "$run_id-data:/var/lib/store-gateway" \
    "$IMAGE" >/dev/null

healthy() {
    local i
    for i in $(seq 1 90); do
        # podman runs the image's health check when asked (no systemd timers here); docker on its own schedule.
        if [[ $ENGINE == podman ]]; then
            "$ENGINE" healthcheck run "$run_id-gw" >/dev/null 2>&1 && { echo "healthy after about $i s"; return 0; }
        elif [[ $("$ENGINE" inspect --format '{{.State.Health.Status}}' "$run_id-gw") == healthy ]]; then
            echo "healthy after about $i s"
            return 0
        fi
        sleep 1
    done
    "$ENGINE" logs "$run_id-gw" | tail -30
    echo "FAILED: the health check never passed" >&2
    return 1
}
api() { curl -sf -H "Authorization: Bearer $token" "http://127.0.0.1:$api_port$1"; }
healthy

say "a till's sale, to HQ"
sale=$("$PYTHON" -c 'from simulators.pos import PosTerminal
m = PosTerminal("pos-01", seed="smoke").make_sale(); print(m.receipt_no); print(m.payload.decode())')
receipt=$(head -n 1 <<<"$sale")
# The events topic (not retained, unlike the gateway's status): a batch on it is the gateway's delivery.
"$ENGINE" exec "$run_id-hq" sh -c 'mosquitto_sub -h localhost -t "retail/+/+/events" -C 1 -W 60 >/dev/null' &
watcher=$!
sleep 1  # the subscription is made before the sale is sent
tail -n 1 <<<"$sale" | "$ENGINE" exec -i "$run_id-store" mosquitto_pub -h localhost -q 1 -t store/pos/pos-01/sale -s
wait "$watcher" || { echo "FAILED: nothing reached the HQ broker" >&2; exit 1; }
echo "the HQ broker got a batch of events from the gateway"
for i in $(seq 1 60); do
    if api "/api/receipts/pos-01/$receipt" | grep -q '"delivered_to_hq":true'; then
        echo "receipt $receipt: committed, and acknowledged by the HQ broker"
        break
    fi
    [[ $i == 60 ]] && { echo "FAILED: receipt $receipt not delivered" >&2; exit 1; }
    sleep 1
done
before=$(api /health | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["last_seq"])') \
    || { echo "FAILED: no /health answer" >&2; exit 1; }

say "non-root, and a read-only root filesystem"
uid=$("$ENGINE" exec "$run_id-gw" id -u)
[[ $uid != 0 ]] || { echo "FAILED: the gateway runs as root" >&2; exit 1; }
echo "runs as uid $uid"
readonly_rootfs=$("$ENGINE" inspect --format '{{.HostConfig.ReadonlyRootfs}}' "$run_id-gw")
[[ $readonly_rootfs == true ]] || { echo "FAILED: the root filesystem is not read-only" >&2; exit 1; }
if "$ENGINE" exec "$run_id-gw" sh -c 'touch /x' 2>/dev/null; then
    echo "FAILED: the root filesystem took a write" >&2
    exit 1
fi
caps=$("$ENGINE" exec "$run_id-gw" sh -c 'grep CapEff /proc/self/status')
[[ $caps == *0000000000000000 ]] || { echo "FAILED: capabilities left: $caps" >&2; exit 1; }
echo "the root filesystem is read-only and refuses writes; no capabilities ($caps)"

say "a restart: the journal on the volume stays"
"$ENGINE" restart -t 30 "$run_id-gw" >/dev/null
healthy
api "/api/receipts/pos-01/$receipt" | grep -q '"delivered_to_hq":true' \
    || { echo "FAILED: the receipt is gone after the restart" >&2; exit 1; }
after=$(api /health | "$PYTHON" -c 'import json,sys; print(json.load(sys.stdin)["last_seq"])') \
    || { echo "FAILED: no /health answer after the restart" >&2; exit 1; }
sales=$(api "/api/events?kind=pos.sale" | "$PYTHON" -c 'import json,sys; print(len(json.load(sys.stdin)))')
((sales == 1)) || { echo "FAILED: $sales sales in the journal after the restart, not 1" >&2; exit 1; }
((after > before)) || { echo "FAILED: last_seq went from $before to $after" >&2; exit 1; }
echo "receipt $receipt still there, once; last seq $before before, $after after (the restart's status events)"
say "all checks passed ($IMAGE)"
