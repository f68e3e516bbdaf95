#!/bin/sh
# Install probe-server on a Debian or Ubuntu VPS, as root, from this source
# tree:  sudo sh deploy/install.sh
#
# It creates the system user probe-server, a virtualenv under
# /opt/probe-server, /etc/probe-server (config, zones, a placeholder
# certificate), the ACME directory, and installs and enables the systemd unit.
# It never overwrites a file that exists, so running it again upgrades the
# software and leaves your config alone. It does not start the server: edit
# /etc/probe-server/* first, then run `probe-server check` (docs/deploy.md).
set -eu

src=$(cd "$(dirname "$0")/.." && pwd)
prefix=/opt/probe-server
etc=/etc/probe-server
acme=/var/lib/probe-server-acme

if [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root" >&2
    exit 1
fi
for tool in python3 openssl systemctl; do
    command -v "$tool" >/dev/null || {
        echo "install.sh: $tool is missing (apt-get install python3-venv openssl)" >&2
        exit 1
    }
done

echo "== user probe-server"
getent group probe-server >/dev/null || groupadd --system probe-server
getent passwd probe-server >/dev/null ||
    useradd --system --gid probe-server --home-dir /var/lib/probe-server \
        --no-create-home --shell /usr/sbin/nologin probe-server

echo "== virtualenv $prefix/venv"
python3 -m venv "$prefix/venv"
"$prefix/venv/bin/pip" install --quiet --upgrade pip
"$prefix/venv/bin/pip" install --quiet "$src"
ln -sf "$prefix/venv/bin/probe-server" /usr/local/bin/probe-server
install -d -m 0755 "$prefix/bin"
install -m 0755 "$src/deploy/certbot-deploy-hook" "$src/deploy/certbot-dns-hook" "$prefix/bin/"

echo "== $etc"
install -d -m 0755 "$etc"
copy_once() { # source, destination
    if [ -e "$2" ]; then
        echo "   kept $2"
    else
        install -m 0644 "$1" "$2"
        echo "   wrote $2"
    fi
}
copy_once "$src/deploy/probe-server.toml" "$etc/config.toml"
copy_once "$src/deploy/v6study.example.net.zone" "$etc/v6study.example.net.zone"
copy_once "$src/deploy/v6ns.v6study.example.net.zone" "$etc/v6ns.v6study.example.net.zone"

# The server needs a certificate to start; Let's Encrypt needs the server
# running (it is the zone's DNS, and it answers the HTTP-01 challenge). A
# self-signed placeholder breaks the circle: certbot's deploy hook replaces
# it and reloads the server. `probe-server check` reports it until then.
install -d -m 0750 -g probe-server "$etc/tls"
if [ ! -e "$etc/tls/fullchain.pem" ]; then
    openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes \
        -days 30 -subj "/CN=probe-server placeholder" \
        -keyout "$etc/tls/privkey.pem" -out "$etc/tls/fullchain.pem" 2>/dev/null
    chgrp probe-server "$etc/tls/fullchain.pem" "$etc/tls/privkey.pem"
    chmod 0640 "$etc/tls/fullchain.pem" "$etc/tls/privkey.pem"
    echo "   wrote a placeholder certificate in $etc/tls"
fi

echo "== $acme (certbot --webroot, DNS-01 records)"
install -d -m 0755 "$acme" "$acme/.well-known" "$acme/.well-known/acme-challenge"

echo "== systemd unit"
install -m 0644 "$src/deploy/probe-server.service" /etc/systemd/system/probe-server.service
systemctl daemon-reload
systemctl enable probe-server.service

cat <<MSG

Installed. Next (docs/deploy.md):
  1. Put your addresses and names in $etc/config.toml and the zone files.
  2. probe-server check --config $etc/config.toml
  3. systemctl start probe-server
  4. Delegate the zone at its parent (NS and glue), then get certificates
     with certbot; then: probe-server check --config $etc/config.toml --public
MSG
