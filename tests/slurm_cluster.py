"""A real SLURM cluster on this machine for tests: slurmctld plus two slurmd "nodes" (n1, n2 on 127.0.0.1).

Debian's packages (slurmctld, slurmd, slurm-client) are installed by ``.ci/run``; a machine without them fails
the test that needs them with the install command (unless LTPOST_ALLOW_NO_SLURM=1 lets it skip). No systemd, no
cgroups, no munge (``auth/none``): everything lives in one temporary folder, and ``stop()`` shuts the daemons
down (``scontrol shutdown``, then their pids). Measured facts behind the settings: shared/notes/distributed-on-cpu.md.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

CONF = """\
ClusterName=ltpost-test
SlurmctldHost={host}
SlurmctldPort={ctld_port}
SlurmUser=root
AuthType=auth/none
CredType=cred/none
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd-%n.pid
SlurmdSpoolDir={root}/spool-%n
StateSaveLocation={root}/state
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd-%n.log
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=5
MinJobAge=300
NodeName=n1 NodeAddr=127.0.0.1 Port={port1} CPUs={cpus} RealMemory=2000 State=UNKNOWN
NodeName=n2 NodeAddr=127.0.0.1 Port={port2} CPUs={cpus} RealMemory=2000 State=UNKNOWN
PartitionName=debug Nodes=n1,n2 Default=YES MaxTime=30 State=UP OverSubscribe=YES
"""

DAEMONS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "sinfo")


def missing_binaries() -> list[str]:
    return [name for name in DAEMONS if shutil.which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.conf = root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.processes: list[subprocess.Popen] = []

    def start(self, timeout: float = 60) -> None:
        (self.root / "state").mkdir(parents=True, exist_ok=True)
        for node in ("n1", "n2"):
            (self.root / f"spool-{node}").mkdir(exist_ok=True)
        cpus = max(2, os.cpu_count() or 2)
        self.conf.write_text(
            CONF.format(
                host=socket.gethostname().split(".")[0],
                root=self.root,
                ctld_port=_free_port(),
                port1=_free_port(),
                port2=_free_port(),
                cpus=cpus,
            )
        )
        log = open(self.root / "daemons.out", "w")
        self.processes.append(
            subprocess.Popen(["slurmctld", "-D", "-i", "-f", str(self.conf)], env=self.env, stdout=log, stderr=log)
        )
        for node in ("n1", "n2"):
            self.processes.append(
                subprocess.Popen(
                    ["slurmd", "-D", "-f", str(self.conf), "-N", node], env=self.env, stdout=log, stderr=log
                )
            )
        deadline = time.monotonic() + timeout
        out = ""
        while time.monotonic() < deadline:
            if any(proc.poll() is not None for proc in self.processes):
                raise RuntimeError(f"a SLURM daemon exited at start\n{self.logs()}")
            out = self.run("sinfo", "-h", "-o", "%n %t", check=False).stdout
            states = dict(line.split() for line in out.splitlines() if line.strip())
            if set(states) == {"n1", "n2"} and all(s.startswith("idle") for s in states.values()):
                return
            time.sleep(0.5)
        raise RuntimeError(f"SLURM nodes never became idle: {out!r}\n{self.logs()}")

    def run(self, *command: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        result = subprocess.run(list(command), env=self.env, capture_output=True, text=True, timeout=timeout)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(command)} failed: {result.stderr}\n{self.logs()}")
        return result

    def sbatch(self, *args: str) -> str:
        return self.run("sbatch", "--parsable", *args).stdout.strip().split(";")[0]

    def job_state(self, job_id: str) -> str:
        out = self.run("scontrol", "show", "job", job_id, check=False).stdout
        for field in out.split():
            if field.startswith("JobState="):
                return field.split("=", 1)[1]
        return "UNKNOWN"

    def wait(self, job_id: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in states:
                return state
            time.sleep(1)
        self.run("scancel", job_id, check=False)
        raise TimeoutError(f"job {job_id} still {self.job_state(job_id)} after {timeout} s\n{self.logs()}")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd-n1.log", "slurmd-n2.log", "daemons.out"):
            path = self.root / name
            if path.exists():
                parts.append(f"--- {name}\n" + path.read_text()[-2000:])
        return "\n".join(parts)

    def stop(self) -> None:
        self.run("scontrol", "shutdown", check=False, timeout=20)
        for proc in self.processes:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=10)
