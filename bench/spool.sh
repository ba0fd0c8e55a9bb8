#!/usr/bin/env bash
# The durable spool's benchmark (issue "durable delivery"), in one run:
#
#  a. ingest: callbacks/s acknowledged with every target paused (so each callback's deliveries
#     only go into the spool), for `--spool redb` and `--spool memory` — same binary, same rules,
#     a fresh data directory each — and the ratio redb/memory (goal > 0.5), with wrk's ack
#     latency p50/p99;
#  b. drain: with the targets paused, a backlog of BACKLOG deliveries (default one million) is
#     filled, then the targets are resumed and the queue depth is followed until it is 0: the
#     drain rate (deliveries/s), the gateway's peak RSS while filling and while draining, and the
#     size of the spool file.
#
# Usage: bench/spool.sh            (about 4 minutes on a 2-core machine, plus the build)
#        QUICK=1 bench/spool.sh    (a smoke run: short runs, a 30,000-delivery backlog)
# Needs cargo, wrk, nginx, curl and coreutils/awk; installs nothing. Listens on 127.0.0.1 only.
# Knobs: DURATION (s, default 15), WARMUP (s, 3), CONNECTIONS (64), THREADS (2), BACKLOG
# (1000000), ROUNDS (ingest rounds per spool, 1), PHASES ("ingest drain"), and those of
# bench/lib.sh (BENCH_OUT, BENCH_DATA, BENCH_PORT_BASE, NGINX_WORKERS, SKIP_BUILD, SWITCHYARD_BIN,
# KEEP_TMP, PERF).
# Results: the table at the end, also in $BENCH_OUT/spool-results.txt (default target/bench/),
# beside wrk's output, the drain's depth over time (drain.csv), RSS samples and gateway logs.
set -euo pipefail

# shellcheck source=bench/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

if [[ "${QUICK:-0}" == 1 ]]; then
  DURATION=${DURATION:-3}
  WARMUP=${WARMUP:-1}
  BACKLOG=${BACKLOG:-30000}
  POLL=${POLL:-0.1}
else
  DURATION=${DURATION:-15}
  WARMUP=${WARMUP:-3}
  BACKLOG=${BACKLOG:-1000000}
fi
CONNECTIONS=${CONNECTIONS:-64}
THREADS=${THREADS:-2}
ROUNDS=${ROUNDS:-1}
PHASES=${PHASES:-ingest drain}
# Longest wait for the drain before giving up, seconds.
DRAIN_TIMEOUT=${DRAIN_TIMEOUT:-1800}

bench_require cargo wrk nginx curl sha256sum awk dd getconf
bench_init
bench_build
bench_start_sinks
bench_write_rules
bench_sign
LUA="$BENCH_TMP/post.lua"
bench_write_lua "$LUA"

RESULTS="$BENCH_OUT/spool-results.txt"
: >"$RESULTS"
rm -f "$BENCH_OUT"/gateway-*.log "$BENCH_OUT"/wrk-*.txt "$BENCH_OUT"/drain.csv "$BENCH_OUT"/rss-*.txt

BUSY=$(bench_busy_cores)
MACHINE=$(bench_machine)
FSYNC_RATE=$(bench_fsync_rate 1000)
MACHINE+=$'\n'"fsync:  $FSYNC_RATE synchronous 4 KiB writes/s (dd oflag=dsync)"
MACHINE+=$'\n'"busy:   $BUSY cores busy before the run (other work on the machine)"
bench_log "machine:"
printf '%s\n' "$MACHINE" | sed 's/^/  /' >&2
if awk -v b="$BUSY" 'BEGIN {exit !(b > 0.2)}'; then
  bench_log "WARNING: the machine is not idle ($BUSY cores busy); the numbers will be noisy"
fi
if [[ "$(df -PT "$BENCH_DATA_DIR" | awk 'NR==2 {print $2}')" == tmpfs ]]; then
  bench_log "WARNING: the spool is on a tmpfs, where fsync is free; set BENCH_DATA to a directory on a disk"
fi

# ---------------------------------------------------------------------------------------------
# a. ingest

declare -A RPS P50 P99 NON2XX ERRS STORED ACKED RSS_END CPU OURS OTHER

# ingest SPOOL ROUND: one fresh gateway, targets paused, WARMUP s then DURATION s of wrk.
ingest() {
  local spool=$1 round=$2 key="$1.$2"
  local data="$BENCH_DATA_DIR/ingest-$spool-$round"
  bench_log "ingest, --spool $spool (round $round): ${WARMUP}s warm-up + ${DURATION}s, $THREADS threads, $CONNECTIONS connections"
  bench_start_gateway "$spool" "$data"
  bench_targets pause
  local warm="$BENCH_OUT/wrk-ingest-$spool-$round-warmup.txt" out="$BENCH_OUT/wrk-ingest-$spool-$round.txt"
  if ((WARMUP > 0)); then
    bench_wrk "$warm" "$WARMUP" "$LUA"
  fi
  local snap0 snap1
  bench_cpu_snapshot snap0
  bench_perf_start "ingest-$spool-$round"
  bench_wrk "$out" "$DURATION" "$LUA"
  bench_perf_stop
  bench_cpu_snapshot snap1
  RPS[$key]=$(bench_wrk_field "$out" rps)
  P50[$key]=$(bench_wrk_field "$out" p50)
  P99[$key]=$(bench_wrk_field "$out" p99)
  ERRS[$key]=$(bench_wrk_field "$out" errors)
  local non2xx acked
  non2xx=$(bench_wrk_field "$out" non2xx)
  acked=$(($(bench_wrk_field "$out" requests) - non2xx))
  if ((WARMUP > 0)); then
    local warm_non2xx
    warm_non2xx=$(bench_wrk_field "$warm" non2xx)
    non2xx=$((non2xx + warm_non2xx))
    acked=$((acked + $(bench_wrk_field "$warm" requests) - warm_non2xx))
  fi
  NON2XX[$key]=$non2xx
  ACKED[$key]=$acked
  STORED[$key]=$(bench_queue_depth)
  RSS_END[$key]=$(bench_rss | awk '{print $1}')
  read -r "CPU[$key]" "OURS[$key]" "OTHER[$key]" < <(bench_cpu_usage "$snap0" "$snap1" "$DURATION")
  if ((${OTHER[$key]} > 10)); then
    bench_log "WARNING: other work on the machine used ${OTHER[$key]}% of a core during this measurement"
  fi
  if ((non2xx > 0)); then
    bench_log "WARNING: $non2xx callbacks were not acknowledged with 2xx (see $out and $GW_LOG)"
  fi
  bench_log "  ${RPS[$key]} callbacks/s, p50 ${P50[$key]} ms, p99 ${P99[$key]} ms; ${STORED[$key]} deliveries stored for $acked callbacks acked"
  bench_stop_gateway
  rm -rf "$data"
}

if [[ " $PHASES " == *" ingest "* ]]; then
  for round in $(seq 1 "$ROUNDS"); do
    # Alternate the order so neither spool always runs on a warmer machine.
    if ((round % 2)); then order="memory redb"; else order="redb memory"; fi
    for spool in $order; do
      ingest "$spool" "$round"
    done
  done
fi

# ---------------------------------------------------------------------------------------------
# b. fill a backlog, then drain it

if [[ " $PHASES " == *" drain "* ]]; then
  data="$BENCH_DATA_DIR/drain"
  callbacks=$(((BACKLOG + BENCH_FANOUT - 1) / BENCH_FANOUT))
  per_thread=$(((callbacks + THREADS - 1) / THREADS))
  fill_lua="$BENCH_TMP/fill.lua"
  bench_write_lua "$fill_lua" "$per_thread"
  bench_log "drain: filling a backlog of $((per_thread * THREADS * BENCH_FANOUT)) deliveries ($((per_thread * THREADS)) callbacks x $BENCH_FANOUT targets) with the targets paused"
  bench_start_gateway redb "$data"
  bench_targets pause
  sleep 0.5
  read -r RSS_IDLE _ < <(bench_rss)
  rss_file="$BENCH_OUT/rss-drain.txt"
  bench_sample_rss "$rss_file"
  bench_perf_start fill
  goal=$((per_thread * THREADS * BENCH_FANOUT))
  t_fill0=$(bench_now)
  # wrk keeps running until its duration even when every thread has stopped: run it in the
  # background and interrupt it (it prints its statistics on SIGINT) once the queue is full,
  # or once the depth stops growing (callbacks refused: see non-2xx).
  wrk -t"$THREADS" -c"$CONNECTIONS" -d36000s --timeout 10s --latency -s "$fill_lua" "$BENCH_CALLBACK_URL" \
    >"$BENCH_OUT/wrk-fill.txt" 2>&1 &
  wrk_pid=$!
  BENCH_PIDS+=("$wrk_pid")
  last=-1
  still=0
  while :; do
    sleep 0.2
    depth=$(bench_queue_depth)
    if ((depth >= goal)); then break; fi
    if ((depth == last)); then still=$((still + 1)); else still=0; fi
    if ((still >= 25)); then
      bench_log "WARNING: the backlog stopped growing at $depth deliveries"
      break
    fi
    kill -0 "$wrk_pid" 2>/dev/null || bench_die "wrk exited during the fill: $(cat "$BENCH_OUT/wrk-fill.txt")"
    last=$depth
  done
  t_fill1=$(bench_now)
  kill -INT "$wrk_pid" 2>/dev/null || true
  wait "$wrk_pid" 2>/dev/null || true
  bench_perf_stop
  FILL_NON2XX=$(bench_wrk_field "$BENCH_OUT/wrk-fill.txt" non2xx)
  sleep 1
  BACKLOG_REAL=$(bench_queue_depth)
  FILL_RPS=$(awk -v n="$BACKLOG_REAL" -v f="$BENCH_FANOUT" -v a="$t_fill0" -v b="$t_fill1" 'BEGIN {printf "%.0f", n / f / (b - a)}')
  read -r RSS_AFTER_FILL HWM_FILL < <(bench_rss)
  PEAK_FILL=$(bench_peak_rss "$rss_file" "$t_fill0" "$(bench_now)")
  if ((HWM_FILL > PEAK_FILL)); then PEAK_FILL=$HWM_FILL; fi
  SPOOL_FILL=$(stat -c %s "$data/spool.redb")
  SPOOL_FILL_DISK=$(($(stat -c '%b * %B' "$data/spool.redb")))
  bench_log "  backlog $BACKLOG_REAL deliveries in $(awk -v a="$t_fill0" -v b="$t_fill1" 'BEGIN {printf "%.1f", b - a}') s ($FILL_RPS callbacks/s, $FILL_NON2XX not acked); RSS $((RSS_AFTER_FILL / 1024)) MiB, peak $((PEAK_FILL / 1024)) MiB; spool file $((SPOOL_FILL / 1048576)) MiB"

  HWM_RESET=no
  bench_reset_hwm && HWM_RESET=yes
  sinks0=$(bench_sink_requests)
  bench_cpu_snapshot snap0
  drain_csv="$BENCH_OUT/drain.csv"
  echo "seconds,depth,rss_kib" >"$drain_csv"
  bench_log "drain: resuming the targets"
  bench_perf_start drain
  t_drain0=$(bench_now)
  bench_targets resume
  t_drain1=""
  while :; do
    now=$(bench_now)
    depth=$(bench_queue_depth)
    read -r rss _ < <(bench_rss)
    elapsed=$(awk -v a="$t_drain0" -v b="$now" 'BEGIN {printf "%.3f", b - a}')
    echo "$elapsed,$depth,$rss" >>"$drain_csv"
    if ((depth == 0)); then
      t_drain1=$now
      break
    fi
    if awk -v e="$elapsed" -v m="$DRAIN_TIMEOUT" 'BEGIN {exit !(e > m)}'; then
      bench_log "WARNING: the backlog did not drain within ${DRAIN_TIMEOUT}s ($depth left)"
      break
    fi
    sleep "${POLL:-0.5}"
  done
  bench_perf_stop
  bench_cpu_snapshot snap1
  sinks1=$(bench_sink_requests)
  # Each stub_status request counts itself; the first one was counted before sinks0 was read.
  SINK_DELIVERED=$((sinks1 - sinks0 - 1))
  read -r RSS_AFTER_DRAIN HWM_DRAIN < <(bench_rss)
  PEAK_DRAIN=$(bench_peak_rss "$rss_file" "$t_drain0" "$(bench_now)")
  if [[ $HWM_RESET == yes ]] && ((HWM_DRAIN > PEAK_DRAIN)); then PEAK_DRAIN=$HWM_DRAIN; fi
  SPOOL_DRAIN=$(stat -c %s "$data/spool.redb")
  SPOOL_DRAIN_DISK=$(($(stat -c '%b * %B' "$data/spool.redb")))
  if [[ -n "$t_drain1" ]]; then
    DRAIN_S=$(awk -v a="$t_drain0" -v b="$t_drain1" 'BEGIN {printf "%.1f", b - a}')
    DRAIN_RATE=$(awk -v n="$BACKLOG_REAL" -v s="$DRAIN_S" 'BEGIN {printf "%.0f", n / s}')
  else
    DRAIN_S="> $DRAIN_TIMEOUT"
    DRAIN_RATE="n/a"
  fi
  # The steady rate: from the first sample at or under 90% of the backlog to the first at or
  # under 10% (leaves out connection set-up and the tail).
  DRAIN_STEADY=$(awk -F, -v b="$BACKLOG_REAL" 'NR > 1 {
      if (!t90 && $2 <= 0.9 * b) {t90 = $1; d90 = $2}
      if (!t10 && $2 <= 0.1 * b) {t10 = $1; d10 = $2}
    } END {if (t10 > t90) printf "%.0f", (d90 - d10) / (t10 - t90); else print "n/a"}' "$drain_csv")
  read -r DRAIN_CPU DRAIN_OURS DRAIN_OTHER < <(bench_cpu_usage "$snap0" "$snap1" "${DRAIN_S#> }")
  if ((DRAIN_OTHER > 10)); then
    bench_log "WARNING: other work on the machine used $DRAIN_OTHER% of a core during the drain"
  fi
  kill "$RSS_SAMPLER_PID" 2>/dev/null || true
  bench_log "  drained in $DRAIN_S s: $DRAIN_RATE deliveries/s (steady $DRAIN_STEADY/s); sinks got $SINK_DELIVERED; peak RSS $((PEAK_DRAIN / 1024)) MiB"
  bench_stop_gateway
  rm -rf "$data"
fi

# ---------------------------------------------------------------------------------------------
# Report

mib() { awk -v k="$1" 'BEGIN {printf "%.1f", k / 1024}'; }
{
  echo "switchyard spool benchmark — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(cd "$BENCH_ROOT" && git describe --always --dirty 2>/dev/null || echo unknown)"
  printf '%s\n' "$MACHINE"
  echo "load:   wrk -t$THREADS -c$CONNECTIONS, ${DURATION}s after ${WARMUP}s warm-up; one signed Tencent callback (${#BENCH_BODY} bytes), $BENCH_FANOUT deliveries each"
  echo
  if [[ " $PHASES " == *" ingest "* ]]; then
    echo "a. ingest, targets paused (acknowledged = stored)"
    echo "(CPU in % of one core: gw = the gateway; ours = the gateway, wrk, nginx and this script;"
    echo " other = anything else on the machine, should be ~0; rss_mib: the gateway's RSS at the end,"
    echo " with everything acknowledged still queued)"
    printf '%-8s %5s %12s %9s %9s %8s %8s %16s %6s %6s %6s %8s\n' spool round callbacks/s p50_ms p99_ms non2xx errors stored/acked*3 gw ours other rss_mib
    sum_redb=0
    sum_mem=0
    for round in $(seq 1 "$ROUNDS"); do
      for spool in redb memory; do
        k="$spool.$round"
        printf '%-8s %5s %12s %9s %9s %8s %8s %16s %6s %6s %6s %8s\n' "$spool" "$round" "${RPS[$k]}" "${P50[$k]}" "${P99[$k]}" \
          "${NON2XX[$k]}" "${ERRS[$k]}" "${STORED[$k]}/$((${ACKED[$k]} * BENCH_FANOUT))" "${CPU[$k]}" "${OURS[$k]}" "${OTHER[$k]}" "$(mib "${RSS_END[$k]}")"
      done
      sum_redb=$((sum_redb + ${RPS[redb.$round]}))
      sum_mem=$((sum_mem + ${RPS[memory.$round]}))
    done
    ratio=$(awk -v a="$sum_redb" -v b="$sum_mem" 'BEGIN {printf "%.2f", a / b}')
    verdict=$(awk -v r="$ratio" 'BEGIN {print (r > 0.5) ? "goal > 0.5 met" : "goal > 0.5 NOT met"}')
    echo "ratio redb/memory: $ratio ($verdict)"
    echo
  fi
  if [[ " $PHASES " == *" drain "* ]]; then
    echo "b. backlog fill and drain (--spool redb)"
    printf '  %-36s %s\n' \
      "backlog (deliveries)" "$BACKLOG_REAL" \
      "fill rate (callbacks/s, paused)" "$FILL_RPS (non-2xx: $FILL_NON2XX)" \
      "drain time (s)" "$DRAIN_S" \
      "drain rate (deliveries/s)" "$DRAIN_RATE (steady 90%->10%: $DRAIN_STEADY)" \
      "delivered at the sinks" "$SINK_DELIVERED" \
      "CPU while draining (100 = one core)" "gateway $DRAIN_CPU, with the sinks and the bench $DRAIN_OURS, other work $DRAIN_OTHER" \
      "RSS idle before fill (MiB)" "$(mib "$RSS_IDLE")" \
      "RSS peak during fill (MiB)" "$(mib "$PEAK_FILL")" \
      "RSS after fill (MiB)" "$(mib "$RSS_AFTER_FILL")" \
      "RSS peak during drain (MiB)" "$(mib "$PEAK_DRAIN")$([[ $HWM_RESET == yes ]] || echo ' (sampled)')" \
      "RSS after drain (MiB)" "$(mib "$RSS_AFTER_DRAIN")" \
      "spool file after fill (MiB)" "$(awk -v b="$SPOOL_FILL" -v d="$SPOOL_FILL_DISK" -v n="$BACKLOG_REAL" 'BEGIN {printf "%.1f (%.1f allocated on disk, %.0f bytes per delivery)", b / 1048576, d / 1048576, d / n}')" \
      "spool file after drain (MiB)" "$(awk -v b="$SPOOL_DRAIN" -v d="$SPOOL_DRAIN_DISK" 'BEGIN {printf "%.1f (%.1f allocated on disk)", b / 1048576, d / 1048576}')"
    goal=$(awk -v r="$DRAIN_RATE" 'BEGIN {print (r + 0 >= 20000) ? "met" : "NOT met"}')
    if [[ "${QUICK:-0}" == 1 ]]; then goal="not measured by a QUICK run"; fi
    echo "  drain goal >= 20,000 deliveries/s: $goal"
    if ((SINK_DELIVERED < BACKLOG_REAL)); then
      echo "  WARNING: the sinks got fewer requests than the backlog"
    fi
  fi
} | tee "$RESULTS"
bench_log "results in $RESULTS"
