"""launch/slurm/pretrain.sbatch on a real Slurm cluster: two emulated nodes on this machine.

The module fixture brings the cluster up with launch/slurm/local_cluster.sh (which installs Slurm and munge
with apt where they are missing, so it needs root) and takes it down afterwards, even when a test fails.
A machine where Slurm cannot be installed fails these tests with apt's error: they never skip.
"""

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from harness import ROOT, TINY, job_env

pytestmark = pytest.mark.slow

CLUSTER_SCRIPT = ROOT / "launch" / "slurm" / "local_cluster.sh"
SBATCH = ROOT / "launch" / "slurm" / "pretrain.sbatch"
STEPS = 40
# fp32 and one loss per step: runs that stop and resume must reproduce the uninterrupted curve.
COMMON = ["parallel.precision=fp32", f"schedule.steps={STEPS}", "logging.every=1", "checkpoint.every=20",
          "checkpoint.keep_last=5"]


def _free_port_block(n: int) -> int:
    """First of n consecutive free TCP ports (slurmctld, then one per slurmd)."""
    for base in range(17000, 30000, 97):
        try:
            for port in range(base, base + n):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
    raise RuntimeError("no block of free ports for the local Slurm cluster")


def _cluster_command(env: dict, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(CLUSTER_SCRIPT), *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def _cluster_env(state: Path, nodes: int) -> dict:
    env = {k: v for k, v in job_env().items() if not k.startswith("SLURM_")}  # pytest may run inside a job
    return {**env, "HP_SLURM_DIR": str(state), "HP_SLURM_PORT": str(_free_port_block(nodes + 1)),
            "SLURM_CONF": str(state / "slurm.conf")}


def _daemon_pids(env: dict) -> list[int]:
    status = _cluster_command(env, "status")
    return [int(p) for p in re.findall(r"running, pid (\d+)", status.stdout)]


@dataclass
class Job:
    returncode: int
    run_dir: Path
    seconds: float

    @property
    def batch_output(self) -> str:
        path = Path(f"{self.run_dir}-batch.out")
        return path.read_text() if path.exists() else ""

    @property
    def node_logs(self) -> dict[str, str]:
        return {p.stem: p.read_text() for p in sorted(Path(f"{self.run_dir}-logs").glob("*.log"))}

    @property
    def losses(self) -> dict[int, float]:
        path = self.run_dir / "metrics.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        return {r["step"]: r["loss"] for r in map(json.loads, lines)}  # a resumed run's later lines win

    def describe(self) -> str:
        logs = "\n".join(f"--- {node}\n{text[-3000:]}" for node, text in self.node_logs.items())
        return f"exit code {self.returncode}\n--- batch\n{self.batch_output[-3000:]}\n{logs}"


@dataclass
class Cluster:
    env: dict
    shards: Path

    def submit(self, run_dir: Path, *overrides: str, nodes: int = 2) -> subprocess.Popen:
        """`sbatch --wait` of the project's sbatch file, as a user would type it; returns at once."""
        sets = [f"run_dir={run_dir}", f"data.shards_dir={self.shards}", "logging.wandb=disabled",
                "logging.progress_bar=false", *overrides]
        cmd = ["sbatch", "--wait", f"--nodes={nodes}", f"--job-name={run_dir.name}", f"--output={run_dir}-batch.out",
               str(SBATCH), "--config", str(TINY / "transformer.yaml"), *[a for s in sets for a in ("--set", s)]]
        env = {**self.env, "HP_PYTHON": sys.executable, "HP_LOG_DIR": f"{run_dir}-logs"}
        return subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def wait(self, proc: subprocess.Popen, run_dir: Path, started: float, timeout: float = 240) -> Job:
        try:
            output, _ = proc.communicate(timeout=timeout)
            # sbatch --wait exits 0 when the job record is gone before it looks (local_cluster.sh: MinJobAge).
            assert "exit code not found" not in output, f"sbatch --wait lost the job's exit code:\n{output}"
            # `sbatch --wait` returns once the job counts as ended, which for a cancelled job is before its
            # batch script has finished (state COMPLETING): wait until squeue no longer lists it.
            deadline = time.monotonic() + 60
            while self.squeue(run_dir.name) and time.monotonic() < deadline:
                time.sleep(0.2)
        finally:
            if proc.poll() is None:  # never leave a job behind on the cluster
                self.scontrol_cancel(run_dir.name)
                proc.kill()
                proc.wait()
        return Job(proc.returncode, run_dir, time.monotonic() - started)

    def run(self, run_dir: Path, *overrides: str, nodes: int = 2) -> Job:
        started = time.monotonic()
        return self.wait(self.submit(run_dir, *overrides, nodes=nodes), run_dir, started)

    def squeue(self, name: str) -> list[str]:
        """Ids of the jobs named `name` that are pending, running or completing."""
        return subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], env=self.env, capture_output=True,
                              text=True).stdout.split()

    def job_id(self, name: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if ids := self.squeue(name):
                return ids[0]
            time.sleep(0.2)
        raise AssertionError(f"job {name} never appeared in squeue")

    def scontrol_cancel(self, name: str) -> None:
        subprocess.run(["scancel", "--full", "-n", name], env=self.env, capture_output=True)


def _wait_for_steps(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 120) -> None:
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + timeout
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= n):
        assert proc.poll() is None, f"job ended before step {n}: {proc.stdout.read()}"
        assert time.monotonic() < deadline, f"step {n} never logged"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, stdlib_shards):
    env = _cluster_env(tmp_path_factory.mktemp("slurm"), nodes=2)
    up = _cluster_command(env, "up", "2")
    if up.returncode != 0:
        _cluster_command(env, "down")
        pytest.fail(f"local Slurm cluster did not come up:\n{up.stdout}\n{up.stderr}", pytrace=False)
    try:
        yield Cluster(env, stdlib_shards)
    finally:
        down = _cluster_command(env, "down")
        assert down.returncode == 0, down.stderr


@pytest.fixture(scope="module")
def reference(cluster, tmp_path_factory) -> Job:
    """An uninterrupted 2-node run: the curve the interrupted ones must reproduce."""
    job = cluster.run(tmp_path_factory.mktemp("reference") / "ref", *COMMON)
    assert job.returncode == 0, job.describe()
    return job


def test_two_nodes_train_the_tiny_transformer_and_loss_falls(reference):
    losses = reference.losses
    assert sorted(losses) == list(range(1, STEPS + 1)), reference.describe()
    first, last = losses[1], sum(losses[s] for s in range(STEPS - 2, STEPS + 1)) / 3
    assert last < first - 1.0, f"loss did not fall enough: first {first:.3f}, last {last:.3f}"
    # One srun step over both nodes, one log per node, each node running its own rank.
    logs = reference.node_logs
    assert set(logs) == {"hp-node1", "hp-node2"}, reference.describe()
    assert re.search(r"^0: ", logs["hp-node1"], re.M) and re.search(r"^1: ", logs["hp-node2"], re.M)
    assert "2 ranks, master hp-node1:" in reference.batch_output


def test_a_rank_that_dies_fails_the_job_without_requeue(cluster, tmp_path):
    run_dir = tmp_path / "dies"
    started = time.monotonic()
    proc = cluster.submit(run_dir, "schedule.steps=100000", "logging.every=1", "checkpoint.every=100000")
    _wait_for_steps(run_dir, proc, 2)
    ranks = {p.environ().get("RANK"): p for p in psutil.process_iter(["cmdline"])
             if "launch/pretrain.py" in " ".join(p.info["cmdline"] or []) and f"run_dir={run_dir}" in p.info["cmdline"]}
    assert set(ranks) == {"0", "1"}, ranks
    assert ranks["1"].environ().get("SLURMD_NODENAME") == "hp-node2"
    ranks["1"].send_signal(signal.SIGKILL)  # a crash: no handler, no checkpoint
    job = cluster.wait(proc, run_dir, started, timeout=180)
    assert job.returncode != 0, job.describe()
    assert "requeueing" not in job.batch_output and "restart 1" not in job.batch_output


def test_sigusr1_checkpoints_requeues_and_resumes_to_the_same_losses(cluster, reference, tmp_path):
    run_dir = tmp_path / "preempted"
    started = time.monotonic()
    proc = cluster.submit(run_dir, *COMMON)
    _wait_for_steps(run_dir, proc, 5)
    # What `#SBATCH --signal=USR1@120` does before the time limit: SIGUSR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", cluster.job_id(run_dir.name)], env=cluster.env, check=True)
    job = cluster.wait(proc, run_dir, started)
    assert job.returncode == 0, job.describe()
    node1 = job.node_logs["hp-node1"]
    stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", node1).group(1))
    assert 5 <= stopped < STEPS, job.describe()
    assert f"resuming from {run_dir}/checkpoints/step_{stopped:08d}" in node1
    assert "requeueing" in job.batch_output and "restart 1" in job.batch_output, job.describe()
    got, expected = job.losses, reference.losses
    assert sorted(got) == list(range(1, STEPS + 1))
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-6, abs=1e-6)


def test_scancel_checkpoints_and_does_not_requeue(cluster, tmp_path):
    run_dir = tmp_path / "cancelled"
    started = time.monotonic()
    proc = cluster.submit(run_dir, *COMMON, "schedule.steps=100000")
    _wait_for_steps(run_dir, proc, 3)
    subprocess.run(["scancel", cluster.job_id(run_dir.name)], env=cluster.env, check=True)  # SIGTERM, then end
    job = cluster.wait(proc, run_dir, started, timeout=120)
    stopped = int(re.search(r"preempted at step (\d+): checkpoint saved", job.node_logs["hp-node1"]).group(1))
    assert (run_dir / "checkpoints" / f"step_{stopped:08d}" / "COMPLETE").is_file()
    assert "cancelled: checkpoint saved, not requeued" in job.batch_output, job.describe()
    assert "restart 1" not in job.batch_output


def test_two_node_checkpoint_resumes_on_one_node_and_back(cluster, reference, tmp_path):
    # 2 nodes -> 1 node: the step-20 checkpoint of the 2-node reference run continues on one rank.
    one = tmp_path / "one_node"
    (one / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference.run_dir / "checkpoints" / "step_00000020", one / "checkpoints" / "step_00000020")
    job = cluster.run(one, *COMMON, "checkpoint.every=10", nodes=1)
    assert job.returncode == 0, job.describe()
    assert "1 ranks" in job.batch_output and "written by 2 data-parallel ranks" in job.node_logs["hp-node1"]
    got, expected = job.losses, reference.losses
    assert sorted(got) == list(range(21, STEPS + 1)), job.describe()
    # Same global batches, summed in another order: equal up to fp32 rounding.
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-5, abs=1e-5)

    # 1 node -> 2 nodes: the 1-node run's step-30 checkpoint continues on two ranks.
    two = tmp_path / "two_nodes"
    (two / "checkpoints").mkdir(parents=True)
    shutil.copytree(one / "checkpoints" / "step_00000030", two / "checkpoints" / "step_00000030")
    job = cluster.run(two, *COMMON, nodes=2)
    assert job.returncode == 0, job.describe()
    assert "written by 1 data-parallel ranks" in job.node_logs["hp-node1"]
    got = job.losses
    assert sorted(got) == list(range(31, STEPS + 1)), job.describe()
    assert [got[s] for s in got] == pytest.approx([expected[s] for s in got], rel=1e-5, abs=1e-5)


def test_local_cluster_second_up_is_a_noop_and_down_leaves_no_daemon(cluster, tmp_path_factory):
    # A second, 1-node cluster beside the module's: its own folder, ports and /etc/hosts line.
    state = tmp_path_factory.mktemp("slurm_idem")
    env = _cluster_env(state, nodes=1)
    first = _cluster_command(env, "up", "1")
    try:
        assert first.returncode == 0, first.stderr
        pids = _daemon_pids(env)
        assert len(pids) == 3, pids  # munged, slurmctld, one slurmd
        second = _cluster_command(env, "up", "1")
        assert second.returncode == 0 and "already up" in second.stderr, second.stderr
        assert _daemon_pids(env) == pids
        assert str(state) in Path("/etc/hosts").read_text()
    finally:
        down = _cluster_command(env, "down")
    assert down.returncode == 0, down.stderr
    time.sleep(0.5)
    alive = [p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE]
    assert alive == [], f"daemons still running after down: {alive}"
    assert not [p for p in psutil.process_iter(["cmdline"]) if str(state) in " ".join(p.info["cmdline"] or [])]
    assert str(state) not in Path("/etc/hosts").read_text()
    assert _cluster_command(env, "status").returncode == 3
    # The module's cluster is untouched.
    assert _cluster_command(cluster.env, "status").returncode == 0
