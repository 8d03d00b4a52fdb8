"""Two real JAX processes on this machine (a localhost coordinator, CPU collectives, 4 simulated
devices each) train the tiny preset with `distributed=True`, stop with a checkpoint, resume in
new processes, and end where one process with 8 devices ends."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

from spellm_jax import trainer
from spellm_jax.checkpointing import TrainCheckpoints
from spellm_jax.data import sources
from tests.test_distill import tiny_config

REPO = Path(__file__).resolve().parents[1]
OVERRIDES = {"train.steps": 8, "train.eval_every": 8, "checkpoint.save_every": 4}
DRIVER = """
import json, sys
from spellm_jax import trainer
from tests.test_distill import tiny_config
overrides = json.loads(sys.argv[1])
config = tiny_config(**overrides)
trainer.run(config, sys.argv[2], stop_after=int(sys.argv[3]) or None)
import jax
assert (jax.process_count(), jax.local_device_count(), jax.device_count()) == (2, 4, 8)
print("two processes of 4 devices: done")
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def run_two_processes(workdir: Path, stop_after: int) -> None:
    import json

    port, processes = free_port(), []
    for process_id in range(2):
        env = os.environ | {
            "XLA_FLAGS": os.environ.get("XLA_FLAGS", "").replace(
                "--xla_force_host_platform_device_count=8", "")
            + " --xla_force_host_platform_device_count=4",
            "JAX_PLATFORMS": "cpu", "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
            "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": str(process_id)}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", DRIVER, json.dumps(OVERRIDES | {"distributed": True}),
             str(workdir), str(stop_after)], cwd=REPO, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, text=True))
    outputs = [process.communicate(timeout=600)[0] for process in processes]
    for process, output in zip(processes, outputs, strict=True):
        assert process.returncode == 0, output[-4000:]
        assert "two processes of 4 devices: done" in output


def final_params(workdir: Path, config) -> dict:
    from spellm_jax import runs

    model, _, _ = runs.load_spellm(workdir)
    from flax import nnx

    return {".".join(map(str, path)): np.asarray(value)
            for path, value in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def losses(workdir: Path) -> dict[int, float]:
    from tests.test_train import read_metrics

    return {step: value for (step, key), value in read_metrics(workdir).items() if key == "loss"}


def test_two_processes_train_resume_and_match_one(tmp_path):
    sources.read_documents(["shakespeare"], "train")  # prepared once, before two readers race
    config = tiny_config(**OVERRIDES)
    reference = tmp_path / "one_process"
    trainer.run(config, reference)
    workdir = tmp_path / "two_processes"
    run_two_processes(workdir, stop_after=4)
    assert TrainCheckpoints(workdir, 3, 4).latest_step() == 4
    run_two_processes(workdir, stop_after=0)  # resumes from step 4
    assert TrainCheckpoints(workdir, 3, 4).latest_step() == 8
    want, got = losses(reference), losses(workdir)
    assert want.keys() == got.keys() and len(want) >= 2
    np.testing.assert_allclose([got[s] for s in want], list(want.values()), rtol=1e-5)
    expected, actual = final_params(reference, config), final_params(workdir, config)
    assert expected.keys() == actual.keys()
    for name in expected:
        np.testing.assert_allclose(actual[name], expected[name], rtol=1e-5, atol=1e-6,
                                   err_msg=name)
