#!/usr/bin/env bash
# Fan-out benchmark: switchyard against nginx, on the same machine, sinks and load.
#
# Three servers take the same signed Tencent callback from wrk, one after the other:
#
#  1. ceiling  — nginx answering `return 200` itself: the most any HTTP server here can answer;
#  2. peer     — nginx fanning out with proxy_pass to one sink and `mirror` to the two others
#                (nothing durable; its answer waits for the sinks);
#  3. switchyard — the release binary on bench/rules (a route with a filter and a transform to one
#                target, a plain route to two), with the durable redb spool: every callback is
#                fsync'd before it is acknowledged and delivered to all three sinks afterwards.
#
# For each: callbacks/s acknowledged, ack latency p50/p99, and the requests the sinks received
# (must be 3 per acknowledged callback). For switchyard also the time until every delivery has
# reached the sinks (the sustained rate = acknowledged callbacks / time until the last delivery),
# and its RSS idle and at peak; for each server the CPU time it and the sinks used per callback
# (steadier than the rates on a machine shared with other work). Then the ratios against the peer
# and the ceiling.
#
# Then a paced run: the ceiling, the peer and switchyard at the same offered rate, PACED
# callbacks/s — by default the peer's own sustained rate (the lowest of its rounds), the load the
# ack-latency goal is set for — for the ack latency at that load rather than at saturation. Each
# connection waits between an answer and its next request; the wait is tuned after each of two
# warm-ups so that the rate comes out at PACED when the server carries it. The ceiling's paced p99
# is what wrk and the scheduler alone add at that rate here, with no work behind the answer: no
# server beats it.
#
# Usage: bench/fanout.sh           (about 3 minutes on a 2-core machine, plus the build)
#        QUICK=1 bench/fanout.sh   (a smoke run: 2 s per server)
# Needs cargo, wrk, nginx, curl and coreutils/awk; installs nothing. Listens on 127.0.0.1 only.
# Knobs: DURATION (s, default 15), WARMUP (s, 3), CONNECTIONS (64), THREADS (2), ROUNDS (1),
# PACED (callbacks/s offered in the paced run, or `peer`, the default: the peer's sustained rate,
# 5000 when the peer does not run; 0 = no paced run; QUICK runs none),
# SERVERS ("ceiling peer switchyard"), SPOOL (the gateway's --spool, default redb; `memory` shows
# what durability costs — the goals are for redb), FRONT_WORKERS (nginx workers of the ceiling and the peer,
# default: one per core), and those of bench/lib.sh (BENCH_OUT, BENCH_DATA, BENCH_PORT_BASE,
# NGINX_WORKERS for the sinks, SKIP_BUILD, SWITCHYARD_BIN, KEEP_TMP, PERF).
# Results: the table at the end, also in $BENCH_OUT/fanout-results.txt (default target/bench/);
# the gateway's /metrics at the end of each run in $BENCH_OUT/metrics-fanout-<round>.txt.
# Exits 1 if a server lost deliveries (the sinks got fewer than 3 per acknowledged callback);
# the speed numbers are reported, never asserted.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${QUICK:-0}" == 1 ]]; then
  DURATION=${DURATION:-2}
  WARMUP=${WARMUP:-1}
else
  DURATION=${DURATION:-15}
  WARMUP=${WARMUP:-3}
fi
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
SERVERS=${SERVERS:-ceiling peer switchyard}
if [[ "${QUICK:-0}" == 1 ]]; then PACED=${PACED:-0}; else PACED=${PACED:-peer}; fi
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-600}
SPOOL=${SPOOL:-redb}
[[ $SPOOL == redb || $SPOOL == memory ]] || bench_die "SPOOL must be redb or memory, not '$SPOOL'"

bench_require cargo wrk nginx curl sha256sum awk getconf
bench_init
CEILING_PORT=$((GW_PORT + 4))
PEER_PORT=$((GW_PORT + 5))
bench_port_free "$CEILING_PORT"
bench_port_free "$PEER_PORT"
bench_build
bench_start_sinks
bench_write_rules
LUA="$BENCH_TMP/post.lua"
bench_write_lua "$LUA"

RESULTS="$BENCH_OUT/fanout-results.txt"
: >"$RESULTS"
rm -f "$BENCH_OUT"/gateway-*.log "$BENCH_OUT"/wrk-fanout-*.txt "$BENCH_OUT"/rss-fanout-*.txt

BUSY=$(bench_busy_cores)
MACHINE=$(bench_machine)
MACHINE+=$'\n'"fsync:  $(bench_fsync_rate 1000) synchronous 4 KiB writes/s (dd oflag=dsync) on the spool's disk"
MACHINE+=$'\n'"busy:   $BUSY cores busy before the run (other work on the machine)"
bench_log "machine:"
printf '%s\n' "$MACHINE" | sed 's/^/  /' >&2
if awk -v b="$BUSY" 'BEGIN {exit !(b > 0.2)}'; then
  bench_log "WARNING: the machine is not idle ($BUSY cores busy); the numbers will be noisy"
fi

# ---------------------------------------------------------------------------------------------
# The front nginx: the ceiling and the peer, in their own prefix (the sinks are another nginx).

start_front() {
  local upstreams="" i
  for i in 1 2 3; do
    upstreams+="
    upstream sink$i { server 127.0.0.1:${SINK_PORTS[$((i - 1))]}; keepalive 256; }"
  done
  bench_nginx front "${FRONT_WORKERS:-auto}" "http://127.0.0.1:$CEILING_PORT/" "
    proxy_http_version 1.1;
    proxy_set_header Connection \"\";
    proxy_buffering off;
$upstreams
    server {
        listen 127.0.0.1:$CEILING_PORT backlog=4096;
        location / {
            default_type application/json;
            return 200 '{\"ActionStatus\":\"OK\",\"ErrorCode\":0,\"ErrorInfo\":\"\"}';
        }
    }
    server {
        listen 127.0.0.1:$PEER_PORT backlog=4096;
        location / {
            mirror /mirror-2;
            mirror /mirror-3;
            proxy_pass http://sink1;
        }
        location = /mirror-2 { internal; proxy_pass http://sink2\$request_uri; }
        location = /mirror-3 { internal; proxy_pass http://sink3\$request_uri; }
    }"
  BENCH_PIDS+=("$BENCH_NGINX_PID")
  FRONT_PID=$BENCH_NGINX_PID
}

# Points BENCH_CALLBACK_URL at a server: bench_sign signs for the gateway's port.
aim_at() {
  bench_sign
  BENCH_CALLBACK_URL=${BENCH_CALLBACK_URL/"$GW_URL"/"http://127.0.0.1:$1"}
}

# Requests the sinks served, waiting until the count stops moving (deliveries in flight land).
settled_sink_requests() {
  local last=-1 now _
  for _ in $(seq 1 50); do
    now=$(bench_sink_requests)
    ((now == last + 1)) && break
    last=$now
    sleep 0.2
  done
  echo "$now"
}

# The CPU the server and the sinks used from the start of the measured run until now, in µs per
# callback acknowledged in it.
record_cpu() {
  local key=$1
  per_callback() { awk -v a="$1" -v b="$2" -v n="$MEASURED_ACKED" 'BEGIN {if (n > 0) printf "%.0f", 1e6 * (b - a) / n; else print "-"}'; }
  CPU_US[$key]=$(per_callback "$CPU0" "$(bench_pids_cpu_seconds "$SERVER_PID")")
  SINK_US[$key]=$(per_callback "$SINK_CPU0" "$(bench_pids_cpu_seconds "$NGINX_PID")")
}

declare -A RPS P50 P99 ACKED NON2XX ERRS SINKS SUSTAINED DRAIN_S RSS_IDLE RSS_PEAK PACED_WAIT CPU_US SINK_US

# run_load KEY [LUA]: warm-up, then the measured wrk run; fills RPS, P50, P99, ACKED, NON2XX, ERRS.
# run_load KEY [LUA] [RATE]: the warm-up and the measured run. With RATE (the paced run), LUA
# waits PACED_DELAY ms between an answer and the next request; each of two warm-ups shows how long
# a connection's cycle takes at its pace, and the next run's wait is changed by what that misses
# of RATE, so the measured run offers RATE.
run_load() {
  local key=$1 lua=${2:-$LUA} rate=${3:-0} out="$BENCH_OUT/wrk-fanout-$1.txt" warm="$BENCH_OUT/wrk-fanout-$1-warmup.txt"
  local non2xx warm_acked=0 passes=1 wait=${PACED_DELAY:-0}
  # Paced, the warm-up runs twice: the answers are slower at the offered rate than at the first
  # guess, and the second warm-up, nearer that rate, corrects the wait again.
  ((rate > 0)) && passes=2
  for _ in $(seq 1 "$passes"); do
    ((WARMUP > 0)) || break
    bench_wrk "$warm" "$WARMUP" "$lua"
    # What the warm-up sent is part of what the sinks must get.
    warm_acked=$((warm_acked + $(bench_wrk_field "$warm" requests) - $(bench_wrk_field "$warm" non2xx)))
    if ((rate > 0)); then
      # A connection's cycle is its answer and its wait: the wait changes by what the cycle
      # misses of the one that gives RATE.
      wait=$(awk -v c="$CONNECTIONS" -v r="$rate" -v d="$wait" -v got="$(bench_wrk_field "$warm" rps)" \
        'BEGIN {if (got <= 0) {printf "%.3f", d; exit} t = d + 1000 * c / r - 1000 * c / got; if (t < 0) t = 0; printf "%.3f", t}')
      lua="$BENCH_TMP/paced-$key.lua"
      bench_write_lua "$lua" 0 "$wait"
      PACED_WAIT[$key]=$wait
    fi
  done
  CPU0=$(bench_pids_cpu_seconds "$SERVER_PID")
  SINK_CPU0=$(bench_pids_cpu_seconds "$NGINX_PID")
  T_LOAD0=$(bench_now)
  bench_wrk "$out" "$DURATION" "$lua"
  T_LOAD1=$(bench_now)
  RPS[$key]=$(bench_wrk_field "$out" rps)
  P50[$key]=$(bench_wrk_field "$out" p50)
  P99[$key]=$(bench_wrk_field "$out" p99)
  ERRS[$key]=$(bench_wrk_field "$out" errors)
  non2xx=$(bench_wrk_field "$out" non2xx)
  NON2XX[$key]=$non2xx
  MEASURED_ACKED=$(($(bench_wrk_field "$out" requests) - non2xx))
  ACKED[$key]=$((MEASURED_ACKED + warm_acked))
  if ((non2xx > 0)); then
    bench_log "WARNING: $non2xx answers were not 2xx (see $out)"
  fi
}

measure_nginx() {
  local name=$1 port=$2 round=$3 key="$1.$3" lua=${4:-$LUA} rate=${5:-0} sinks0 sinks1
  bench_log "$name (round $round): ${WARMUP}s warm-up + ${DURATION}s, $THREADS threads, $CONNECTIONS connections"
  aim_at "$port"
  SERVER_PID=$FRONT_PID
  sinks0=$(settled_sink_requests)
  run_load "$key" "$lua" "$rate"
  record_cpu "$key"
  sinks1=$(settled_sink_requests)
  # Each stub_status request counts itself.
  SINKS[$key]=$((sinks1 - sinks0 - 1))
  SUSTAINED[$key]=${RPS[$key]}
  DRAIN_S[$key]=0
  bench_log "  ${RPS[$key]} callbacks/s, p50 ${P50[$key]} ms, p99 ${P99[$key]} ms; sinks got ${SINKS[$key]} for ${ACKED[$key]} callbacks acked"
}

measure_switchyard() {
  local round=$1 lua=${2:-$LUA} rate=${3:-0} key="switchyard.$1" data="$BENCH_DATA_DIR/fanout-$1" sinks0 sinks1
  bench_log "switchyard, --spool $SPOOL (round $round): ${WARMUP}s warm-up + ${DURATION}s, $THREADS threads, $CONNECTIONS connections"
  aim_at "$GW_PORT"
  bench_start_gateway "$SPOOL" "$data"
  SERVER_PID=$GW_PID
  sleep 1
  read -r "RSS_IDLE[$key]" _ < <(bench_rss)
  local rss_file="$BENCH_OUT/rss-fanout-$round.txt"
  bench_sample_rss "$rss_file"
  sinks0=$(settled_sink_requests)
  bench_perf_start "fanout-$round"
  run_load "$key" "$lua" "$rate"
  # Sustained: until the last delivery has left the spool.
  local depth t_done="" _
  for _ in $(seq 1 $((DRAIN_TIMEOUT * 20))); do
    depth=$(bench_queue_depth)
    if ((depth == 0)); then
      t_done=$(bench_now)
      break
    fi
    sleep 0.05
  done
  bench_perf_stop
  record_cpu "$key"
  [[ -n "$t_done" ]] || bench_log "WARNING: $depth deliveries still queued after ${DRAIN_TIMEOUT}s"
  sinks1=$(settled_sink_requests)
  SINKS[$key]=$((sinks1 - sinks0 - 1))
  if [[ -n "$t_done" ]]; then
    DRAIN_S[$key]=$(awk -v a="$T_LOAD1" -v b="$t_done" 'BEGIN {printf "%.2f", b - a}')
    SUSTAINED[$key]=$(awk -v n="$MEASURED_ACKED" -v a="$T_LOAD0" -v b="$t_done" 'BEGIN {printf "%.0f", n / (b - a)}')
  else
    DRAIN_S[$key]="> $DRAIN_TIMEOUT"
    SUSTAINED[$key]=0
  fi
  local hwm peak
  read -r _ hwm < <(bench_rss)
  peak=$(bench_peak_rss "$rss_file" 0 "$(bench_now)")
  ((hwm > peak)) && peak=$hwm
  RSS_PEAK[$key]=$peak
  kill "$RSS_SAMPLER_PID" 2>/dev/null || true
  curl -fsS "$ADMIN_URL/metrics" >"$BENCH_OUT/metrics-fanout-$round.txt" 2>/dev/null || true
  bench_log "  ${RPS[$key]} callbacks/s acked, p50 ${P50[$key]} ms, p99 ${P99[$key]} ms; all delivered ${DRAIN_S[$key]} s after the load (sustained ${SUSTAINED[$key]}/s); sinks got ${SINKS[$key]} for ${ACKED[$key]} callbacks acked; RSS idle $((RSS_IDLE[$key] / 1024)) MiB, peak $((peak / 1024)) MiB"
  bench_stop_gateway
  rm -rf "$data"
}

if [[ " $SERVERS " == *" ceiling "* || " $SERVERS " == *" peer "* ]]; then
  start_front
fi
for round in $(seq 1 "$ROUNDS"); do
  for server in $SERVERS; do
    case $server in
      ceiling) measure_nginx ceiling "$CEILING_PORT" "$round" ;;
      peer) measure_nginx peer "$PEER_PORT" "$round" ;;
      switchyard) measure_switchyard "$round" ;;
      *) bench_die "unknown server $server (SERVERS: ceiling peer switchyard)" ;;
    esac
  done
done

# The paced run: the same offered rate for the peer and switchyard (each connection waits between
# an answer and its next request, so the rate is a little under PACED when answers are slow).
PACED_RUNS=()
PACED_FROM="given"
if [[ $PACED == peer ]]; then
  PACED=5000 PACED_FROM="default, the peer did not run"
  if [[ " $SERVERS " == *" peer "* ]]; then
    PACED=$(for round in $(seq 1 "$ROUNDS"); do echo "${SUSTAINED[peer.$round]}"; done | sort -n | head -1)
    PACED_FROM="the peer's sustained rate"
  fi
fi
if ((PACED > 0)); then
  PACED_DELAY=$(awk -v c="$CONNECTIONS" -v r="$PACED" 'BEGIN {printf "%.3f", 1000 * c / r}')
  PACED_LUA="$BENCH_TMP/paced.lua"
  bench_write_lua "$PACED_LUA" 0 "$PACED_DELAY"
  for server in ceiling peer switchyard; do
    [[ " $SERVERS " == *" $server "* ]] || continue
    bench_log "paced at $PACED callbacks/s ($PACED_FROM; waits tuned after two warm-ups from $PACED_DELAY ms):"
    case $server in
      # The ceiling paced: the p99 that wrk and the scheduler alone give at this rate here.
      ceiling) measure_nginx ceiling "$CEILING_PORT" paced "$PACED_LUA" "$PACED" ;;
      peer) measure_nginx peer "$PEER_PORT" paced "$PACED_LUA" "$PACED" ;;
      *) measure_switchyard paced "$PACED_LUA" "$PACED" ;;
    esac
    PACED_RUNS+=("$server")
  done
fi

# ---------------------------------------------------------------------------------------------
# Report

LOST=0
mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN {if (b > 0) printf "%.2f", a / b; else print "n/a"}'; }
{
  echo "switchyard fan-out benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(cd "$BENCH_ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)"
  printf '%s\n' "$MACHINE"
  echo "spool:  switchyard with --spool $SPOOL$([[ $SPOOL == redb ]] || echo " (not durable: the goals are for redb)")"
  echo "load:   wrk -t$THREADS -c$CONNECTIONS, ${DURATION}s after ${WARMUP}s warm-up; one signed Tencent callback (${#BENCH_BODY} bytes); 3 sinks (nginx, ${NGINX_WORKERS:-1} worker)"
  echo
  echo "(sustained = callbacks acknowledged in the measured run / time from its start until the sinks"
  echo " had every delivery; for nginx the answer waits for the sinks, so it is the ack rate."
  echo " deliveries = requests the sinks got / 3 x callbacks acknowledged, warm-up included;"
  echo " cpu_us, sinks_us = CPU time of the server, of the sinks, per callback acknowledged, from the"
  echo " start of the measured run until the sinks had every delivery)"
  printf '%-11s %5s %12s %12s %9s %9s %8s %22s %9s %9s %9s %7s %8s\n' server round callbacks/s sustained/s p50_ms p99_ms non2xx deliveries drain_s idle_mib peak_mib cpu_us sinks_us
  for round in $(seq 1 "$ROUNDS"); do
    for server in $SERVERS; do
      k="$server.$round"
      expected=$((ACKED[$k] * BENCH_FANOUT))
      if [[ $server == ceiling ]]; then
        delivered="-"
      else
        delivered="${SINKS[$k]}/$expected"
        ((SINKS[$k] >= expected)) || LOST=1
      fi
      idle="-" peak="-"
      if [[ $server == switchyard ]]; then
        idle=$(mib "${RSS_IDLE[$k]}")
        peak=$(mib "${RSS_PEAK[$k]}")
      fi
      printf '%-11s %5s %12s %12s %9s %9s %8s %22s %9s %9s %9s %7s %8s\n' "$server" "$round" "${RPS[$k]}" "${SUSTAINED[$k]}" \
        "${P50[$k]}" "${P99[$k]}" "${NON2XX[$k]}" "$delivered" "${DRAIN_S[$k]}" "$idle" "$peak" "${CPU_US[$k]}" "${SINK_US[$k]}"
    done
  done
  if [[ " $SERVERS " == *" switchyard "* ]]; then
    echo
    for round in $(seq 1 "$ROUNDS"); do
      s="switchyard.$round"
      line="round $round: switchyard sustained"
      [[ " $SERVERS " == *" peer "* ]] && line+=" / peer: $(ratio "${SUSTAINED[$s]}" "${SUSTAINED[peer.$round]}") (goal >= 1.0)"
      [[ " $SERVERS " == *" ceiling "* ]] && line+=", / ceiling: $(ratio "${SUSTAINED[$s]}" "${RPS[ceiling.$round]}")"
      [[ " $SERVERS " == *" peer "* ]] && line+="; CPU per callback / peer's: $(ratio "${CPU_US[$s]}" "${CPU_US[peer.$round]}")"
      line+="; ack p99 ${P99[$s]} ms (goal <= 5)"
      [[ " $SERVERS " == *" peer "* ]] && line+=", peer's ${P99[peer.$round]} ms"
      line+="; RSS peak $(mib "${RSS_PEAK[$s]}") MiB (goal <= 64), idle $(mib "${RSS_IDLE[$s]}") MiB (goal <= 20)"
      echo "$line"
    done
  fi
  if ((${#PACED_RUNS[@]})); then
    echo
    echo "paced at $PACED callbacks/s ($PACED_FROM): each connection waits between an answer and its next request,"
    echo "the wait tuned after two warm-ups so the offered rate is $PACED/s (wait_ms; a server that cannot carry it falls short)"
    printf '%-11s %8s %12s %12s %9s %9s %22s %9s %7s %8s\n' server wait_ms callbacks/s sustained/s p50_ms p99_ms deliveries peak_mib cpu_us sinks_us
    for server in "${PACED_RUNS[@]}"; do
      k="$server.paced"
      deliveries="-"
      if [[ $server != ceiling ]]; then
        expected=$((ACKED[$k] * BENCH_FANOUT))
        ((SINKS[$k] >= expected)) || LOST=1
        deliveries="${SINKS[$k]}/$expected"
      fi
      peak="-"
      [[ $server == switchyard ]] && peak=$(mib "${RSS_PEAK[$k]}")
      printf '%-11s %8s %12s %12s %9s %9s %22s %9s %7s %8s\n' "$server" "${PACED_WAIT[$k]:-$PACED_DELAY}" "${RPS[$k]}" "${SUSTAINED[$k]}" "${P50[$k]}" "${P99[$k]}" "$deliveries" "$peak" "${CPU_US[$k]}" "${SINK_US[$k]}"
    done
    if [[ -n "${RPS[switchyard.paced]:-}" ]]; then
      line="paced: switchyard ack p99 ${P99[switchyard.paced]} ms at ${RPS[switchyard.paced]} callbacks/s (goal <= 5 ms at the peer's rate)"
      [[ -n "${RPS[ceiling.paced]:-}" ]] && line+="; the ceiling's ${P99[ceiling.paced]} ms at ${RPS[ceiling.paced]}/s (wrk and the scheduler alone)"
      echo "$line"
    fi
  fi
  if ((LOST)); then
    echo "ERROR: a server's sinks got fewer requests than 3 per acknowledged callback"
  fi
} | tee "$RESULTS"
bench_log "results in $RESULTS"
exit "$LOST"
