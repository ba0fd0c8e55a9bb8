# shellcheck shell=bash
# shellcheck disable=SC2034  # variables set here are read by the scripts that source this file
# Helpers shared by the benchmark scripts in bench/ (sourced, not run).
#
# They build the release binary, start nginx as downstream sinks (its own prefix and config in a
# temporary directory, never the system's), write a rule set, sign Tencent callbacks, start and
# stop the gateway, drive load with wrk and sample the gateway's memory. Everything listens on
# 127.0.0.1 only. A script that sources this file calls `bench_init` first and gets everything
# it started stopped by the EXIT trap that `bench_init` installs.
#
# Knobs (environment): BENCH_OUT (where results and logs are kept, default target/bench),
# BENCH_DATA (where the spool's data directories are made, default BENCH_OUT: put it on the disk
# to measure),
# BENCH_PORT_BASE (default 18080: gateway = base, sinks = base+1..base+3, nginx status = base+9,
# admin = base+10), NGINX_WORKERS (default 1), SKIP_BUILD=1 (use the binary as built),
# SWITCHYARD_BIN (measure this binary instead of building one), KEEP_TMP=1 (keep the temporary
# directory), PERF=1 (record perf profiles of the gateway's measured phases).

BENCH_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BENCH_HZ="$(getconf CLK_TCK)"

# ---------------------------------------------------------------------------------------------
# Output

bench_log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
bench_die() {
  printf 'error: %s\n' "$*" >&2
  exit 1
}

# Seconds since the epoch with microseconds, without a fork where bash has EPOCHREALTIME.
bench_now() {
  if [[ -n "${EPOCHREALTIME:-}" ]]; then
    printf '%s\n' "${EPOCHREALTIME/,/.}"
  else
    date +%s.%N
  fi
}

# ---------------------------------------------------------------------------------------------
# Tools, ports, build

# Checks that every named command exists; lists all the missing ones at once.
bench_require() {
  local missing=() tool
  for tool in "$@"; do
    command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
  done
  if ((${#missing[@]})); then
    printf 'error: missing tools: %s\n' "${missing[*]}" >&2
    printf '  on Debian/Ubuntu: apt-get install -y wrk nginx curl coreutils gawk (cargo: https://rustup.rs)\n' >&2
    exit 1
  fi
}

# Fails if something already listens on 127.0.0.1:PORT.
bench_port_free() {
  if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
    bench_die "port 127.0.0.1:$1 is in use; set BENCH_PORT_BASE to a free range"
  fi
}

# Builds the release binary once per run; sets BENCH_BIN (a copy in BENCH_TMP).
bench_build() {
  local target_dir="${CARGO_TARGET_DIR:-$BENCH_ROOT/target}"
  BENCH_BIN="${SWITCHYARD_BIN:-$target_dir/release/switchyard}"
  if [[ "${SKIP_BUILD:-0}" != 1 && -z "${SWITCHYARD_BIN:-}" ]]; then
    bench_log "building the release binary (cargo build --release)"
    (cd "$BENCH_ROOT" && cargo build --release --quiet) || bench_die "cargo build --release failed"
  fi
  [[ -x "$BENCH_BIN" ]] || bench_die "no binary at $BENCH_BIN"
  # A copy, so a rebuild during the run does not change what is measured.
  cp "$BENCH_BIN" "$BENCH_TMP/switchyard"
  BENCH_BIN="$BENCH_TMP/switchyard"
}

# ---------------------------------------------------------------------------------------------
# Lifecycle

BENCH_PIDS=()     # background helpers (samplers, load generators): killed at exit
GW_PID=""         # the running gateway
NGINX_PID=""      # the nginx master

bench_cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  local pid
  for pid in "${BENCH_PIDS[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  if [[ -n "$GW_PID" ]]; then
    kill -KILL "$GW_PID" 2>/dev/null || true
    wait "$GW_PID" 2>/dev/null || true
  fi
  if [[ -n "$NGINX_PID" ]]; then
    kill -QUIT "$NGINX_PID" 2>/dev/null || true
    local i
    for i in $(seq 1 50); do
      kill -0 "$NGINX_PID" 2>/dev/null || break
      sleep 0.1
    done
    kill -KILL "$NGINX_PID" 2>/dev/null || true
    wait "$NGINX_PID" 2>/dev/null || true
  fi
  if [[ -n "${BENCH_DATA_DIR:-}" && -d "$BENCH_DATA_DIR" ]]; then
    rm -rf "$BENCH_DATA_DIR"
  fi
  if [[ -n "${BENCH_TMP:-}" && -d "$BENCH_TMP" ]]; then
    if [[ "${KEEP_TMP:-0}" == 1 ]]; then
      bench_log "kept $BENCH_TMP"
    else
      rm -rf "$BENCH_TMP"
    fi
  fi
  exit "$rc"
}

# Sets up ports, the temporary directory, the output directory and the exit trap.
bench_init() {
  local base="${BENCH_PORT_BASE:-18080}"
  GW_PORT=$base
  SINK_PORTS=($((base + 1)) $((base + 2)) $((base + 3)))
  STATUS_PORT=$((base + 9))
  ADMIN_PORT=$((base + 10))
  local p
  for p in "$GW_PORT" "${SINK_PORTS[@]}" "$STATUS_PORT" "$ADMIN_PORT"; do
    bench_port_free "$p"
  done
  GW_URL="http://127.0.0.1:$GW_PORT"
  ADMIN_URL="http://127.0.0.1:$ADMIN_PORT"
  BENCH_TMP="$(mktemp -d "${TMPDIR:-/tmp}/switchyard-bench.XXXXXX")"
  BENCH_OUT="${BENCH_OUT:-$BENCH_ROOT/target/bench}"
  mkdir -p "$BENCH_OUT"
  # The spool's data directories: on the disk being measured (TMPDIR may be a tmpfs, where an
  # fsync costs nothing).
  mkdir -p "${BENCH_DATA:-$BENCH_OUT}"
  BENCH_DATA_DIR="$(mktemp -d "${BENCH_DATA:-$BENCH_OUT}/data.XXXXXX")"
  trap bench_cleanup EXIT
  trap 'exit 130' INT TERM
  # Say where a failing command stopped the run (set -e alone exits silently).
  set -o errtrace
  trap 'bench_log "failed: line $LINENO of ${BASH_SOURCE[0]##*/}: $BASH_COMMAND"' ERR
}

# ---------------------------------------------------------------------------------------------
# Machine

# One line per fact about the machine, for the report.
bench_machine() {
  local fs_dev fs_type
  fs_dev=$(df -P "$BENCH_DATA_DIR" | awk 'NR==2 {print $1}')
  fs_type=$(df -PT "$BENCH_DATA_DIR" | awk 'NR==2 {print $2}')
  echo "cpu:    $(nproc) cores, $(awk -F': ' '/model name/ {print $2; exit}' /proc/cpuinfo)"
  echo "memory: $(awk '/MemTotal/ {printf "%.1f GiB", $2/1048576}' /proc/meminfo)"
  echo "disk:   $fs_dev ($fs_type) holds the spool ($BENCH_DATA_DIR), $(df -Ph "$BENCH_DATA_DIR" | awk 'NR==2 {print $4}') free"
  echo "kernel: $(uname -r)"
    # (wrk --version exits with 1)
  echo "tools:  $({ wrk --version 2>&1 || true; } | awk 'NR == 1 {print $1, $2}'), $(nginx -v 2>&1 | sed 's/.*: //'), $(cargo --version)"
}

# Synchronous 4 KiB writes per second on the spool's disk (dd oflag=dsync): the ceiling
# for commits that each wait for the disk.
bench_fsync_rate() {
  local f="$BENCH_DATA_DIR/fsync-probe" n=${1:-500} t0 t1
  t0=$(bench_now)
  dd if=/dev/zero of="$f" bs=4k count="$n" oflag=dsync status=none
  t1=$(bench_now)
  rm -f "$f"
  awk -v n="$n" -v a="$t0" -v b="$t1" 'BEGIN {printf "%.0f", n / (b - a)}'
}

# Busy CPU seconds of the whole machine so far (all cores, from /proc/stat).
bench_machine_cpu_seconds() {
  awk -v hz="$BENCH_HZ" '$1 == "cpu" {printf "%.2f\n", ($2 + $3 + $4 + $7 + $8 + $9) / hz; exit}' /proc/stat
}

# CPU seconds (user + system, with reaped children) of everything this run started: the
# gateway, nginx and its workers, background helpers, and the children this shell has reaped
# (wrk, curl, awk). Call it in the main shell, not in $(...): `bench_cpu_snapshot VAR`.
bench_cpu_snapshot() {
  local -n _snap=$1
  local pids=("$GW_PID" "$NGINX_PID" "${BENCH_PIDS[@]}") f ppid
  if [[ -n "$NGINX_PID" ]]; then
    for f in /proc/[0-9]*/stat; do
      { read -r _ _ _ ppid _ <"$f"; } 2>/dev/null || continue
      [[ "$ppid" == "$NGINX_PID" ]] && pids+=("$(basename "$(dirname "$f")")")
    done
  fi
  local files=() p
  for p in "${pids[@]}"; do
    [[ -n "$p" && -r "/proc/$p/stat" ]] && files+=("/proc/$p/stat")
  done
  local procs
  # (a process may end meanwhile: cat then fails for its file, and the rest still counts)
  procs=$({ cat "${files[@]}" 2>/dev/null || true; } | awk -v hz="$BENCH_HZ" '{t += $14 + $15 + $16 + $17} END {printf "%.2f", t / hz}')
  times >"$BENCH_TMP/times"
  local reaped
  reaped=$(awk 'NR == 2 {
      t = 0
      for (i = 1; i <= 2; i++) { split($i, a, "m"); t += a[1] * 60 + a[2] }
      printf "%.2f", t
    }' "$BENCH_TMP/times")
  # "machine ours gateway", CPU seconds.
  _snap="$(bench_machine_cpu_seconds) $(awk -v a="$procs" -v b="$reaped" 'BEGIN {printf "%.2f", a + b}') $(
    if [[ -n "$GW_PID" ]]; then bench_cpu_seconds; else echo 0; fi
  )"
}

# bench_cpu_usage BEFORE AFTER SECONDS: "gateway ours others" as % of one core over the window.
bench_cpu_usage() {
  awk -v a="$1" -v b="$2" -v s="$3" 'BEGIN {
    split(a, x, " "); split(b, y, " ")
    m = y[1] - x[1]; o = y[2] - x[2]; g = y[3] - x[3]
    others = m - o; if (others < 0) others = 0
    printf "%.0f %.0f %.0f\n", 100 * g / s, 100 * o / s, 100 * others / s
  }'
}

# Cores kept busy by anything during one second (run before starting anything: on a shared
# machine other work skews every number).
bench_busy_cores() {
  local a b
  a=$(bench_machine_cpu_seconds)
  sleep 1
  b=$(bench_machine_cpu_seconds)
  awk -v a="$a" -v b="$b" 'BEGIN {printf "%.2f", b - a}'
}

# ---------------------------------------------------------------------------------------------
# Sinks: nginx answering 200 on SINK_PORTS, stub_status on STATUS_PORT

# bench_nginx NAME WORKERS READY_URL HTTP: starts an nginx of its own (prefix and config in
# BENCH_TMP/NAME, never the system's) whose http block holds HTTP after the shared settings, and
# waits until READY_URL answers; sets BENCH_NGINX_PID.
bench_nginx() {
  local name=$1 workers=$2 ready=$3 body=$4 dir="$BENCH_TMP/$1"
  mkdir -p "$dir/logs" "$dir/tmp"
  # As root, nginx would switch its workers to a user that may not exist here.
  local user=""
  [[ $(id -u) == 0 ]] && user="user root;"
  cat >"$dir/nginx.conf" <<EOF
$user
worker_processes $workers;
pid $dir/nginx.pid;
error_log $dir/logs/error.log warn;
events { worker_connections 8192; }
http {
    access_log off;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    client_body_buffer_size 64k;
$body
}
EOF
  nginx -t -q -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" ||
    bench_die "nginx rejected $dir/nginx.conf (see $dir/logs/error.log)"
  nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/logs/error.log" -g 'daemon off;' &
  BENCH_NGINX_PID=$!
  local i
  for i in $(seq 1 100); do
    curl -fsS -o /dev/null "$ready" 2>/dev/null && return 0
    kill -0 "$BENCH_NGINX_PID" 2>/dev/null || bench_die "nginx ($name) exited (see $dir/logs/error.log)"
    sleep 0.1
  done
  bench_die "nginx ($name) did not start"
}

bench_start_sinks() {
  local p servers=""
  for p in "${SINK_PORTS[@]}"; do
    servers+="
    server {
        listen 127.0.0.1:$p backlog=4096;
        location / { return 200 \"ok\\n\"; }
    }"
  done
  servers+="
    server {
        listen 127.0.0.1:$STATUS_PORT;
        location / { stub_status; }
    }"
  bench_nginx nginx "${NGINX_WORKERS:-1}" "http://127.0.0.1:$STATUS_PORT/" "$servers"
  NGINX_PID=$BENCH_NGINX_PID
}

# Requests nginx has served so far (all servers), from stub_status; counts this request too.
bench_sink_requests() {
  curl -fsS "http://127.0.0.1:$STATUS_PORT/" | awk 'NR==3 {print $3}'
}

# ---------------------------------------------------------------------------------------------
# Rules and the signed callback

BENCH_TOKEN="switchyard-bench-token"
BENCH_APPID="1400000000"
BENCH_TARGETS=(profile-svc group-svc audit)
BENCH_COMMAND="Profile.CallbackPortraitSet"
# A nickname change, as in Tencent's documentation: it passes the filter of the first route.
BENCH_BODY='{"CallbackCommand":"Profile.CallbackPortraitSet","Operator_Account":"id1","From_Account":"id1","EventTime":1656921052497,"ProfileItem":[{"Tag":"Tag_Profile_IM_Nick","Value":"nick1"},{"Tag":"Tag_Profile_IM_Gender","Value":"Gender_Type_Male"},{"Tag":"Tag_Profile_IM_AllowType","Value":"AllowType_Type_NeedConfirm"},{"Tag":"Tag_Profile_Custom_Data","Value":"your custom data"}]}'
# Deliveries per callback with the rules below: one on the first route, two on the second.
BENCH_FANOUT=3

# The rule set is bench/rules (also read by the criterion benches): a Tencent source with a token,
# three targets on the sinks, a route with a filter and a transform, and a plain fan-out route.
# bench_write_rules copies it to BENCH_RULES and exports the variables it reads.
bench_write_rules() {
  BENCH_RULES="$BENCH_TMP/rules"
  cp -r "$BENCH_ROOT/bench/rules" "$BENCH_RULES"
  export BENCH_TOKEN
  export BENCH_SINK_1="http://127.0.0.1:${SINK_PORTS[0]}"
  export BENCH_SINK_2="http://127.0.0.1:${SINK_PORTS[1]}"
  export BENCH_SINK_3="http://127.0.0.1:${SINK_PORTS[2]}"
  "$BENCH_BIN" check --rules "$BENCH_RULES" >"$BENCH_OUT/check.txt" 2>&1 ||
    bench_die "the benchmark rules do not load: $(cat "$BENCH_OUT/check.txt")"
}

# The callback URL with a valid Sign (sha256(token + RequestTime)); sets BENCH_CALLBACK_URL.
bench_sign() {
  local request_time sign
  request_time=$(date +%s)
  sign=$(printf '%s%s' "$BENCH_TOKEN" "$request_time" | sha256sum | cut -d' ' -f1)
  BENCH_CALLBACK_URL="$GW_URL/im/tencent?SdkAppid=$BENCH_APPID&CallbackCommand=$BENCH_COMMAND&contenttype=json&ClientIP=127.0.0.1&OptPlatform=RESTAPI&Sign=$sign&RequestTime=$request_time"
}

# Lua for wrk: the POST. With a count, each of THREADS threads stops after count/THREADS
# answers (so a fill stops at an exact number of callbacks, give or take those in flight). With a
# delay (ms), each connection waits that long between an answer and its next request (a paced load).
bench_write_lua() {
  local file=$1 per_thread=${2:-0} delay_ms=${3:-0}
  local body_lua=${BENCH_BODY//\\/\\\\}
  body_lua=${body_lua//\"/\\\"}
  cat >"$file" <<EOF
wrk.method = "POST"
wrk.body = "$body_lua"
wrk.headers["Content-Type"] = "application/json"
EOF
  if [[ "$delay_ms" != 0 ]]; then
    # wrk takes a delay in whole milliseconds (it truncates), which would leave the paced rate a
    # few steps to choose from: the fraction is made up by waiting a millisecond longer now and
    # then, so that the waits average DELAY_MS.
    local whole fraction
    read -r whole fraction < <(awk -v d="$delay_ms" 'BEGIN {w = int(d); printf "%d %.4f\n", w, d - w}')
    cat >>"$file" <<EOF
local owed = 0
function delay()
  owed = owed + $fraction
  if owed >= 1 then
    owed = owed - 1
    return $((whole + 1))
  end
  return $whole
end
EOF
  fi
  if ((per_thread > 0)); then
    cat >>"$file" <<EOF
local answered = 0
function response(status, headers, body)
  answered = answered + 1
  if answered >= $per_thread then wrk.thread:stop() end
end
EOF
  fi
}

# ---------------------------------------------------------------------------------------------
# The gateway

# bench_start_gateway SPOOL DATA_DIR [extra flags...]: starts `switchyard serve` and waits for
# /readyz. Logs go to BENCH_OUT/gateway-<spool>.log.
bench_start_gateway() {
  local spool=$1 data=$2
  shift 2
  GW_LOG="$BENCH_OUT/gateway-$spool.log"
  SWITCHYARD_LOG="${SWITCHYARD_LOG:-info}" "$BENCH_BIN" serve \
    --rules "$BENCH_RULES" --listen "127.0.0.1:$GW_PORT" --admin-listen "127.0.0.1:$ADMIN_PORT" \
    --data-dir "$data" --spool "$spool" --max-spool "${MAX_SPOOL:-4GiB}" \
    --shutdown-grace 10s "$@" >>"$GW_LOG" 2>&1 &
  GW_PID=$!
  local i
  for i in $(seq 1 200); do
    if curl -fsS -o /dev/null "$ADMIN_URL/readyz" 2>/dev/null; then
      return 0
    fi
    kill -0 "$GW_PID" 2>/dev/null || bench_die "the gateway exited at start (see $GW_LOG)"
    sleep 0.05
  done
  bench_die "the gateway did not become ready (see $GW_LOG)"
}

# Stops the gateway gracefully (SIGTERM), or kills it after 30 s.
bench_stop_gateway() {
  [[ -n "$GW_PID" ]] || return 0
  kill -TERM "$GW_PID" 2>/dev/null || true
  local _
  for _ in $(seq 1 300); do
    kill -0 "$GW_PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -KILL "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
  GW_PID=""
}

# bench_targets pause|resume: all benchmark targets, through the admin API.
bench_targets() {
  local action=$1 t code
  for t in "${BENCH_TARGETS[@]}"; do
    code=$(curl -sS -o "$BENCH_TMP/admin-answer" -w '%{http_code}' -X POST "$ADMIN_URL/admin/targets/$t/$action")
    if [[ $code != 2* ]]; then
      bench_die "POST /admin/targets/$t/$action answered $code: $(head -c 300 "$BENCH_TMP/admin-answer") (this build has no pause/resume in the admin API?)"
    fi
  done
}

# Deliveries queued or in flight, all targets (switchyard_queue_depth summed).
bench_queue_depth() {
  curl -fsS "$ADMIN_URL/metrics" |
    awk '/^switchyard_queue_depth[{ ]/ {sum += $NF + 0} END {printf "%d\n", sum}'
}

# Current and peak resident memory of the gateway, KiB: "rss hwm".
bench_rss() {
  awk '/^VmRSS/ {r = $2} /^VmHWM/ {h = $2} END {print r + 0, h + 0}' "/proc/$GW_PID/status" 2>/dev/null || echo "0 0"
}

# Resets the gateway's VmHWM (peak RSS) so the next phase's peak can be read; false when the
# kernel does not allow it (the sampled peak is used then).
bench_reset_hwm() {
  { echo 5 >"/proc/$GW_PID/clear_refs"; } 2>/dev/null
}

# bench_pids_cpu_seconds PID...: CPU seconds (user + system) the processes and their children
# (nginx's workers) have used so far.
bench_pids_cpu_seconds() {
  local files=() f ppid p
  for p in "$@"; do
    [[ -r "/proc/$p/stat" ]] && files+=("/proc/$p/stat")
  done
  for f in /proc/[0-9]*/stat; do
    { read -r _ _ _ ppid _ <"$f"; } 2>/dev/null || continue
    for p in "$@"; do
      [[ "$ppid" == "$p" ]] && files+=("$f")
    done
  done
  { cat "${files[@]}" 2>/dev/null || true; } | awk -v hz="$BENCH_HZ" '{t += $14 + $15} END {printf "%.2f\n", t / hz}'
}

# CPU seconds (user + system) the gateway has used.
bench_cpu_seconds() {
  awk -v hz="$BENCH_HZ" '{printf "%.2f\n", ($14 + $15) / hz}' "/proc/$GW_PID/stat"
}

# bench_sample_rss FILE: appends "time rss_kib" for the gateway every 0.2 s, in the background.
bench_sample_rss() {
  local file=$1 pid=$GW_PID
  (
    while [[ -r "/proc/$pid/status" ]]; do
      printf '%s %s\n' "$(bench_now)" "$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status" 2>/dev/null)"
      sleep 0.2
    done
  ) >>"$file" 2>/dev/null &
  BENCH_PIDS+=($!)
  RSS_SAMPLER_PID=$!
}

# bench_peak_rss FILE FROM TO: the largest sampled RSS (KiB) between two times.
bench_peak_rss() {
  awk -v a="$2" -v b="$3" '$1 >= a && $1 <= b && $2 > m {m = $2} END {print m + 0}' "$1"
}

# With PERF=1, bench_perf_start NAME records the gateway's stacks with perf (cpu-clock, 999 Hz)
# into BENCH_OUT/perf-NAME.data until bench_perf_stop. Build with frame pointers for useful
# stacks: RUSTFLAGS="-C force-frame-pointers=yes" CARGO_PROFILE_RELEASE_DEBUG=line-tables-only.
PERF_PID=""
bench_perf_start() {
  [[ "${PERF:-0}" == 1 ]] || return 0
  perf record -e cpu-clock -F 999 -g -p "$GW_PID" -o "$BENCH_OUT/perf-$1.data" >"$BENCH_OUT/perf-$1.log" 2>&1 &
  PERF_PID=$!
  BENCH_PIDS+=("$PERF_PID")
  sleep 0.2
}
bench_perf_stop() {
  [[ -n "$PERF_PID" ]] || return 0
  kill -INT "$PERF_PID" 2>/dev/null || true
  wait "$PERF_PID" 2>/dev/null || true
  PERF_PID=""
}

# ---------------------------------------------------------------------------------------------
# wrk

# bench_wrk OUT SECONDS LUA [CONNECTIONS] [THREADS]: runs wrk against BENCH_CALLBACK_URL.
bench_wrk() {
  local out=$1 secs=$2 lua=$3 conns=${4:-${CONNECTIONS:-64}} threads=${5:-${THREADS:-2}}
  wrk -t"$threads" -c"$conns" -d"${secs}s" --timeout 10s --latency -s "$lua" "$BENCH_CALLBACK_URL" >"$out" 2>&1 ||
    bench_die "wrk failed: $(cat "$out")"
}

# Milliseconds from one of wrk's durations (850.00us, 1.20ms, 2.00s, 1.00m).
bench_to_ms() {
  awk -v v="$1" 'BEGIN {
    n = v + 0
    if (v ~ /us$/) n /= 1000; else if (v ~ /ms$/) n += 0; else if (v ~ /m$/) n *= 60000; else if (v ~ /s$/) n *= 1000
    printf "%.2f", n
  }'
}

# bench_wrk_field OUT rps|requests|p50|p99|non2xx|errors
bench_wrk_field() {
  local out=$1
  case $2 in
    rps) awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out" ;;
    requests) awk '/ requests in / {print $1}' "$out" ;;
    p50) bench_to_ms "$(awk '$1 == "50%" {print $2}' "$out")" ;;
    p99) bench_to_ms "$(awk '$1 == "99%" {print $2}' "$out")" ;;
    non2xx) awk '/Non-2xx or 3xx responses:/ {n = $NF} END {print n + 0}' "$out" ;;
    errors) awk '/Socket errors:/ {gsub(/,/, ""); n = $4 + $6 + $8 + $10} END {print n + 0}' "$out" ;;
  esac
}
