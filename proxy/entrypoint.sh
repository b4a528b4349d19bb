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
: "${PROXY_BUFFER_BYTES:=1048576}"

for name in WORKERS API_MAX_REPLICAS MAX_UPLOAD_BYTES PROXY_CONN_PER_IP PROXY_MAXCONN PROXY_RETRIES PROXY_BUFFER_BYTES; do
    eval "value=\$$name"
    case "$value" in
        '' | *[!0-9]*) echo "fashion-proxy: configuration error: $name=$value is not a positive integer" >&2; exit 2 ;;
    esac
done
# The request buffer: a body of up to PROXY_BUFFER_BYTES (never more than MAX_UPLOAD_BYTES) plus 64 KiB
# of headers. Not MAX_UPLOAD_BYTES itself: HAProxy's memory per open connection grows with the buffer
# size (measured: 60 KiB per connection at 1 MiB, 2.9 MiB at 16 MiB), and 500 idle connections must not
# cost gigabytes.
if [ "$PROXY_BUFFER_BYTES" -gt "$MAX_UPLOAD_BYTES" ]; then PROXY_BUFFER_BYTES=$MAX_UPLOAD_BYTES; fi
PROXY_BUFSIZE=$((PROXY_BUFFER_BYTES + 65536))

export PROXY_HOME PROXY_BIND PROXY_UPSTREAM PROXY_SPARE_UPSTREAM WORKERS API_MAX_REPLICAS MAX_UPLOAD_BYTES PROXY_CONN_PER_IP PROXY_MAXCONN \
    PROXY_REQUEST_TIMEOUT PROXY_QUEUE_TIMEOUT PROXY_DRAIN_TIMEOUT PROXY_RETRIES PROXY_BUFFER_BYTES PROXY_BUFSIZE
exec haproxy -db -f "$PROXY_HOME/haproxy.cfg" "$@"
