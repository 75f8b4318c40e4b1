#!/usr/bin/env bash
# One srun task (used by _launch.sh): runs the trainer and turns its "checkpointed after a
# signal, run me again" exit code 75 into 0 plus a marker file in $MDIFFU_EXIT_MARK.
#
# Why: with `srun --kill-on-bad-exit=1` (needed so a crashed rank takes the job down instead of
# leaving the others hanging in a collective), the first rank to exit with ANY non-zero code,
# 75 included, gets its siblings SIGTERMed while they may still be finishing their part of the
# checkpoint. Exiting 0 + a marker keeps pre-emption a clean exit for srun.
#
# Slurm signals every process of the step (this shell too); the trap keeps the shell alive
# (it only waits for the trainer, which handles SIGUSR1/SIGTERM itself: handlers reset on exec).
trap ':' USR1 TERM
"$@"
rc=$?
if [ "$rc" -eq 75 ] && [ -n "${MDIFFU_EXIT_MARK:-}" ]; then
  : >"$MDIFFU_EXIT_MARK/task-${SLURM_PROCID:-0}"
  exit 0
fi
exit "$rc"
