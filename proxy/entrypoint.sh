#!/bin/sh
# Defaults and checks for haproxy.cfg's variables, then HAProxy in the foreground.
set -eu

: "${PROXY_HOME:=/etc/fashion-proxy}"   # haproxy.cfg and errors/
: "${PROXY_BIND:=:8000}"
: "${PROXY_UPSTREAM:=api:8000}"
: "${PROXY_SPARE_UPSTREAM:=api-spare:8000}"   # the same replicas under a second name (docker-compose.yml)
: "${WORKERS:=2}"
: "${API_MAX_REPLICAS:=16}"
: "${MAX_UPLOAD_BYTES:=16777216}"
: "${PROXY_CONN_PER_IP:=64}"
: "${PROXY_MAXCONN:=2000}"
: "${PROXY_REQUEST_TIMEOUT:=10s}"
: "${PROXY_QUEUE_TIMEOUT:=30s}"
: "${PROXY_DRAIN_TIMEOUT:=45s}"
: "${PROXY_RETRIES:=30}"

for name in WORKERS API_MAX_REPLICAS MAX_UPLOAD_BYTES PROXY_CONN_PER_IP PROXY_MAXCONN PROXY_RETRIES; do
    eval "value=\$$name"
    case "$value" in
        '' | *[!0-9]*) echo "fashion-proxy: configuration error: $name=$value is not a positive integer" >&2; exit 2 ;;
    esac
done
# The request buffer holds a whole request: the largest body plus 64 KiB for the headers.
PROXY_BUFSIZE=$((MAX_UPLOAD_BYTES + 65536))

export PROXY_HOME PROXY_BIND PROXY_UPSTREAM PROXY_SPARE_UPSTREAM WORKERS API_MAX_REPLICAS MAX_UPLOAD_BYTES PROXY_CONN_PER_IP PROXY_MAXCONN \
    PROXY_REQUEST_TIMEOUT PROXY_QUEUE_TIMEOUT PROXY_DRAIN_TIMEOUT PROXY_RETRIES PROXY_BUFSIZE
exec haproxy -db -f "$PROXY_HOME/haproxy.cfg" "$@"
