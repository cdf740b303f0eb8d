#!/usr/bin/env bash
# A real single-node SLURM cluster and a PostgreSQL database for MLflow, on this machine.
#
#   sudo bash tests/cluster/setup.sh          (CI: .ci/run calls it)
#
# Idempotent: installs Debian's slurm-wlm, munge and postgresql if missing, writes a munge key
# and a slurm.conf for one node with this machine's CPUs and memory, and starts munged,
# slurmctld, slurmd and PostgreSQL unless they already run. PostgreSQL gets a role `vaeexp`
# (password `vaeexp`, may create databases) and a database `vaeexp` for the tests' MLflow
# servers. tests/cluster/ skips its tests, saying why, where this has not run.
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "tests/cluster/setup.sh: must run as root (it installs packages and starts daemons)" >&2
  exit 1
fi

need=()
for cmd_pkg in sinfo:slurm-wlm slurmctld:slurm-wlm munged:munge pg_ctlcluster:postgresql; do
  command -v "${cmd_pkg%%:*}" >/dev/null 2>&1 || need+=("${cmd_pkg##*:}")
done
if [ ! -d /usr/lib/postgresql ] || [ -z "$(ls /usr/lib/postgresql 2>/dev/null)" ]; then
  need+=(postgresql)
fi
if [ ${#need[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi

# munge: one key, its daemon.
if [ ! -s /etc/munge/munge.key ]; then
  mkdir -p /etc/munge
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
mkdir -p /run/munge /var/log/munge /var/lib/munge
chown munge:munge /run/munge /var/log/munge /var/lib/munge
if ! pgrep -x munged >/dev/null; then
  runuser -u munge -- /usr/sbin/munged
fi

# SLURM: one node, this machine, all its CPUs and most of its memory.
host=$(hostname -s)
cpus=$(nproc)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
conf=/etc/slurm/slurm.conf
want=$(cat <<CONF
# Written by vaeexp's tests/cluster/setup.sh: one node, this machine.
ClusterName=vaeexp
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$host CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=cpu Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
)
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
if [ -f "$conf" ] && ! head -1 "$conf" | grep -q "^# Written by vaeexp"; then
  echo "tests/cluster/setup.sh: $conf is not ours (a real cluster's?): leaving it alone" >&2
  exit 1
fi
changed=0
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
  printf '%s\n' "$want" > "$conf"
  changed=1
fi
if [ "$changed" = 1 ]; then
  pkill -x slurmctld 2>/dev/null || true
  pkill -x slurmd 2>/dev/null || true
  sleep 1
fi
pgrep -x slurmctld >/dev/null || slurmctld
pgrep -x slurmd >/dev/null || slurmd
for _ in $(seq 30); do
  if sinfo -h -o %T 2>/dev/null | grep -qE '^(idle|mixed|allocated)'; then break; fi
  sleep 1
done
scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
sinfo -h -o '%P %T %c %m' | sed 's/^/slurm: partition /'

# PostgreSQL: the cluster Debian made, a role and a database for MLflow.
version=$(ls /usr/lib/postgresql | sort -n | tail -1)
if ! pg_lsclusters -h | awk '{print $1, $2}' | grep -qx "$version main"; then
  pg_createcluster "$version" main >/dev/null
fi
pg_ctlcluster "$version" main start 2>/dev/null || true
for _ in $(seq 30); do
  if runuser -u postgres -- pg_isready -q; then break; fi
  sleep 1
done
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_roles WHERE rolname='vaeexp'" | grep -q 1 \
  || runuser -u postgres -- psql -qc "CREATE ROLE vaeexp LOGIN CREATEDB PASSWORD 'vaeexp'"
runuser -u postgres -- psql -qtAc "SELECT 1 FROM pg_database WHERE datname='vaeexp'" | grep -q 1 \
  || runuser -u postgres -- createdb -O vaeexp vaeexp
echo "postgresql: $version main on port $(pg_lsclusters -h | awk -v v="$version" '$1==v && $2=="main" {print $3}'), database vaeexp (role vaeexp)"
