# Sourced by slurm/pretrain.sh and slurm/finetune.sh (needs $REPO): runs the training step and
# requeues the job when it stopped early after saving a checkpoint.
#
# Stop paths, all ending in "the tasks save at one agreed step and exit 85 (EXIT_PREEMPTED)":
#   --signal=B:USR1@N   the warning reaches this batch shell, which forwards it to the srun step;
#   --signal=USR1@N     the warning reaches the tasks directly (this shell sees only their exit);
#   scancel --signal=USR1 JOB (with or without -b), and SIGTERM to the tasks on preemption.
# Exit 85, or a warning signal followed by a failed step, requeues the job (up to
# GPTV_MAX_REQUEUES times); the requeued job resumes from the newest complete checkpoint.
# A SIGTERM to this shell means Slurm itself is ending the job (scancel, requeue, time limit):
# the tasks still save, but this shell does not requeue what the user cancelled.

EXIT_PREEMPTED=85

run_requeueable_step() {
  local script=$1 entry=$2 python=${GPTV_PYTHON:-} rc before
  shift 2
  if [ $# -lt 1 ] || [[ $1 == *=* ]]; then
    echo "usage: sbatch [options] slurm/$script CONFIG.yaml [key=value ...]" >&2
    exit 2
  fi
  local config=$1
  shift
  if [ -z "$python" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then python=$REPO/.venv/bin/python; else python=python3; fi
  fi
  local max_requeues=${GPTV_MAX_REQUEUES:-10} restarts=${SLURM_RESTART_COUNT:-0}
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
  # srun starts every rank: a rank layout inherited from the submitting shell (a torchrun or an
  # earlier run's environment) would override Slurm's and leave each task alone in world size 1.
  unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR MASTER_PORT TORCHELASTIC_RUN_ID
  # Since Slurm 22.05 srun no longer inherits --cpus-per-task from the allocation.
  [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK

  warned="" terminating="" interrupts=0 step_pid=""
  trap 'warned=1; interrupts=$((interrupts + 1)); [ -n "$step_pid" ] && kill -USR1 "$step_pid" 2>/dev/null' USR1
  trap 'terminating=1; interrupts=$((interrupts + 1))' TERM
  echo "[job_step] job $SLURM_JOB_ID (restart $restarts) on $SLURM_JOB_NODELIST: $python $entry --config $config $*"
  srun "$python" -u "$REPO/$entry" --config "$config" "$@" &
  step_pid=$!
  while :; do
    before=$interrupts
    wait "$step_pid"
    rc=$?
    # A trapped signal interrupts `wait` (status > 128); the step runs on: wait again.
    if [ "$interrupts" = "$before" ] || [ "$rc" -le 128 ]; then break; fi
  done
  echo "[job_step] step exited with $rc${warned:+ after the warning signal}${terminating:+ (job terminating)}"
  if [ "$rc" = 0 ] || [ -n "$terminating" ]; then exit "$rc"; fi
  if [ "$rc" != "$EXIT_PREEMPTED" ] && [ -z "$warned" ]; then exit "$rc"; fi
  if [ "$restarts" -ge "$max_requeues" ]; then
    echo "[job_step] not requeued: $restarts requeues reached GPTV_MAX_REQUEUES=$max_requeues" >&2
    exit "$rc"
  fi
  echo "[job_step] requeueing job $SLURM_JOB_ID (requeue $((restarts + 1)) of at most $max_requeues)"
  scontrol requeue "$SLURM_JOB_ID" || exit "$rc"
  exit 0
}
