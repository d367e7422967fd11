"""Two simulated nodes of one process each on loopback (torchrun, gloo on CPU): global rank
1 has local rank 0 on its node, which a single node never shows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from test_train import TINY, VAL_SMALL, _free_port, _train_losses

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240


def _run_two_nodes(project: Path, root: Path, local_dirs: list[Path] | None, out: Path) -> None:
    """``python -m concept.train`` under ``torchrun --nnodes=2``, node 0 and node 1 on
    127.0.0.1; both killed (their whole process groups) when one fails or on timeout."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    env.update(
        PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]),
        GLOO_SOCKET_IFNAME="lo",  # gloo's pair sockets on loopback only
        OMP_NUM_THREADS="1",
    )
    procs = []
    for node in (0, 1):
        local = [f"PATH.LOCAL_DIR={local_dirs[node]}"] if local_dirs else []
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nnodes=2",
            "--nproc-per-node=1",
            f"--node-rank={node}",
            "--master-addr=127.0.0.1",
            f"--master-port={port}",
            "-m",
            "concept.train",
            f"PATH.PROJECT_PATH={project}",
            f"PATH.CHECKPOINT_ROOT={root}",
            *local,
            *TINY,
            *VAL_SMALL,
            "model.training.num_nodes=2",
            "model.training.devices=1",
            "model.training.max_steps=3",
            "model.training.log_every_n_steps=1",
            "model.training.val_check_interval=1000",
            "wandb.run_name=multinode",
        ]
        log = open(out / f"node{node}.log", "w")  # noqa: SIM115 (closed below)
        procs.append(
            (
                subprocess.Popen(
                    cmd, cwd=out, env=env, stdout=log, stderr=log, start_new_session=True
                ),
                log,
            )
        )
    try:
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            log.close()
    for node, (proc, _) in enumerate(procs):
        text = (out / f"node{node}.log").read_text()
        assert proc.returncode == 0, f"node {node} exited {proc.returncode}:\n{text[-4000:]}"


def test_two_nodes_train_with_and_without_local_dir(compiled, tmp_path):
    """With PATH.LOCAL_DIR each node's local rank 0 copies the stores into its own folder;
    without, both read the compiled root. Both runs write one run folder (rank 0's) and
    log the same losses: the same data in the same order."""
    local_dirs = [tmp_path / f"node{n}" / "local" for n in (0, 1)]
    runs = {}
    for name, local in (("local", local_dirs), ("shared", None)):
        root = tmp_path / f"runs_{name}"
        out = tmp_path / f"out_{name}"
        out.mkdir()
        _run_two_nodes(compiled, root, local, out)
        assert sorted(p.name for p in root.iterdir()) == ["multinode"]
        run = root / "multinode"
        assert sorted(p.name for p in run.rglob("metrics.csv")) == ["metrics.csv"]
        assert (run / "config.yaml").is_file() and (run / "latest" / "last.ckpt").exists()
        runs[name] = _train_losses(run)
    human = sorted(p.name for p in (compiled / "compiled" / "synth_cxg").glob("hs_*.zarr"))
    for local in local_dirs:  # a full copy on each node, no temporary left
        assert sorted(p.name for p in (local / "synth_cxg").iterdir()) == human
    assert sorted(runs["local"]) == [0, 1, 2]
    assert runs["local"] == runs["shared"]
