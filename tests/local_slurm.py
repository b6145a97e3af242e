"""A real single-node Slurm from Debian's packages, for the cluster tests: munge, slurmctld and slurmd as root.

Everything lives in one private directory (config, state, logs, munge key and socket, two fake GPUs made with
``mknod``), on loopback ports chosen free, so it never touches the machine's own Slurm or munge. Usage::

    with LocalSlurm(tmp_dir) as slurm:   # raises SlurmUnavailable (with the reason) where it cannot start
        subprocess.run(["sbatch", ...], env=slurm.env)

``python tests/local_slurm.py`` starts one and waits (Ctrl-C stops it), to try the runner by hand.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd")
CLIENTS = ("sbatch", "squeue", "scancel", "scontrol", "sinfo")
N_FAKE_GPUS = 2
NODE = "localhost"


class SlurmUnavailable(RuntimeError):
    """Slurm cannot start here; the message says why (the cluster tests skip with it)."""


def _free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _memory_mb() -> int:
    with open("/proc/meminfo") as fh:
        total_kb = int(next(line for line in fh if line.startswith("MemTotal")).split()[1])
    return total_kb // 1024 // 2  # what slurmd may advertise: half, so it never exceeds what it measures


class LocalSlurm:
    def __init__(self, root: Path | None = None):
        self.root = Path(root or tempfile.mkdtemp(prefix="slurm-"))
        self.conf = self.root / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.procs: dict[str, subprocess.Popen] = {}

    # --- set-up ----------------------------------------------------------------------------
    def check_can_start(self) -> None:
        missing = [b for b in DAEMONS + CLIENTS + ("mknod",) if shutil.which(b) is None]
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed (missing {', '.join(missing)}); "
                                   "apt-get install slurmctld slurmd slurm-client munge")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd and munged needs root")

    def write_config(self) -> None:
        for sub in ("state", "spool", "log", "munge", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)
        (self.root / "munge").chmod(0o700)
        key = self.root / "munge" / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        for i in range(N_FAKE_GPUS):  # character devices that Slurm hands out as GPUs; nothing opens them
            device = self.root / "dev" / f"fakegpu{i}"
            if not device.exists():
                subprocess.run(["mknod", str(device), "c", "195", str(i)], check=True, capture_output=True)
        ctld_port, slurmd_port = _free_ports(2)
        cpus = os.cpu_count() or 1
        r = self.root
        self.conf.write_text(f"""\
ClusterName=efficientllm-test
SlurmctldHost={NODE}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r}/munge/munge.socket
StateSaveLocation={r}/state
SlurmdSpoolDir={r}/spool
SlurmctldPidFile={r}/slurmctld.pid
SlurmdPidFile={r}/slurmd.pid
SlurmctldLogFile={r}/log/slurmctld.log
SlurmdLogFile={r}/log/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
GresTypes=gpu
ReturnToService=2
KillWait=2
MinJobAge=600
SchedulerParameters=sched_interval=1
NodeName={NODE} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={_memory_mb()} Gres=gpu:{N_FAKE_GPUS} State=UNKNOWN
PartitionName=debug Nodes={NODE} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
""")
        (self.root / "gres.conf").write_text(
            "AutoDetect=off\n" + "".join(f"NodeName={NODE} Name=gpu File={r}/dev/fakegpu{i}\n"
                                         for i in range(N_FAKE_GPUS)))

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.root / "log" / f"{name}.stdout", "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout_s: float = 60) -> "LocalSlurm":
        self.check_can_start()
        self.write_config()
        r = self.root
        self._start("munged", ["munged", "--foreground", "--force", f"--socket={r}/munge/munge.socket",
                               f"--key-file={r}/munge/munge.key", f"--pid-file={r}/munge/munged.pid",
                               f"--log-file={r}/log/munged.log", f"--seed-file={r}/munge/munged.seed"])
        self._wait(lambda: (r / "munge" / "munge.socket").exists(), timeout_s, "munged did not create its socket")
        self._start("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: self._ok(["scontrol", "ping"], "UP"), timeout_s, "slurmctld did not answer")
        self._start("slurmd", ["slurmd", "-D", "-N", NODE, "-f", str(self.conf)])
        self._wait(self._node_idle, timeout_s, "the node did not become idle")
        return self

    def _ok(self, cmd: list[str], expect: str) -> bool:
        out = subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=20)
        return out.returncode == 0 and expect in out.stdout

    def _node_idle(self) -> bool:
        return self._ok(["sinfo", "-h", "-N", "-o", "%T"], "idle")

    def _wait(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            dead = [n for n, p in self.procs.items() if p.poll() is not None]
            if dead:
                raise SlurmUnavailable(f"{dead[0]} exited at start-up: {self.log_tail(dead[0])}")
            if ready():
                return
            time.sleep(0.3)
        raise SlurmUnavailable(f"{what} within {timeout_s:.0f}s: {self.log_tail()}")

    def log_tail(self, name: str | None = None, lines: int = 8) -> str:
        names = [name] if name else list(self.procs)
        out = []
        for n in names:
            for path in (self.root / "log" / f"{n}.log", self.root / "log" / f"{n}.stdout"):
                if path.exists() and path.stat().st_size:
                    out.append(f"[{path.name}] " + " | ".join(path.read_text().strip().splitlines()[-lines:]))
        return "\n".join(out) or "(no log)"

    # --- use and tear-down -------------------------------------------------------------------
    def run(self, *cmd: str) -> str:
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, timeout=30, check=True).stdout

    def gpu_index_of_job(self, job_id: str) -> str | None:
        """The GRES indices Slurm allocated to a job, e.g. ``"0"`` (from ``scontrol -d show job``)."""
        import re

        match = re.search(r"GRES=gpu(?::\w+)?:\d+\(IDX:([\d,-]+)\)", self.run("scontrol", "-d", "show", "job", job_id))
        return match.group(1) if match else None

    def stop(self) -> None:
        if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:  # jobs outlive slurmd: end them
            subprocess.run(["scancel", "--full", "--partition=debug"], env=self.env, capture_output=True, timeout=20)
            deadline = time.monotonic() + 20
            while time.monotonic() < deadline and self.run("squeue", "-h", "-o", "%i").strip():
                time.sleep(0.5)
        for name in reversed(DAEMONS):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        self.procs.clear()

    def __enter__(self) -> "LocalSlurm":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # kill PID stops it cleanly too
    with LocalSlurm() as slurm:
        print(f"Slurm is up: export SLURM_CONF={slurm.conf}   (Ctrl-C stops it)", flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass
