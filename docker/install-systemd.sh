#!/usr/bin/env bash
# Install or upgrade store-gateway as a systemd service on a bare Raspberry Pi OS (Debian 12) box.
# Run as root from a checkout of the repository:
#
#   bash docker/install-systemd.sh
#
# It installs Debian's python3-venv and mosquitto, makes the store-gateway system user, installs the gateway
# in a venv at /opt/store-gateway, the unit (store-gateway.service) and journald's size limits
# (journald-store-gateway.conf), and makes /etc/store-gateway with the example config (its secrets read from
# systemd's credentials) and the two secrets it can generate. It never overwrites a config or a secret that
# exists, so running it again upgrades the gateway and the unit and keeps the store's settings. It does not
# start the service: it prints what is left to do (docker/README.md, "With systemd on Raspberry Pi OS").
#
# STORE_GATEWAY_ROOT=/some/dir installs into that tree instead of / (no apt, no user, no systemctl): for tests.
set -euo pipefail

src=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
root=${STORE_GATEWAY_ROOT:-}
etc=$root/etc/store-gateway
venv=$root/opt/store-gateway
credentials=/run/credentials/store-gateway.service
secrets=(store_mqtt_password hq_mqtt_password chiller_probe_bindkey lightspeed_client_secret
    square_signature_key web_shop_webhook_secret gateway_api_token gateway_tls_key)

if [[ -z $root ]]; then
    if [[ $(id -u) -ne 0 ]]; then
        echo "run this as root (sudo bash $0)" >&2
        exit 1
    fi
    apt-get update -qq
    apt-get install -y -qq python3-venv mosquitto
    if ! id store-gateway >/dev/null 2>&1; then
        useradd --system --home-dir /var/lib/store-gateway --no-create-home --shell /usr/sbin/nologin \
            store-gateway
    fi
fi

echo "installing the gateway in $venv"
python3 -m venv "$venv"
# The dependencies as pinned, each checked against its hash (as the Docker image does); then the gateway itself,
# built from a clean copy of the checkout (a build/ left in it would bring old modules along).
"$venv/bin/pip" install --quiet --disable-pip-version-check --require-hashes -r "$src/requirements.lock"
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
tar -C "$src" --exclude=./build --exclude='./*.egg-info' --exclude=./.venv --exclude=./.git -cf - . \
    | tar -C "$stage" -xf -
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps --upgrade "$stage"

install -d -m 0755 "$etc" "$etc/tls"
install -d -m 0700 "$etc/secrets"
if [[ ! -e $etc/store.yaml ]]; then
    # The example config, its {env: NAME} secrets read from systemd's private copies instead (the unit's
    # LoadCredential= lines): no secret in the environment, where `systemctl show` would print it.
    sed -E -e "s#\\{env: ([A-Z0-9_]+)\\}#{file: $credentials/\\L\\1\\E}#g" \
        -e "s#key_file: tls/gateway\\.key#key_file: $credentials/gateway_tls_key#" \
        "$src/firmware_configs/store-example.yaml" >"$etc/store.yaml.new"
    chmod 0640 "$etc/store.yaml.new"
    if [[ -z $root ]]; then
        chgrp store-gateway "$etc/store.yaml.new"
    fi
    mv "$etc/store.yaml.new" "$etc/store.yaml"
    echo "wrote $etc/store.yaml from the example: edit it for this store"
fi
(
    umask 077
    for name in store_mqtt_password gateway_api_token; do
        if [[ ! -s $etc/secrets/$name ]]; then  # written whole, then renamed: never left half-written
            python3 -c 'import secrets; print(secrets.token_urlsafe(32))' >"$etc/secrets/$name.new"
            mv "$etc/secrets/$name.new" "$etc/secrets/$name"
            echo "generated the secret $name"
        fi
    done
)

install -D -m 0644 "$src/docker/store-gateway.service" "$root/etc/systemd/system/store-gateway.service"
install -D -m 0644 "$src/docker/journald-store-gateway.conf" \
    "$root/etc/systemd/journald.conf.d/store-gateway.conf"
if [[ -z $root ]]; then
    systemctl daemon-reload
    systemctl restart systemd-journald
    systemctl enable store-gateway
fi

missing=()
for name in "${secrets[@]}"; do
    [[ -e $etc/secrets/$name ]] || missing+=("$name")
done
echo
echo "installed. Left to do (docker/README.md, \"With systemd on Raspberry Pi OS\"):"
if ((${#missing[@]})); then
    echo "- the secrets missing from $etc/secrets/ (an empty file for one the store does not use):"
    printf '    %s\n' "${missing[@]}"
fi
echo "- edit $etc/store.yaml; set up the store broker and its accounts (store-gateway broker provision)"
echo "- sudo -u store-gateway $venv/bin/store-gateway check-config --no-secrets $etc/store.yaml"
echo "- systemctl start store-gateway; systemctl status store-gateway"
if [[ -z $root ]] && systemctl is-active --quiet store-gateway; then
    echo "- the gateway is running the version installed before: systemctl restart store-gateway"
fi
