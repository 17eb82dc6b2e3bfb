"""The sbatch scripts users submit, run on a real SLURM cluster (tests/slurm/cluster_up.sh: two
fake nodes on this machine), with the tiny-model overrides every script accepts; and the same
training started by mpirun and torchrun."""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SLURM_DIR = Path(os.environ.get("PRETRAIN_SLURM_DIR", "/tmp/pretrain-slurm"))
SCRIPTS = sorted((ROOT / "slurm").glob("*.sh")) + sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "bench/gpu.sh"]
TINY = ["model.vocab_size=2000", "model.num_layers=2", "model.hidden_size=64", "model.num_heads=4",
        "model.seq_length=64", "model.dropout=0.0", "train.micro_batch_size=2", "train.global_batch_size=8",
        "train.log_interval=1", "train.eval_interval=0", "logging.tensorboard=false", "logging.peak_tflops=1"]


@pytest.fixture(scope="session")
def cluster():
    """The cluster's environment (SLURM_CONF); started here unless tests/run.sh already did."""
    started = not (SLURM_DIR / "started").exists()
    up = subprocess.run(["bash", str(ROOT / "tests/slurm/cluster_up.sh")], capture_output=True, text=True,
                        timeout=600)
    assert up.returncode == 0, up.stdout + up.stderr
    yield {**os.environ, "SLURM_CONF": str(SLURM_DIR / "slurm.conf")}
    if started:
        subprocess.run(["bash", str(ROOT / "tests/slurm/cluster_down.sh")], capture_output=True, timeout=120)


def job_env(cluster, stdlib_data, run_dir, overrides):
    return {**cluster, "PRETRAIN_CONFIG": "configs/gpt_tiny.yaml", "PRETRAIN_DATA": stdlib_data["prefix"],
            "PRETRAIN_TOKENIZER": stdlib_data["tokenizer"], "PRETRAIN_RUN_DIR": str(run_dir),
            "PRETRAIN_OVERRIDES": " ".join(TINY + overrides), "PYTHON": sys.executable}


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


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_scripts_pass_bash_n_and_shellcheck(script):
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    if shutil.which("shellcheck") is None:  # tests/run.sh installs it (Debian's shellcheck)
        pytest.fail("shellcheck is not installed: run the suite through tests/run.sh")
    check = subprocess.run(["shellcheck", "-x", str(script.relative_to(ROOT))], cwd=ROOT, capture_output=True,
                           text=True)
    assert check.returncode == 0, check.stdout


@pytest.fixture(scope="module")
def straight_13b(cluster, stdlib_data, tmp_path_factory):
    """`sbatch --wait slurm/pretrain_gpt_13b.sh` on 2 nodes x 2 CPU tasks: TP 2 x DP 2, ZeRO-1."""
    run_dir = tmp_path_factory.mktemp("gpt13b_straight")
    log = run_dir / "job.out"
    result = subprocess.run([*SBATCH, "--wait", f"--output={log}", "slurm/pretrain_gpt_13b.sh"], cwd=ROOT,
                            env=job_env(cluster, stdlib_data, run_dir, LAYOUT), capture_output=True, text=True,
                            timeout=900)
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
    submitted = subprocess.run([*SBATCH, "--parsable", f"--output={log}", "slurm/pretrain_gpt_13b.sh"], cwd=ROOT,
                               env=job_env(cluster, stdlib_data, tmp_path, LAYOUT), capture_output=True, text=True,
                               timeout=60)
    assert submitted.returncode == 0, submitted.stderr
    job = submitted.stdout.strip().split(";")[0]
    metrics = tmp_path / "logs/metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.exists() and len(losses(tmp_path)) >= 4):  # a few steps in, well before step 30
        assert time.time() < deadline, log.read_text()[-3000:] if log.exists() else "job never started"
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], env=cluster, check=True)
    while True:
        state = job_state(cluster, job)
        if state.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL"):
            break
        assert time.time() < deadline, f"job {job} still {state.get('JobState')}: {log.read_text()[-3000:]}"
        time.sleep(1)
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


def test_preprocess_job_array_over_shards(cluster, stdlib_data, tmp_path):
    """slurm/preprocess_data.sh as a 2-task job array over 3 input shards (task 0 takes shards
    0 and 2): every shard becomes its own .bin/.idx with the tokens of its documents."""
    from pretrain.data.indexed import IndexedDataset

    corpus = Path(stdlib_data["prefix"]).parent / "corpus.jsonl"
    lines = corpus.read_text().splitlines()[:90]
    shards = tmp_path / "shards"
    shards.mkdir()
    for i in range(3):
        (shards / f"part{i}.jsonl").write_text("\n".join(lines[i * 30:(i + 1) * 30]) + "\n")
    env = {**cluster, "PRETRAIN_INPUTS": str(shards / "*.jsonl"), "PRETRAIN_OUTPUT_DIR": str(tmp_path / "out"),
           "PRETRAIN_TOKENIZER": stdlib_data["tokenizer"], "PYTHON": sys.executable}
    result = subprocess.run(["sbatch", "--wait", "--array=0-1", "--cpus-per-task=1", f"--output={tmp_path}/pre-%A_%a.out",
                             "slurm/preprocess_data.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=600)
    logs = "".join(p.read_text() for p in tmp_path.glob("pre-*.out"))
    assert result.returncode == 0, result.stderr + logs
    for i in range(3):
        dataset = IndexedDataset(str(tmp_path / f"out/part{i}_text_document"))
        assert len(dataset) == 30  # documents
    assert "shard 1 of 3" in logs and "shard 3 of 3" in logs


# -- the other launchers -----------------------------------------------------------------------


def local_run(command: list[str], stdlib_data, run_dir) -> subprocess.CompletedProcess:
    overrides = [*TINY, "parallel.tensor=2", "train.steps=4", f"data.path={stdlib_data['prefix']}",
                 f"data.tokenizer={stdlib_data['tokenizer']}", f"logging.dir={run_dir}/logs", f"checkpoint.dir={run_dir}/ckpt"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    return subprocess.run([*command, "configs/gpt_tiny.yaml", *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def test_mpirun_and_torchrun_start_the_same_training(stdlib_data, tmp_path):
    mpirun = shutil.which("mpirun")
    assert mpirun, "Open MPI is not installed: run the suite through tests/run.sh"
    by_mpi = local_run([mpirun, "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "PYTHONPATH",
                        "-x", "PYTHON", "-x", "OMP_NUM_THREADS", "launch/train.sh"], stdlib_data, tmp_path / "mpi")
    assert by_mpi.returncode == 0, by_mpi.stdout[-2000:] + by_mpi.stderr[-3000:]
    assert "ranks 0-1 of 2 (mpirun, gloo, cpu" in by_mpi.stdout
    by_torchrun = local_run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m",
                             "pretrain.train"], stdlib_data, tmp_path / "torchrun")
    assert by_torchrun.returncode == 0, by_torchrun.stderr[-3000:]
    assert "ranks 0-1 of 2 (torchrun, gloo, cpu" in by_torchrun.stdout
    assert losses(tmp_path / "mpi") == losses(tmp_path / "torchrun")
    assert sorted(losses(tmp_path / "mpi")) == [1, 2, 3, 4]
