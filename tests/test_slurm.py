"""SLURM launch: the rendered script, per-node commands under a fake srun, preemption with
requeue and resume, and a real 2-machine DeepSpeed launch on one host."""

import json
import os
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, accelerate_launch, wait_for_metric_lines
from test_train import FAST  # the fast training settings, one list

from pg_train.slurm import main as slurm_main
from pg_train.slurm import render

FAKE_SRUN = """#!/bin/bash
# Fake srun: run the command once per node (sequentially) with that node's SLURM_NODEID.
overlap=0; nodes=${SLURM_JOB_NUM_NODES:-1}
while [[ "$1" == --* ]]; do
  case "$1" in --overlap) overlap=1 ;; --nodes=*) nodes=${1#--nodes=} ;; esac
  shift
done
echo "srun overlap=$overlap nodes=$nodes $*" >> "$CAPTURE/srun.log"
status=0
for ((node = 0; node < nodes; node++)); do
  SLURM_NODEID=$node SLURM_PROCID=$node "$@" || status=$?
done
exit $status
"""
FAKE_SCONTROL = """#!/bin/bash
case "$1 $2" in
  "show hostnames") printf 'node01\\nnode02\\nnode03\\n' | head -n "${SLURM_JOB_NUM_NODES:-2}" ;;
  requeue*) echo "requeue $2" >> "$CAPTURE/requeue.log" ;;
esac
"""
FAKE_ACCELERATE = """#!/bin/bash
echo "$@" > "$CAPTURE/node$SLURM_NODEID.txt"
"""


def fake_bin(tmp_path, **scripts) -> Path:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in scripts.items():
        path = bin_dir / name
        path.write_text(text)
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    return bin_dir


def slurm_env(tmp_path, bin_dir, nodes, **extra):
    env = {
        **os.environ,
        "PATH": f"{bin_dir}:{Path(sys.prefix) / 'bin'}:{os.environ['PATH']}",
        "CAPTURE": str(tmp_path),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_JOB_NODELIST": f"node[01-0{nodes}]",
        "SLURM_JOB_ID": "4242",
        "SLURM_SUBMIT_DIR": str(REPO),
    }
    env.update(extra)
    return env


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_render_two_nodes_of_eight_gpus(capsys):
    assert (
        slurm_main(
            [
                "submit",
                "--nodes",
                "2",
                "--gpus-per-node",
                "8",
                "--partition",
                "gpu",
                "--time",
                "12:00:00",
                "--dry-run",
                "--",
                "--config",
                "my run.yaml",
                "optim.lr=2e-5",
            ]
        )
        == 0
    )
    script = capsys.readouterr().out
    for line in (
        "#SBATCH --nodes=2",
        "#SBATCH --gpus-per-node=8",
        "#SBATCH --ntasks-per-node=1",
        "#SBATCH --partition=gpu",
        "#SBATCH --time=12:00:00",
        "#SBATCH --requeue",
        "#SBATCH --signal=B:USR1@300",
        "export GPUS_PER_NODE=8",
        "set -- --config 'my run.yaml' optim.lr=2e-5",
    ):
        assert line in script.splitlines(), line
    assert "WORLD_SIZE=$((NNODES * GPUS_PER_NODE))" in script and "--machine_rank \\$SLURM_NODEID" in script
    assert "--deepspeed_multinode_launcher standard" in script and "launch/train.py --resume auto" in script
    with pytest.raises(ValueError, match="--time"):
        render(nodes=1, gpus_per_node=1, train_args=[], time="tomorrow")


def test_srun_gives_each_node_its_machine_rank_and_the_same_main_address(tmp_path):
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL, accelerate=FAKE_ACCELERATE)
    env = slurm_env(tmp_path, bin_dir, nodes=2, GPUS_PER_NODE="8", ACCELERATE=str(bin_dir / "accelerate"))
    proc = subprocess.run(
        ["bash", "launch/slurm/train.sbatch", "--config", "my.yaml", "optim.lr=2e-5"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    commands = [(tmp_path / f"node{n}.txt").read_text().split() for n in (0, 1)]
    for rank, args in enumerate(commands):
        value = lambda flag: args[args.index(flag) + 1]  # noqa: E731
        assert value("--machine_rank") == str(rank)
        assert value("--main_process_ip") == "node01"
        assert value("--num_machines") == "2" and value("--num_processes") == "16"
        assert value("--deepspeed_multinode_launcher") == "standard"
        assert args[args.index("launch/train.py") :] == [
            "launch/train.py",
            "--resume",
            "auto",
            "--config",
            "my.yaml",
            "optim.lr=2e-5",
        ]
    assert not (tmp_path / "requeue.log").exists()


@pytest.mark.slow
def test_preempt_usr1_checkpoints_requeues_and_the_requeued_run_resumes(tmp_path):
    bin_dir = fake_bin(tmp_path, srun=FAKE_SRUN, scontrol=FAKE_SCONTROL)
    out = tmp_path / "run"
    env = slurm_env(
        tmp_path,
        bin_dir,
        nodes=1,
        GPUS_PER_NODE="2",
        MAIN_PORT=str(free_port()),
        ACCELERATE_CONFIG="accelerate_configs/cpu_zero2_2proc.yaml",
    )
    args = ["--output-dir", str(out), "--max-steps", "500", "save_every=1000", *FAST]
    proc = subprocess.Popen(
        ["bash", "launch/slurm/train.sbatch", *args],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for_metric_lines(out / "metrics.jsonl", 2, proc)
    proc.send_signal(signal.SIGUSR1)
    log, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, log[-4000:]
    assert (tmp_path / "requeue.log").read_text().split() == ["requeue", "4242"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    stopped = lines[-1]["step"]
    assert stopped < 500 and (out / "checkpoints" / f"step-{stopped:08d}").is_dir()
    assert "requeueing job 4242" in log

    # SLURM starts the script again after the requeue; it resumes at the next step.
    env["SLURM_RESTART_COUNT"] = "1"
    again = subprocess.run(
        ["bash", "launch/slurm/train.sbatch", *args, "--max-steps", str(stopped + 2)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert again.returncode == 0, again.stdout[-4000:] + again.stderr[-4000:]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(1, stopped + 3))


@pytest.mark.slow
def test_two_machines_on_one_host_match_the_single_node_run(tmp_path):
    overrides = [*FAST, "max_steps=3"]
    accelerate_launch(
        "tests/dist/train_probe.py", str(tmp_path / "single"), f"output_dir={tmp_path / 'single_run'}", *overrides
    )
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        cmd = [
            str(Path(sys.prefix) / "bin" / "accelerate"),
            "launch",
            "--config_file",
            "accelerate_configs/cpu_zero2_2proc.yaml",
            "--num_machines",
            "2",
            "--num_processes",
            "2",
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--deepspeed_multinode_launcher",
            "standard",
            "tests/dist/train_probe.py",
            str(tmp_path / "multi"),
            f"output_dir={tmp_path / 'multi_run'}",
            *overrides,
        ]
        procs.append(subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    single = [json.loads((tmp_path / f"single.rank{r}.json").read_text()) for r in (0, 1)]
    multi = [json.loads((tmp_path / f"multi.rank{r}.json").read_text()) for r in (0, 1)]
    assert multi[0]["trainable_bytes_hash"] == multi[1]["trainable_bytes_hash"]  # the two machines agree bitwise
    assert [m["consumed"] for m in multi] == [s["consumed"] for s in single]
    assert multi[0]["losses"] == single[0]["losses"]
    # Against the single-node run: equal up to the order of the all-reduce's float sums (gloo over
    # TCP between machines vs DeepSpeed's shared-memory reduction within one node) — far below
    # the size of the training update itself, which unsynchronised replicas would differ by.
    import torch

    from pg_train.model import build_model

    initial = {n: p.detach() for n, p in build_model("tiny", seed=0).named_parameters() if p.requires_grad}
    two = torch.load(tmp_path / "multi.rank0.weights.pt")
    one = torch.load(tmp_path / "single.rank0.weights.pt")
    difference = sum(float((two[n] - one[n]).pow(2).sum()) for n in one) ** 0.5
    update = sum(float((one[n] - initial[n]).pow(2).sum()) for n in one) ** 0.5
    assert update > 0 and difference <= 1e-3 * update, (difference, update)
