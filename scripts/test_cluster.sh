#!/usr/bin/env bash
# A real multi-node Slurm cluster and a "login node" sshd on loopback, for the tests and CI.
#
#   scripts/test_cluster.sh up      install (Debian packages) and start munge, slurmctld, slurmd, sshd
#   scripts/test_cluster.sh down    stop them
#   scripts/test_cluster.sh status  sinfo and the sshd port
#
# The cluster has LLMFLOW_TEST_NODES nodes (default 3), node1..nodeN: one slurmd each
# (`slurmd -N nodeK`), each with its own port, spool, pid and log file and its own loopback
# address 127.0.0.(10+K), named in /etc/hosts, so a server in a job binds and is reached at its
# node's address. All traffic stays on loopback.
# The sshd listens on 127.0.0.1 only, with its own host key, and lets in one test key. What
# the tests need is written to build/testcluster/env (SSH port, key, known_hosts).
# Needs root (it is run by `make test` on the project's machines, which are root).
set -euo pipefail
cd "$(dirname "$0")/.."
TOP=$(pwd)
STATE=$TOP/build/testcluster
SSH_PORT=${LLMFLOW_TEST_SSH_PORT:-22022}
TEST_PASSPHRASE="llmflow test passphrase"  # of the test-only client key below; nothing else uses it
NODES=${LLMFLOW_TEST_NODES:-3}
node_names() { seq -f 'node%g' 1 "$NODES"; }

need_packages() {
  local missing=()
  for cmd in slurmctld slurmd sbatch munged sshd nginx; do
    command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("$cmd")
  done
  # PostgreSQL's server, for the test that runs a Prefect server on PostgreSQL (its fixture starts
  # and stops a private instance; nothing is started here)
  compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || missing+=(postgresql)
  if [ ${#missing[@]} -gt 0 ]; then
    echo "[cluster] installing slurmctld slurmd slurm-client munge openssh-server postgresql nginx-light (missing: ${missing[*]})"
    apt-get update -qq
    # nginx-light: the stable URL in front of replicas (the tests start their own; none is left running)
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurmctld slurmd slurm-client munge openssh-server postgresql nginx-light >/dev/null
    pkill -f "nginx: master process /usr/sbin/nginx" 2>/dev/null || true  # the package's own site, if it started it
  fi
}

start_munge() {
  if [ ! -s /etc/munge/munge.key ]; then
    mkdir -p /etc/munge
    dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
  fi
  chown munge:munge /etc/munge/munge.key && chmod 400 /etc/munge/munge.key
  mkdir -p /run/munge /var/log/munge /var/lib/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge
  pgrep -x munged >/dev/null || su -s /bin/sh munge -c /usr/sbin/munged
}

write_hosts() {
  # node names to their loopback addresses, once each
  local k
  for k in $(seq 1 "$NODES"); do
    grep -qE "^127\.0\.0\.$((10 + k))[[:space:]]+node$k\b" /etc/hosts || echo "127.0.0.$((10 + k)) node$k" >> /etc/hosts
  done
}

write_slurm_conf() {
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
  local cpus mem k
  cpus=$(nproc)
  mem=$(( ($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024 - 2048) / NODES ))
  {
    cat <<CONF
ClusterName=llmflow-test
SlurmctldHost=$(hostname -s)
SlurmUser=root
SlurmctldPort=6817
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmdPidFile=/run/slurmd-%n.pid
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
ReturnToService=2
SchedulerType=sched/backfill
SlurmctldLogFile=/var/log/slurm/slurmctld.log
MinJobAge=30
JobRequeue=1
DefMemPerCPU=1024
CONF
    for k in $(seq 1 "$NODES"); do
      echo "NodeName=node$k NodeAddr=127.0.0.$((10 + k)) Port=$((6820 + k)) CPUs=$cpus RealMemory=$mem State=UNKNOWN"
    done
    echo "PartitionName=debug Nodes=node[1-$NODES] Default=YES MaxTime=INFINITE State=UP"
  } > /etc/slurm/slurm.conf.new
  for k in $(seq 1 "$NODES"); do mkdir -p "/var/spool/slurmd/node$k"; done
  if ! cmp -s /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf; then
    # another layout (the old one-node cluster, another node count): start Slurm afresh (-c)
    echo "[cluster] new slurm.conf ($NODES nodes); restarting Slurm with a clean state"
    pkill -x slurmd 2>/dev/null || true
    pkill -x slurmctld 2>/dev/null || true
    for _ in $(seq 1 100); do pgrep -x 'slurmctld|slurmd' >/dev/null || break; sleep 0.2; done
    mv /etc/slurm/slurm.conf.new /etc/slurm/slurm.conf
    CLEAN_START=-c
  else
    rm -f /etc/slurm/slurm.conf.new
  fi
}

start_slurm() {
  local name
  pgrep -x slurmctld >/dev/null || slurmctld ${CLEAN_START:-}
  for name in $(node_names); do
    pgrep -f "^slurmd -N $name\$" >/dev/null || slurmd -N "$name"
  done
  for _ in $(seq 1 60); do
    if [ "$(sinfo -h -N -o '%N %T' 2>/dev/null | grep -cE ' (idle|mixed|allocated)$')" -ge "$NODES" ]; then return 0; fi
    for name in $(node_names); do scontrol update nodename="$name" state=resume >/dev/null 2>&1 || true; done
    sleep 0.5
  done
  echo "[cluster] slurm did not come up:" >&2
  sinfo -N >&2 || true
  tail -20 /var/log/slurm/slurmctld.log >&2 || true
  return 1
}

clear_queue() {
  # Jobs recovered from an earlier life of this test cluster (a machine snapshot taken mid-run,
  # a killed CI run) can hold the node with no process behind them for a long time; start clean.
  local jobs
  jobs=$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ')
  [ -z "${jobs// }" ] && return 0
  echo "[cluster] cancelling jobs left from an earlier run: $jobs"
  # shellcheck disable=SC2086
  scancel $jobs 2>/dev/null || true
  for _ in $(seq 1 120); do
    [ -z "$(squeue -h -o '%i' 2>/dev/null)" ] && [ "$(sinfo -h -N -o '%T' | grep -cx idle)" -ge "$NODES" ] && return 0
    sleep 0.5
  done
  echo "[cluster] warning: queue not empty after cancelling:" >&2
  squeue >&2 || true
}

start_sshd() {
  mkdir -p "$STATE" /run/sshd
  chmod 700 "$STATE"
  [ -f "$STATE/host_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/host_ed25519"
  [ -f "$STATE/client_ed25519" ] || ssh-keygen -q -t ed25519 -N '' -f "$STATE/client_ed25519"
  # a second client key with a passphrase, for the tests of keys that have one
  [ -f "$STATE/client_ed25519_pass" ] || ssh-keygen -q -t ed25519 -N "$TEST_PASSPHRASE" -f "$STATE/client_ed25519_pass"
  cat "$STATE/client_ed25519.pub" "$STATE/client_ed25519_pass.pub" > "$STATE/authorized_keys"
  chmod 600 "$STATE/authorized_keys"
  cat > "$STATE/sshd_config" <<CONF
Port $SSH_PORT
ListenAddress 127.0.0.1
HostKey $STATE/host_ed25519
PidFile $STATE/sshd.pid
AuthorizedKeysFile $STATE/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
AllowTcpForwarding yes
StrictModes no
Subsystem sftp internal-sftp
# Commands over SSH run the login shell, which on this machine sources root's .bashrc and so
# 'pyenv init', whose rehash waits up to 60 s on a lock file. A session cut while it held the
# lock (a test that SIGKILLs a flow cuts its SSH sessions) leaves the lock behind, and every
# later command then took 60 s. Don't wait on it here: a skipped rehash costs nothing.
SetEnv PYENV_REHASH_TIMEOUT=0
CONF
  # a lock such a cut session left (older than 2 minutes: a live rehash takes well under a second)
  find "${PYENV_ROOT:-$HOME/.pyenv}/shims" -maxdepth 1 -name .pyenv-shim -mmin +2 -delete 2>/dev/null || true
  # one test sshd at a time: stop ours, or one a checkout elsewhere left on the same port
  pkill -f "sshd -f .*/build/testcluster/sshd_config" 2>/dev/null && sleep 0.5 || true
  rm -f "$STATE/sshd.pid"
  /usr/sbin/sshd -f "$STATE/sshd_config" -E "$STATE/sshd.log"
  for _ in $(seq 1 50); do
    [ -s "$STATE/sshd.pid" ] && kill -0 "$(cat "$STATE/sshd.pid")" 2>/dev/null && break
    sleep 0.1
  done
  if ! { [ -s "$STATE/sshd.pid" ] && kill -0 "$(cat "$STATE/sshd.pid")" 2>/dev/null; }; then
    echo "[cluster] sshd did not start:" >&2
    tail -5 "$STATE/sshd.log" >&2
    return 1
  fi
  echo "[127.0.0.1]:$SSH_PORT $(cut -d' ' -f1,2 "$STATE/host_ed25519.pub")" > "$STATE/known_hosts"
  cat > "$STATE/env" <<ENV
LLMFLOW_TEST_SSH_HOST=127.0.0.1
LLMFLOW_TEST_SSH_PORT=$SSH_PORT
LLMFLOW_TEST_SSH_USER=$(id -un)
LLMFLOW_TEST_SSH_KEY=$STATE/client_ed25519
LLMFLOW_TEST_KNOWN_HOSTS=$STATE/known_hosts
LLMFLOW_TEST_SSH_KEY_WITH_PASSPHRASE=$STATE/client_ed25519_pass
LLMFLOW_TEST_SSH_PASSPHRASE=$TEST_PASSPHRASE
ENV
}

case "${1:-up}" in
  up)
    need_packages
    start_munge
    write_hosts
    write_slurm_conf
    start_slurm
    clear_queue
    start_sshd
    echo "[cluster] up: $(sinfo -h -o '%P %T %N' | tr '\n' ' ')($NODES nodes); sshd on 127.0.0.1:$SSH_PORT"
    ;;
  down)
    scancel --user="$(id -un)" >/dev/null 2>&1 || true
    pkill -f "sshd -f .*/build/testcluster/sshd_config" 2>/dev/null || true
    pkill -x slurmd || true
    pkill -x slurmctld || true
    echo "[cluster] down"
    ;;
  status)
    sinfo; squeue
    [ -f "$STATE/env" ] && cat "$STATE/env"
    ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
