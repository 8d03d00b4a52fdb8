"""launch/tpu_vm.py builds the right gcloud commands; launch/run_on_tpu.sh parses and runs."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from launch import tpu_vm
from launch.tpu_vm import TpuSlice

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "launch" / "run_on_tpu.sh"
V4 = TpuSlice("spellm-v4", "us-central2-b", "v4-8")
V5E = TpuSlice("spellm-v5e", "us-west4-a", "v5litepod-16", project="my-proj")
V5E_QUEUED = TpuSlice("spellm-v5e", "us-west4-a", "v5litepod-16", project="my-proj", spot=True,
                      queued=True)
TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]
V4_AT = ["--zone=us-central2-b"]
V5E_AT = ["--zone=us-west4-a", "--project=my-proj"]
SOURCES = ["/src/pyproject.toml", "/src/requirements.txt", "/src/configs", "/src/spellm_jax",
           "/src/launch"]
CLEAN = ("--command=mkdir -p spellm_jax && cd spellm_jax && rm -rf -- pyproject.toml requirements.txt "
         "configs spellm_jax launch")
SETUP = "--command=cd spellm_jax && bash launch/run_on_tpu.sh --setup"
V5E_ARGS = ["--name=spellm-v5e", "--zone=us-west4-a", "--accelerator_type=v5litepod-16",
            "--project=my-proj"]


def never_run(*args, **kwargs):
    raise AssertionError(f"a command ran: {args}")


def command_of(argv: list[str]) -> str:
    """The remote shell command of a `tpu-vm ssh` argv."""
    (command,) = [arg.removeprefix("--command=") for arg in argv if arg.startswith("--command=")]
    return command


@pytest.mark.parametrize("accelerator_type, workers", [
    ("v4-8", 1), ("v4-16", 2), ("v4-32", 4), ("v4-128", 16),
    ("v5litepod-1", 1), ("v5litepod-4", 1), ("v5litepod-8", 1), ("v5litepod-16", 4),
    ("v5litepod-256", 64), ("v5p-8", 1), ("v5p-16", 2), ("v5p-128", 16), ("v6e-8", 1),
    ("v6e-16", 4), ("v6e-64", 16)])
def test_num_workers(accelerator_type, workers):
    tpu = TpuSlice("t", "z", accelerator_type)
    assert tpu.num_workers == tpu_vm.num_workers(accelerator_type) == workers
    assert tpu.is_multi_host == (workers > 1)


@pytest.mark.parametrize("accelerator_type", ["v3-8", "v5e-16", "v4", "v4-x", "v4-0", "v4-12",
                                              "v4-7", "v5p-12", "tpu"])
def test_unknown_accelerator_type_is_refused(accelerator_type):
    with pytest.raises(ValueError, match="unsupported accelerator type") as error:
        TpuSlice("t", "z", accelerator_type)
    assert repr(accelerator_type) in str(error.value)
    assert all(f"{family}-N" in str(error.value) for family in ("v4", "v5litepod", "v5p", "v6e"))


def test_runtime_versions():
    assert [TpuSlice("t", "z", kind).runtime_version for kind in ("v4-8", "v5litepod-16", "v5p-8",
                                                                  "v6e-8")] == [
        "tpu-ubuntu2204-base", "v2-alpha-tpuv5-lite", "v2-alpha-tpuv5", "v2-alpha-tpuv6e"]
    assert TpuSlice("t", "z", "v4-8", runtime_version="custom").runtime_version == "custom"


def test_single_host_v4_commands():
    assert tpu_vm.create_command(V4) == [*TPU_VM, "create", "spellm-v4", *V4_AT,
                                         "--accelerator-type=v4-8", "--version=tpu-ubuntu2204-base"]
    assert tpu_vm.clean_remote_command(V4) == [*TPU_VM, "ssh", "spellm-v4", *V4_AT, "--worker=all",
                                               CLEAN]
    assert tpu_vm.copy_repo_command(V4, "/src", "spellm_jax") == [
        *TPU_VM, "scp", "--recurse", *SOURCES, "spellm-v4:spellm_jax", *V4_AT, "--worker=all"]
    assert tpu_vm.setup_command(V4) == [*TPU_VM, "ssh", "spellm-v4", *V4_AT, "--worker=all", SETUP]
    assert tpu_vm.train_command(V4, "smollm2", "workdir/run", {"train.steps": "100"}) == [
        *TPU_VM, "ssh", "spellm-v4", *V4_AT, "--worker=all",
        "--command=cd spellm_jax && bash launch/run_on_tpu.sh smollm2 workdir/run "
        "--config.train.steps=100"]
    assert tpu_vm.logs_command(V4) == [*TPU_VM, "ssh", "spellm-v4", *V4_AT, "--worker=0",
                                       "--command=tail -n 100 -F spellm_train.log"]
    assert tpu_vm.stop_command(V4) == [*TPU_VM, "stop", "spellm-v4", *V4_AT]
    assert tpu_vm.delete_command(V4) == [*TPU_VM, "delete", "spellm-v4", *V4_AT, "--quiet"]


def test_multi_host_v5e_commands():
    assert tpu_vm.create_command(V5E) == [*TPU_VM, "create", "spellm-v5e", *V5E_AT,
                                          "--accelerator-type=v5litepod-16",
                                          "--version=v2-alpha-tpuv5-lite"]
    assert tpu_vm.create_command(V5E_QUEUED) == [
        *QUEUED, "create", "spellm-v5e", "--node-id=spellm-v5e", *V5E_AT,
        "--accelerator-type=v5litepod-16", "--runtime-version=v2-alpha-tpuv5-lite", "--spot"]
    assert tpu_vm.queued_state_command(V5E_QUEUED) == [
        *QUEUED, "describe", "spellm-v5e", *V5E_AT, "--format=value(state.state)"]
    assert tpu_vm.clean_remote_command(V5E) == [*TPU_VM, "ssh", "spellm-v5e", *V5E_AT, "--worker=all",
                                                CLEAN]
    assert tpu_vm.copy_repo_command(V5E, "/src") == [
        *TPU_VM, "scp", "--recurse", *SOURCES, "spellm-v5e:spellm_jax", *V5E_AT, "--worker=all"]
    assert tpu_vm.setup_command(V5E) == [*TPU_VM, "ssh", "spellm-v5e", *V5E_AT, "--worker=all", SETUP]
    assert tpu_vm.train_command(V5E, "llama3_1b", "gs://bucket/run", {}) == [
        *TPU_VM, "ssh", "spellm-v5e", *V5E_AT, "--worker=all",
        "--command=cd spellm_jax && bash launch/run_on_tpu.sh llama3_1b gs://bucket/run"]
    assert tpu_vm.train_command(V5E, "llama3_1b", "gs://bucket/run", detach=True)[-1] == (
        "--command=cd spellm_jax && nohup bash launch/run_on_tpu.sh llama3_1b gs://bucket/run "
        "> /dev/null 2>&1 < /dev/null &")
    assert tpu_vm.logs_command(V5E, lines=20, follow=False) == [
        *TPU_VM, "ssh", "spellm-v5e", *V5E_AT, "--worker=0", "--command=tail -n 20 spellm_train.log"]
    assert tpu_vm.stop_command(V5E) == [*TPU_VM, "stop", "spellm-v5e", *V5E_AT]
    assert tpu_vm.delete_command(V5E) == [*TPU_VM, "delete", "spellm-v5e", *V5E_AT, "--quiet"]
    assert tpu_vm.delete_command(V5E_QUEUED) == [*QUEUED, "delete", "spellm-v5e", *V5E_AT, "--force",
                                                 "--quiet"]


def test_every_multi_host_worker_command_targets_all_workers():
    args = tpu_vm.build_parser().parse_args(
        ["up", *V5E_ARGS, "--queued", "--preset=llama3_1b", "--workdir=gs://b/r"])
    steps = tpu_vm.plan("up", args)
    worker_commands = [step for step in steps if isinstance(step, list)
                       and step[:5] in ([*TPU_VM, "ssh"], [*TPU_VM, "scp"])]
    assert len(worker_commands) == 4  # clean, copy, setup, train
    assert all("--worker=all" in step for step in worker_commands)
    assert isinstance(steps[2], tpu_vm.WaitUntilActive)  # after the compile check and create


def test_hf_token_is_copied_to_every_worker():
    args = tpu_vm.build_parser().parse_args(["copy", *V5E_ARGS, "--hf_token_file=/home/me/token"])
    assert tpu_vm.plan("copy", args)[2:] == [
        [*TPU_VM, "ssh", "spellm-v5e", *V5E_AT, "--worker=all", "--command=mkdir -p .cache/huggingface"],
        [*TPU_VM, "scp", "/home/me/token", "spellm-v5e:.cache/huggingface/token", *V5E_AT, "--worker=all"]]


def test_train_overrides_are_shell_quoted():
    overrides = {"teacher": "my org/model name", "train.steps": "10; rm -rf ~", "data.corpora": "('a',)"}
    words = shlex.split(command_of(tpu_vm.train_command(V5E, "llama3_8b", "gs://b/r w", overrides)))
    assert words == ["cd", "spellm_jax", "&&", "bash", "launch/run_on_tpu.sh", "llama3_8b", "gs://b/r w",
                     "--config.teacher=my org/model name", "--config.train.steps=10; rm -rf ~",
                     "--config.data.corpora=('a',)"]


def test_multi_host_refuses_a_local_workdir(capsys):
    with pytest.raises(ValueError, match="gs://"):
        tpu_vm.train_command(V5E, "llama3_1b", "workdir/run", {})
    with pytest.raises(SystemExit) as exit_info:
        tpu_vm.main(["up", *V5E_ARGS, "--preset=llama3_1b", "--workdir=/tmp/run", "--dry_run"],
                    runner=never_run)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "v5litepod-16 has 4 hosts" in err and "'/tmp/run'" in err
    assert "--workdir=gs://YOUR_BUCKET" in err
    tpu_vm.train_command(V4, "smollm2", "workdir/run", {})  # one host: a local workdir is fine


def test_dry_run_prints_and_runs_nothing(capsys):
    code = tpu_vm.main(["up", *V5E_ARGS, "--spot", "--queued", "--preset=llama3_1b",
                        "--workdir=gs://b/r", "--override", "train.steps=5", "--override=teacher=a b",
                        "--local_dir=/src", "--dry_run"], runner=never_run)
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 7
    # First the train step is compiled for the slice here, with the same overrides.
    assert shlex.split(lines[0]) == [
        sys.executable, "-m", "spellm_jax.train", "--config=/src/configs/llama.py:llama3_1b",
        "--compile_only", "--topology=v5litepod-16", "--config.train.steps=5",
        "--config.teacher=a b"]
    assert lines[1] == shlex.join(tpu_vm.create_command(V5E_QUEUED))
    assert lines[2].startswith(shlex.join(tpu_vm.queued_state_command(V5E_QUEUED)) + "  # ")
    assert lines[4] == shlex.join(tpu_vm.copy_repo_command(V5E_QUEUED, "/src"))
    assert shlex.split(lines[6]) == tpu_vm.train_command(
        V5E_QUEUED, "llama3_1b", "gs://b/r", {"train.steps": "5", "teacher": "a b"})


def test_up_without_the_compile_check_starts_by_creating_the_slice():
    args = tpu_vm.build_parser().parse_args(
        ["up", *V5E_ARGS, "--preset=llama3_1b", "--workdir=gs://b/r", "--no_compile_check"])
    steps = tpu_vm.plan("up", args)
    assert steps[0] == tpu_vm.create_command(V5E)
    assert not any("--compile_only" in step for step in steps if isinstance(step, list))


def test_a_failed_compile_check_creates_no_slice():
    ran = []

    def runner(command, check):
        ran.append(command)
        raise subprocess.CalledProcessError(2, command)

    assert tpu_vm.main(["up", *V5E_ARGS, "--preset=llama3_1b", "--workdir=gs://b/r"],
                       runner=runner) == 1
    assert len(ran) == 1 and "--compile_only" in ran[0]


@pytest.mark.parametrize("argv", [
    ["train", *V5E_ARGS, "--workdir=gs://b/r"],  # no --preset
    ["train", *V5E_ARGS, "--preset=tiny", "--workdir=gs://b/r", "--override=novalue"],
    ["logs", "--name=t", "--zone=z", "--accelerator_type=v3-8"],
])
def test_bad_command_lines_exit(argv):
    with pytest.raises(SystemExit) as exit_info:
        tpu_vm.main([*argv, "--dry_run"], runner=never_run)
    assert exit_info.value.code == 2


def test_execute_stops_at_the_first_failure(capsys):
    calls = []

    def runner(command, check):
        assert check
        calls.append(command)
        if len(calls) == 2:
            raise subprocess.CalledProcessError(255, command)
        return subprocess.CompletedProcess(command, 0)

    commands = [tpu_vm.create_command(V4), tpu_vm.setup_command(V4), tpu_vm.logs_command(V4)]
    assert tpu_vm.execute(commands, dry_run=False, runner=runner) == 1
    assert calls == commands[:2]
    err = capsys.readouterr().err
    assert "exit status 255" in err and "1 later command(s) not run" in err


@pytest.mark.parametrize("states, ok", [
    (["WAITING_FOR_RESOURCES", "WAITING_FOR_RESOURCES", "PROVISIONING", "ACTIVE"], True),
    (["ACCEPTED", "FAILED"], False)])
def test_wait_polls_a_queued_resource(states, ok):
    replies, sleeps = iter(states), []

    def runner(command, check, capture_output, text):
        assert command == tpu_vm.queued_state_command(V5E_QUEUED)
        return subprocess.CompletedProcess(command, 0, stdout=next(replies) + "\n")

    step = tpu_vm.WaitUntilActive(V5E_QUEUED, poll_s=7)
    assert tpu_vm.execute([step], runner=runner, sleep=sleeps.append) == (0 if ok else 1)
    assert sleeps == [7] * (len(states) - 1)


def test_run_on_tpu_sh_parses():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True)
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", str(SCRIPT)], check=True)


def test_run_on_tpu_sh_logs_where_logs_command_looks():
    assert f'LOG_FILE="$HOME/{tpu_vm.LOG_FILE}"' in SCRIPT.read_text()


@pytest.mark.skipif(not (shutil.which("bash") and shutil.which("sha256sum")), reason="needs bash")
def test_run_on_tpu_sh_sets_up_then_trains(tmp_path):
    """The script against a fake .venv whose `python` only records its arguments."""
    shutil.copytree(ROOT / "launch", tmp_path / "launch")
    for name in ("requirements.txt", "pyproject.toml"):
        shutil.copy(ROOT / name, tmp_path / name)
    bin_dir = tmp_path / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").write_text('#!/bin/sh\necho "$*"\necho "$*" >> "$HOME/calls"\n')
    (bin_dir / "python").chmod(0o755)
    (bin_dir / "activate").write_text(f'PATH="{bin_dir}:$PATH"\n')
    env = {**os.environ, "HOME": str(tmp_path)}
    run = lambda *args: subprocess.run(["bash", "launch/run_on_tpu.sh", *args], cwd=tmp_path, env=env,
                                       capture_output=True, text=True)
    jax = next(line for line in (ROOT / "requirements.txt").read_text().splitlines()
               if line.startswith("jax=="))

    assert run("tiny", "gs://b/r", "--config.teacher=a b").returncode == 0
    calls = (tmp_path / "calls").read_text().splitlines()
    assert "-m pip install -r requirements.txt -e ." in calls
    assert f"-m pip install jax[tpu]=={jax.removeprefix('jax==')} -f " in "\n".join(calls)
    assert calls[-1] == ("-m spellm_jax.train --config=configs/llama.py:tiny --workdir=gs://b/r "
                         "--config.distributed=True --config.teacher=a b")
    assert calls[-1] in (tmp_path / tpu_vm.LOG_FILE).read_text()

    (tmp_path / "calls").unlink()
    assert run("--setup").returncode == 0
    assert not (tmp_path / "calls").exists()  # set up already: nothing is reinstalled
    assert run("tiny").returncode == 2  # no workdir
