#!/bin/sh
# Defaults and checks for haproxy.cfg's and nginx.conf's variables, then the two side by side:
# HAProxy (the front door) and nginx (its spool for bodies larger than HAProxy's buffer). The container
# lives as long as both do. `entrypoint.sh -c` only checks both configurations.
set -eu

: "${PROXY_HOME:=/etc/fashion-proxy}"   # haproxy.cfg, nginx.conf and errors/
: "${PROXY_RUN_DIR:=/tmp/fashion-proxy}"   # nginx's config, pid and spooled bodies (the tmpfs)
: "${PROXY_BIND:=:8000}"
: "${PROXY_UPSTREAM:=api:8000}"
: "${PROXY_SPARE_UPSTREAM:=api-spare:8000}"   # the same replicas under a second name (docker-compose.yml)
# Loopback inside the container: nginx's port, and HAProxy's for what comes back from it.
: "${PROXY_SPOOL_PORT:=8081}"
: "${PROXY_SPOOLED_PORT:=8082}"
# The service's own defaults (service/config.py; tests/test_proxy_config.py keeps them equal).
: "${WORKERS:=2}"
: "${MAX_UPLOAD_BYTES:=16777216}"
: "${TIMEOUT:=30}"
: "${API_MAX_REPLICAS:=16}"
: "${PROXY_CONN_PER_IP:=64}"
: "${PROXY_MAXCONN:=2000}"
: "${PROXY_REQUEST_TIMEOUT:=10s}"
: "${PROXY_QUEUE_TIMEOUT:=30s}"
: "${PROXY_DRAIN_TIMEOUT:=45s}"
: "${PROXY_RETRIES:=30}"
: "${PROXY_BUFFER_BYTES:=65536}"
: "${PROXY_REQUESTS_PER_WORKER:=8}"

fail() {
    echo "fashion-proxy: configuration error: $1" >&2
    exit 2
}
for name in WORKERS API_MAX_REPLICAS MAX_UPLOAD_BYTES TIMEOUT PROXY_CONN_PER_IP PROXY_MAXCONN PROXY_RETRIES \
    PROXY_BUFFER_BYTES PROXY_SPOOL_PORT PROXY_SPOOLED_PORT PROXY_REQUESTS_PER_WORKER; do
    eval "value=\$$name"
    case "$value" in
        # 0 too: a server maxconn of 0 would mean no limit to HAProxy, a per-address cap of 0 refuse all.
        '' | *[!0-9]* | 0*) fail "$name=$value is not a positive integer" ;;
    esac
done
# Timeouts in whole seconds (`10` or `10s`): nginx and the sums below need the number.
seconds() {
    eval "value=\$$1"
    number=${value%s}
    case "$number" in
        '' | *[!0-9]*) fail "$1=$value is not a number of seconds (like 10s)" ;;
    esac
    echo "$number"
}
PROXY_REQUEST_TIMEOUT_S=$(seconds PROXY_REQUEST_TIMEOUT)
PROXY_QUEUE_TIMEOUT_S=$(seconds PROXY_QUEUE_TIMEOUT)
PROXY_DRAIN_TIMEOUT_S=$(seconds PROXY_DRAIN_TIMEOUT)
# HAProxy reads a bare number as milliseconds: hand it the seconds with their unit.
PROXY_REQUEST_TIMEOUT=${PROXY_REQUEST_TIMEOUT_S}s
PROXY_QUEUE_TIMEOUT=${PROXY_QUEUE_TIMEOUT_S}s
PROXY_DRAIN_TIMEOUT=${PROXY_DRAIN_TIMEOUT_S}s

# The request buffer: a body of up to PROXY_BUFFER_BYTES (never more than MAX_UPLOAD_BYTES) plus 64 KiB
# of headers. Not MAX_UPLOAD_BYTES itself: HAProxy's memory per open connection grows with the buffer
# size (measured: 60 KiB per connection at 1 MiB, 2.9 MiB at 16 MiB), and 500 idle connections must not
# cost gigabytes; larger bodies go through nginx's spool file instead. 64 KiB, not 1 MiB: a 28x28 PNG is
# about 1 KB, and with 1 MiB buffers the kernel's work of mapping and freeing them per request halved the
# proxy's throughput (bench_proxy.py: 0.42 of gunicorn direct at 1 MiB, 0.66-0.73 at 64 KiB, AMD EPYC 2 vCPUs).
if [ "$PROXY_BUFFER_BYTES" -gt "$MAX_UPLOAD_BYTES" ]; then PROXY_BUFFER_BYTES=$MAX_UPLOAD_BYTES; fi
PROXY_BUFSIZE=$((PROXY_BUFFER_BYTES + 65536))
# Waiting for a replica: the service answers within its TIMEOUT (gunicorn's, with JSON); 10 s more so
# that its answer, not the proxy's 504, is what the client gets.
PROXY_SERVER_TIMEOUT=$((TIMEOUT + 10))s
# A spooled request then waits in HAProxy's queue and for a replica: each layer outward waits longer
# than the one inside it, so the innermost answer (JSON) always comes back.
NGINX_READ_TIMEOUT_S=$((PROXY_QUEUE_TIMEOUT_S + TIMEOUT + 15))
PROXY_SPOOL_TIMEOUT=$((NGINX_READ_TIMEOUT_S + 5))s
NGINX_CONNECTIONS=$((PROXY_MAXCONN * 2 + 64))
PROXY_SERVER_MAXCONN=$((WORKERS * PROXY_REQUESTS_PER_WORKER))

export PROXY_HOME PROXY_BIND PROXY_UPSTREAM PROXY_SPARE_UPSTREAM PROXY_SPOOL_PORT PROXY_SPOOLED_PORT WORKERS \
    API_MAX_REPLICAS MAX_UPLOAD_BYTES PROXY_CONN_PER_IP PROXY_MAXCONN PROXY_REQUEST_TIMEOUT PROXY_QUEUE_TIMEOUT \
    PROXY_DRAIN_TIMEOUT PROXY_RETRIES PROXY_BUFFER_BYTES PROXY_BUFSIZE PROXY_SERVER_TIMEOUT PROXY_SPOOL_TIMEOUT PROXY_SERVER_MAXCONN

# nginx reads no environment: its config is written from the template, with its error pages.
mkdir -p "$PROXY_RUN_DIR"
sed -e "s|@PROXY_RUN_DIR@|$PROXY_RUN_DIR|g" -e "s|@PROXY_SPOOL_PORT@|$PROXY_SPOOL_PORT|g" \
    -e "s|@PROXY_SPOOLED_PORT@|$PROXY_SPOOLED_PORT|g" -e "s|@MAX_UPLOAD_BYTES@|$MAX_UPLOAD_BYTES|g" \
    -e "s|@PROXY_REQUEST_TIMEOUT_S@|$PROXY_REQUEST_TIMEOUT_S|g" \
    -e "s|@NGINX_READ_TIMEOUT_S@|$NGINX_READ_TIMEOUT_S|g" -e "s|@NGINX_CONNECTIONS@|$NGINX_CONNECTIONS|g" \
    "$PROXY_HOME/nginx.conf" >"$PROXY_RUN_DIR/nginx.conf"
# Each refusal nginx can make itself, answered with the JSON body of the same errors/*.http that HAProxy
# sends (411, 414 and 494, nginx's other ways of saying it could not read the request, become a 400).
# nginx sends no 408 at all: it closes the connection, and HAProxy answers the JSON 408.
: >"$PROXY_RUN_DIR/nginx-errors.conf"
for status in 400 413 500 501 502 503 504; do
    body=$(sed '1,/^\r*$/d' "$PROXY_HOME/errors/$status.http")
    case "$body" in *"'"* | *'\'*) fail "errors/$status.http: the body cannot hold ' or \\ (nginx quoting)" ;; esac
    {
        echo "error_page $status @json$status;"
        if [ "$status" = 400 ]; then echo "error_page 411 414 494 =400 @json400;"; fi
        echo "location @json$status {"
        echo "    default_type application/json;"
        echo "    add_header Cache-Control no-cache always;"
        echo "    return $status '$body';"
        echo "}"
    } >>"$PROXY_RUN_DIR/nginx-errors.conf"
done

haproxy_config="$PROXY_HOME/haproxy.cfg"
if [ "${1:-}" = "-c" ]; then
    if command -v nginx >/dev/null; then nginx -q -t -e stderr -c "$PROXY_RUN_DIR/nginx.conf"; fi
    exec haproxy -c -f "$haproxy_config"
fi

mkdir -p "$PROXY_RUN_DIR/body" "$PROXY_RUN_DIR/proxy"
nginx -e stderr -c "$PROXY_RUN_DIR/nginx.conf" -g "daemon off;" &
nginx_pid=$!
haproxy -db -f "$haproxy_config" "$@" &
haproxy_pid=$!

# SIGUSR1 (the image's STOPSIGNAL): HAProxy's soft stop, it finishes what it accepted; nginx stops
# gracefully (SIGQUIT) once HAProxy is gone. SIGTERM/SIGINT: both stop at once.
stopping=""
trap 'stopping=1; kill -USR1 "$haproxy_pid" 2>/dev/null || true' USR1
trap 'stopping=1; kill -TERM "$haproxy_pid" "$nginx_pid" 2>/dev/null || true' TERM INT
# Until either exits (`wait` returns early for a trapped signal; sleep keeps the loop cheap).
while kill -0 "$haproxy_pid" 2>/dev/null && kill -0 "$nginx_pid" 2>/dev/null; do
    sleep 1 &
    wait $! || true
done
if kill -0 "$nginx_pid" 2>/dev/null; then
    [ -n "$stopping" ] || echo "fashion-proxy: haproxy exited; stopping nginx" >&2
    kill -QUIT "$nginx_pid" 2>/dev/null || true
else
    echo "fashion-proxy: nginx exited; stopping haproxy" >&2
    kill -TERM "$haproxy_pid" 2>/dev/null || true
fi
status=0
wait "$haproxy_pid" || status=$?
wait "$nginx_pid" || true
exit "$status"
