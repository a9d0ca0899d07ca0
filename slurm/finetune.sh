#!/bin/bash
# Fine-tuning / probes on Slurm: one node, one task, requeued with resume on preemption/time limit.
#
#   sbatch [sbatch options] slurm/finetune.sh CONFIG.yaml [key=value ...]
#   e.g. sbatch -p gpu -A myproj slurm/finetune.sh configs/finetune/X.yaml init=runs/X
#
# Command-line sbatch options override the headers below. One process: fine-tuning reads any
# checkpoint on one device. Partition and account are yours to give (-p, -A). Environment knobs:
#   GPTV_PYTHON        interpreter (default: <repo>/.venv/bin/python if present, else python3)
#   GPTV_REPO          repository root (default: found from this script's submitted path)
#   GPTV_MAX_REQUEUES  requeues allowed before giving up (default 10; counted by SLURM_RESTART_COUNT)
#SBATCH --job-name=gptv-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --mem=64G
#SBATCH --time=04:00:00
#SBATCH --signal=B:USR1@120
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=%x-%j.out
set -uo pipefail

# Slurm runs a copy of this script from its spool directory: find the repository from the path
# that was submitted (or the submit directory).
submitted=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.* Command=\([^ ]*\).*/\1/p')
REPO=${GPTV_REPO:-$(cd "$(dirname "${submitted:-$SLURM_SUBMIT_DIR/slurm/x}")/.." 2>/dev/null && pwd)}
if [ ! -f "$REPO/slurm/job_step.sh" ]; then
  echo "finetune.sh: cannot find the gpt_vision repository (tried '$REPO'); set GPTV_REPO" >&2
  exit 2
fi
source "$REPO/slurm/job_step.sh"
run_requeueable_step finetune.sh launch/finetune.py "$@"
