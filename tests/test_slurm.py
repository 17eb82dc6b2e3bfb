"""The sbatch scripts users submit, run on a real SLURM cluster (tests/slurm/cluster_up.sh: two
fake nodes on this machine), with the tiny-model overrides every script accepts; and the same
training started by mpirun and torchrun."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("PRETRAIN_SLURM_DIR", "/tmp/pretrain-slurm"))
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "bench/gpu.sh"]
TINY = [
    "model.vocab_size=2000",
    "model.num_layers=2",
    "model.hidden_size=64",
    "model.num_heads=4",
    "model.seq_length=64",
    "model.dropout=0.0",
    "train.micro_batch_size=2",
    "train.global_batch_size=8",
    "train.log_interval=1",
    "train.eval_interval=0",
    "logging.tensorboard=false",
    "logging.peak_tflops=1",
]


@pytest.fixture(scope="session")
def cluster():
    """The cluster's environment (SLURM_CONF); started here unless tests/run.sh already did."""
    started = not (SLURM_DIR / "started").exists()
    up = subprocess.run(["bash", str(ROOT / "tests/slurm/cluster_up.sh")], capture_output=True, text=True, timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    if started:
        subprocess.run(["bash", str(ROOT / "tests/slurm/cluster_down.sh")], capture_output=True, timeout=120)


def job_env(cluster, stdlib_data, run_dir, overrides):
    return {
        **cluster,
        "PRETRAIN_CONFIG": "configs/gpt_tiny.yaml",
        "PRETRAIN_DATA": stdlib_data["prefix"],
        "PRETRAIN_TOKENIZER": stdlib_data["tokenizer"],
        "PRETRAIN_RUN_DIR": str(run_dir),
        "PRETRAIN_OVERRIDES": " ".join(TINY + overrides),
        "PYTHON": sys.executable,
    }


# 2 nodes x 2 tasks, no GPUs: the 13B script's own #SBATCH lines, overridden as a user would.
SBATCH = ["sbatch", "--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=0", "--cpus-per-task=1"]
LAYOUT = ["parallel.tensor=2", "parallel.zero_stage=1", "train.steps=30", "checkpoint.interval=10"]


def losses(run_dir) -> dict[int, float]:
    """step -> loss, the last record of each step (a requeued job logs the steps after its
    checkpoint again)."""
    lines = (Path(run_dir) / "logs/metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


def job_state(cluster, job: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=cluster, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def job_id(sbatch: subprocess.CompletedProcess) -> str:
    """The job id `sbatch --parsable` printed ("ID" or "ID;CLUSTER")."""
    return sbatch.stdout.strip().split(";")[0]


def submit(command: list[str], env: dict, cwd=ROOT) -> str:
    """`sbatch --parsable ...` without waiting: the id of the accepted job."""
    submitted = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    return job_id(submitted)


def wait_for(condition, log: Path, deadline: float) -> None:
    """Poll `condition()` until it holds; past `deadline`, fail with the end of the job's log."""
    while not condition():
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "job never started"
        time.sleep(0.2)


def wait_for_end(cluster, job: str, log: Path, deadline: float) -> dict:
    while True:
        state = job_state(cluster, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            return state
        assert time.time() < deadline, f"job {job} still {state.get('JobState')}: {log.read_text()[-3000:]}"
        time.sleep(1)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:  # tests/run.sh installs it (Debian's shellcheck)
        pytest.fail("shellcheck is not installed: run the suite through tests/run.sh")
    check = subprocess.run(
        ["shellcheck", "-x", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout


@pytest.fixture(scope="module")
def straight_13b(cluster, stdlib_data, tmp_path_factory):
    """`sbatch --wait slurm/pretrain_gpt_13b.sh` on 2 nodes x 2 CPU tasks: TP 2 x DP 2, ZeRO-1."""
    run_dir = tmp_path_factory.mktemp("gpt13b_straight")
    log = run_dir / "job.out"
    result = subprocess.run(
        [*SBATCH, "--wait", f"--output={log}", "slurm/pretrain_gpt_13b.sh"],
        cwd=ROOT,
        env=job_env(cluster, stdlib_data, run_dir, LAYOUT),
        capture_output=True,
        text=True,
        timeout=900,
    )
    return result, run_dir, log


def test_13b_script_trains_tiny_model_on_two_nodes(straight_13b):
    result, run_dir, log = straight_13b
    text = log.read_text()
    assert result.returncode == 0, result.stderr + text[-3000:]
    assert "node n1: ranks 0-1 of 4 (srun, gloo, cpu" in text and "node n2: ranks 2-3 of 4 (srun" in text
    assert "tp 0/2, dp 0/2, pp 0/1" in text
    assert sorted(losses(run_dir)) == list(range(1, 31))
    assert (run_dir / "checkpoints/latest").read_text().strip() == "step_30"
    files = {p.name for p in (run_dir / "checkpoints/step_30").iterdir()}
    assert {f"model_tp{t}_pp0_part{d}.safetensors" for t in (0, 1) for d in (0, 1)} <= files


def test_preempted_job_saves_requeues_resumes_and_matches(cluster, stdlib_data, straight_13b, tmp_path):
    """SIGUSR1 to the batch shell (what `#SBATCH --signal=B:USR1@600` sends before the time
    limit) mid-run: the script passes it to the tasks, training saves and exits 75, the script
    requeues the job, the requeued job resumes from `latest` and finishes; its losses after the
    resume equal the uninterrupted job's."""
    _, straight_dir, _ = straight_13b
    log = tmp_path / "job.out"
    job = submit(
        [*SBATCH, "--parsable", f"--output={log}", "slurm/pretrain_gpt_13b.sh"],
        job_env(cluster, stdlib_data, tmp_path, LAYOUT),
    )
    metrics = tmp_path / "logs/metrics.jsonl"
    deadline = time.time() + 600
    # A few steps in, well before step 30.
    wait_for(lambda: metrics.exists() and len(losses(tmp_path)) >= 4, log, deadline)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    state = wait_for_end(cluster, job, log, deadline)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-4000:]
    assert "batch shell: SIGUSR1, passing it to the training tasks" in text
    assert "stopped early (SIGUSR1) with exit code 75" in text
    assert f"requeueing job {job}" in text
    stopped_at = int(re.search(r"stopping after step (\d+) of 30: SIGUSR1", text).group(1))
    assert 4 <= stopped_at < 30
    assert f"resumed from {tmp_path}/checkpoints/step_{stopped_at}" in text
    ours, theirs = losses(tmp_path), losses(straight_dir)
    assert sorted(ours) == list(range(1, 31))
    assert [ours[s] for s in range(stopped_at + 1, 31)] == [theirs[s] for s in range(stopped_at + 1, 31)]


def training_processes(run_dir) -> dict[int, int]:
    """SLURM_PROCID -> pid of each training task's Python process (launch/train.sh execs it), found
    by its command line naming run_dir; a process forked from one of them (a data loader worker)
    is not a task."""
    found: dict[int, tuple[int, int]] = {}
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().split(b"\0")
            environ = (proc / "environ").read_bytes().split(b"\0")
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone meanwhile
        if b"pretrain.train" in argv and any(str(run_dir).encode() in a for a in argv):
            rank = next((int(v.split(b"=", 1)[1]) for v in environ if v.startswith(b"SLURM_PROCID=")), -1)
            found[int(proc.name)] = (rank, ppid)
    return {rank: pid for pid, (rank, ppid) in found.items() if ppid not in found}


def test_killed_task_restarts_in_the_same_allocation_and_matches(cluster, stdlib_data, straight_13b, tmp_path):
    """SIGKILL of one training task after the first checkpoint (a node or process dying): the
    other ranks notice within the small timeouts, srun ends, slurm/lib.sh runs srun again in the
    same allocation (no requeue), it resumes from `latest` and finishes with the uninterrupted
    job's losses."""
    _, straight_dir, _ = straight_13b
    log = tmp_path / "job.out"
    overrides = [*LAYOUT, "parallel.timeout_minutes=0.5", "train.hang_timeout_minutes=1"]
    began = time.time()
    job = submit(
        [*SBATCH, "--parsable", f"--output={log}", "slurm/pretrain_gpt_13b.sh"],
        job_env(cluster, stdlib_data, tmp_path, overrides),
    )
    metrics, latest = tmp_path / "logs/metrics.jsonl", tmp_path / "checkpoints/latest"
    deadline = time.time() + 300
    # Past the first checkpoint (checkpoint.interval=10), well before step 20.
    wait_for(lambda: metrics.exists() and latest.exists() and max(losses(tmp_path), default=0) >= 12, log, deadline)
    tasks = training_processes(tmp_path)
    assert sorted(tasks) == [0, 1, 2, 3], tasks
    killed_after = max(losses(tmp_path))
    os.kill(tasks[1], signal.SIGKILL)
    killed_at = time.time()
    state = wait_for_end(cluster, job, log, deadline)
    took = time.time() - began
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "0", text[-4000:]
    assert "requeueing" not in text
    assert (
        f"job {job}: restart 1 of 3 in the same allocation after exit code " in text
        and f"resuming from the latest checkpoint in {tmp_path}/checkpoints" in text
    ), text[-4000:]
    assert "restart 2 of 3" not in text
    resumed_at = int(re.search(rf"resumed from {tmp_path}/checkpoints/step_(\d+)", text).group(1))
    assert 10 <= resumed_at <= killed_after
    ours, theirs = losses(tmp_path), losses(straight_dir)
    assert sorted(ours) == list(range(1, 31))
    assert [ours[s] for s in range(resumed_at + 1, 31)] == [theirs[s] for s in range(resumed_at + 1, 31)]
    print(
        f"killed rank 1 after step {killed_after}; resumed from step {resumed_at}; job took {took:.0f} s, "
        f"{time.time() - killed_at:.0f} s of it after the kill"
    )
    assert took < 240


def test_configuration_error_is_not_retried(cluster, stdlib_data, tmp_path):
    """Exit code 2 (a mistake in the config) ends the job at once: no restart, no requeue."""
    log = tmp_path / "job.out"
    began = time.time()
    result = subprocess.run(
        [*SBATCH, "--wait", "--parsable", f"--output={log}", "slurm/pretrain_gpt_13b.sh"],
        cwd=ROOT,
        env=job_env(cluster, stdlib_data, tmp_path, [*LAYOUT, "model.num_layers=0"]),
        capture_output=True,
        text=True,
        timeout=300,
    )
    took = time.time() - began
    text = log.read_text()
    job = job_id(result)
    assert result.returncode != 0, text[-3000:]
    state = job_state(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0" and state["Restarts"] == "0", text[-3000:]
    assert "model.num_layers" in text
    assert f"job {job}: training failed with exit code 2" in text and "not restarting" in text
    assert "restart 1 of" not in text and "requeueing" not in text
    print(f"configuration error: job failed once in {took:.0f} s")


STUB_TRAIN = """#!/usr/bin/env bash
# Stands in for launch/train.sh: on attempt k (PRETRAIN_ATTEMPT) every task does word k of
# STUB_PLAN: exit with that code, `kill` itself with SIGKILL, or `usr1`: wait for SIGUSR1 and
# exit 75 then. A requeued job (SLURM_RESTART_COUNT > 0) exits 0.
set -u
[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ] && exit 0
read -r -a plan <<< "$STUB_PLAN"
what=${plan[$PRETRAIN_ATTEMPT]}
echo "stub attempt $PRETRAIN_ATTEMPT, master port ${MASTER_PORT:-derived}: $what"
case $what in
    kill) kill -KILL $$ ;;
    usr1) trap 'echo "stub: SIGUSR1"; exit 75' USR1
          touch "$STUB_READY.$SLURM_PROCID"
          for _ in $(seq 1 600); do sleep 0.1; done
          exit 1 ;;
    *) exit "$what" ;;
esac
"""


def stub_job(cluster, tmp_path, plan: str, **env) -> tuple[list[str], dict]:
    """slurm/pretrain_gpt_13b.sh with this checkout's slurm/lib.sh around a stub training task."""
    stub = tmp_path / "root"
    (stub / "launch").mkdir(parents=True)
    (stub / "slurm").mkdir()
    shutil.copy(ROOT / "slurm/lib.sh", stub / "slurm/lib.sh")
    (stub / "launch/train.sh").write_text(STUB_TRAIN)
    (stub / "launch/train.sh").chmod(0o755)
    return (
        [*SBATCH, "--parsable", f"--output={tmp_path}/job.out", str(ROOT / "slurm/pretrain_gpt_13b.sh")],
        {
            **cluster,
            "PRETRAIN_ROOT": str(stub),
            "PRETRAIN_RUN_DIR": str(tmp_path / "run"),
            "STUB_PLAN": plan,
            "STUB_READY": str(tmp_path / "ready"),
            **env,
        },
    )


def test_restart_after_each_fault_with_new_port_and_signals_still_passed_on(cluster, tmp_path):
    """A killed task (137), then a hang exit (76): two restarts in the allocation, each on its own
    rendezvous port; SIGUSR1 during the third attempt still reaches the tasks, which exit 75,
    and the job requeues (a stop, not a restart) and completes."""
    job = submit(*stub_job(cluster, tmp_path, "kill 76 usr1"), cwd=tmp_path)
    log = tmp_path / "job.out"
    deadline = time.time() + 120
    wait_for(lambda: len(list(tmp_path.glob("ready.*"))) >= 4, log, deadline)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    state = wait_for_end(cluster, job, log, deadline)
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["Restarts"] == "1", text[-3000:]
    assert (
        f"job {job}: restart 1 of 3 in the same allocation after exit code 137 (a task killed by signal 9 "
        f"(KILL)), resuming from the latest checkpoint in {tmp_path}/run/checkpoints"
    ) in text, text
    assert f"job {job}: restart 2 of 3 in the same allocation after exit code 76 (a hang" in text
    assert "restart 3 of 3" not in text
    assert "batch shell: SIGUSR1, passing it to the training tasks" in text and "stub: SIGUSR1" in text
    assert f"requeueing job {job}" in text
    ports = {int(m.group(1)): m.group(2) for m in re.finditer(r"stub attempt (\d), master port (\w+)", text)}
    assert ports[0] == "derived" and len({ports[0], ports[1], ports[2]}) == 3, ports


@pytest.mark.parametrize(
    "plan, env, code",
    [("77", {}, 77), ("78", {}, 78), ("1 1 0", {"PRETRAIN_MAX_RESTARTS": "1"}, 1)],
    ids=["diverged", "saves-failing", "restarts-used-up"],
)
def test_exit_code_not_retried_or_restarts_used_up(cluster, tmp_path, plan, env, code):
    command, job_env_ = stub_job(cluster, tmp_path, plan, **env)
    result = subprocess.run(
        [*command[:1], "--wait", *command[1:]], cwd=tmp_path, env=job_env_, capture_output=True, text=True, timeout=120
    )
    text = (tmp_path / "job.out").read_text()
    job = job_id(result)
    state = job_state(cluster, job)
    assert state["JobState"] == "FAILED" and state["ExitCode"] == f"{code}:0" and state["Restarts"] == "0", text
    if code == 1:
        assert "restart 1 of 1" in text and "restart 2" not in text
        assert (
            f"job {job}: training failed with exit code 1 (a crash or a timed-out collective) and all 1 "
            "restarts (PRETRAIN_MAX_RESTARTS) are used up" in text
        )
    else:
        assert "restart 1" not in text and f"training failed with exit code {code}" in text
        assert "not restarting, a person must look" in text


def test_preprocess_job_array_over_shards(cluster, stdlib_data, tmp_path):
    """slurm/preprocess_data.sh as a 2-task job array over 3 input shards (task 0 takes shards
    0 and 2): every shard becomes its own .bin/.idx with the tokens of its documents."""
    from pretrain.data.indexed import IndexedDataset

    corpus = Path(stdlib_data["prefix"]).parent / "corpus.jsonl"
    lines = corpus.read_text().splitlines()[:90]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"part{i}.jsonl").write_text("\n".join(lines[i * 30 : (i + 1) * 30]) + "\n")
    env = {
        **cluster,
        "PRETRAIN_INPUTS": str(shards / "*.jsonl"),
        "PRETRAIN_OUTPUT_DIR": str(tmp_path / "out"),
        "PRETRAIN_TOKENIZER": stdlib_data["tokenizer"],
        "PYTHON": sys.executable,
    }
    result = subprocess.run(
        [
            "sbatch",
            "--wait",
            "--array=0-1",
            "--cpus-per-task=1",
            f"--output={tmp_path}/pre-%A_%a.out",
            "slurm/preprocess_data.sh",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    logs = "".join(p.read_text() for p in tmp_path.glob("pre-*.out"))
    assert result.returncode == 0, result.stderr + logs
    for i in range(3):
        dataset = IndexedDataset(str(tmp_path / f"out/part{i}_text_document"))
        assert len(dataset) == 30  # documents
    assert "shard 1 of 3" in logs and "shard 3 of 3" in logs


# -- the other launchers -----------------------------------------------------------------------


def local_run(command: list[str], stdlib_data, run_dir) -> subprocess.CompletedProcess:
    overrides = [
        *TINY,
        "parallel.tensor=2",
        "train.steps=4",
        f"data.path={stdlib_data['prefix']}",
        f"data.tokenizer={stdlib_data['tokenizer']}",
        f"logging.dir={run_dir}/logs",
        f"checkpoint.dir={run_dir}/ckpt",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run(
        [*command, "configs/gpt_tiny.yaml", *overrides], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )


def test_mpirun_and_torchrun_start_the_same_training(stdlib_data, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "Open MPI is not installed: run the suite through tests/run.sh"
    by_mpi = local_run(
        [
            mpirun,
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "2",
            "-x",
            "PYTHONPATH",
            "-x",
            "PYTHON",
            "-x",
            "OMP_NUM_THREADS",
            "launch/train.sh",
        ],
        stdlib_data,
        tmp_path / "mpi",
    )
    assert by_mpi.returncode == 0, by_mpi.stdout[-2000:] + by_mpi.stderr[-3000:]
    assert "ranks 0-1 of 2 (mpirun, gloo, cpu" in by_mpi.stdout
    by_torchrun = local_run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "pretrain.train"],
        stdlib_data,
        tmp_path / "torchrun",
    )
    assert by_torchrun.returncode == 0, by_torchrun.stderr[-3000:]
    assert "ranks 0-1 of 2 (torchrun, gloo, cpu" in by_torchrun.stdout
    assert losses(tmp_path / "mpi") == losses(tmp_path / "torchrun")
    assert sorted(losses(tmp_path / "mpi")) == [1, 2, 3, 4]


FAKE_NVIDIA_SMI = """#!/bin/bash
echo "NVIDIA H100 80GB HBM3, 81559"
"""


TP1 = ["parallel.tensor=1", "parallel.sequence_parallel=false"]


@pytest.mark.parametrize("layout, fits", [([], True), (TP1, False)], ids=["tp4-fits", "tp1-too-big"])
def test_preflight_refuses_a_layout_that_cannot_fit_before_any_task_starts(cluster, tmp_path, layout, fits):
    """On GPU nodes (an nvidia-smi that reports H100s stands in) slurm/lib.sh runs the planner on
    the job's GPU count first: the 13B model on the job's 4 GPUs fits at TP 4 (ZeRO-1 over one
    replica), and at TP 1 it does not, so that job ends with exit code 2, the breakdown and a
    layout that fits, and no training task ever starts."""
    command, env = stub_job(
        cluster,
        tmp_path,
        "0",
        PYTHON=sys.executable,
        PRETRAIN_CONFIG=str(ROOT / "configs/gpt_13b.yaml"),
        PRETRAIN_OVERRIDES=" ".join(layout),
    )
    for shared in ("tools", "pretrain", "configs"):  # the planner, from this checkout
        (tmp_path / "root" / shared).symlink_to(ROOT / shared)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text(FAKE_NVIDIA_SMI)
    (bin_dir / "nvidia-smi").chmod(0o755)
    env["PATH"] = f"{bin_dir}:{env['PATH']}"
    result = subprocess.run(
        [*command[:1], "--wait", *command[1:]], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    text = (tmp_path / "job.out").read_text()
    state = job_state(cluster, job_id(result))
    assert "preflight: 4 x NVIDIA H100 80GB HBM3 (81559 MiB)" in text, text
    if fits:
        assert state["JobState"] == "COMPLETED" and "fits" in text and "stub attempt 0" in text, text
    else:
        assert state["JobState"] == "FAILED" and state["ExitCode"] == "2:0", text
        assert "DOES NOT FIT" in text and "error: preflight: the layout does not fit 4 x NVIDIA H100" in text
        assert "parallel.tensor=" in text.split("fastest layouts that fit")[1]
        assert "stub attempt" not in text and not list(tmp_path.glob("ready.*"))
