r"""Train a SpeLLM on a Cloud TPU VM slice with gcloud.

    python launch/tpu_vm.py up --name=spellm --zone=us-central2-b --accelerator_type=v4-8 \
        --preset=llama3_1b --workdir=gs://BUCKET/llama3_1b --dry_run

Actions: compile_check (compile the preset's train step for the slice on this machine: does it
fit the chips' memory?), create (and, for --queued, wait until the slice is provisioned), wait,
copy (this repository's sources, and --hf_token_file, to every worker), setup (venv and jax[tpu]
on every worker), train, logs, stop, delete, and up (compile_check unless --no_compile_check,
create, copy, setup, train). The builders are pure
functions returning a gcloud argv; `main` runs them in order, or only prints them with --dry_run.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # `python launch/tpu_vm.py` from a checkout
    sys.path.insert(0, str(REPO_ROOT))
from spellm_jax.aot.slices import slice_shape  # noqa: E402  (the slice table; no JAX)

REPO_PATHS = ("pyproject.toml", "requirements.txt", "configs", "spellm_jax", "launch")
REMOTE_DIR = "spellm_jax"  # on each worker, relative to the home directory
SCRIPT = "launch/run_on_tpu.sh"
LOG_FILE = "spellm_train.log"  # in the workers' home directory: run_on_tpu.sh's LOG_FILE
HF_TOKEN_FILE = ".cache/huggingface/token"  # where huggingface_hub looks, under the home directory
ACTIONS = ("compile_check", "create", "wait", "copy", "setup", "train", "logs", "stop", "delete",
           "up")
UP_ACTIONS = ("compile_check", "create", "copy", "setup", "train")

_TPU_VM = ["gcloud", "compute", "tpus", "tpu-vm"]
_QUEUED = ["gcloud", "compute", "tpus", "queued-resources"]


def num_workers(accelerator_type: str) -> int:
    """The number of hosts (TPU VM workers) in a slice of `accelerator_type`."""
    return slice_shape(accelerator_type).num_hosts


def default_runtime_version(accelerator_type: str) -> str:
    """The TPU VM software version used when none is given."""
    return slice_shape(accelerator_type).family.runtime_version


@dataclasses.dataclass(frozen=True)
class TpuSlice:
    """A TPU VM slice; `runtime_version=None` picks the family's default."""

    name: str
    zone: str
    accelerator_type: str
    runtime_version: str | None = None
    project: str | None = None
    spot: bool = False
    queued: bool = False

    def __post_init__(self) -> None:
        default = default_runtime_version(self.accelerator_type)  # validates the type
        if self.runtime_version is None:
            object.__setattr__(self, "runtime_version", default)

    @property
    def num_workers(self) -> int:
        return num_workers(self.accelerator_type)

    @property
    def is_multi_host(self) -> bool:
        return self.num_workers > 1


def _location(tpu: TpuSlice) -> list[str]:
    return [f"--zone={tpu.zone}", *([f"--project={tpu.project}"] if tpu.project else [])]


def create_command(tpu: TpuSlice) -> list[str]:
    """Creates the slice, as a queued resource (node id = name) when `tpu.queued`."""
    spot = ["--spot"] if tpu.spot else []
    if tpu.queued:
        return [*_QUEUED, "create", tpu.name, f"--node-id={tpu.name}", *_location(tpu),
                f"--accelerator-type={tpu.accelerator_type}",
                f"--runtime-version={tpu.runtime_version}", *spot]
    return [*_TPU_VM, "create", tpu.name, *_location(tpu), f"--accelerator-type={tpu.accelerator_type}",
            f"--version={tpu.runtime_version}", *spot]


def queued_state_command(tpu: TpuSlice) -> list[str]:
    """Prints a queued resource's state (WAITING_FOR_RESOURCES, PROVISIONING, ACTIVE, ...)."""
    return [*_QUEUED, "describe", tpu.name, *_location(tpu), "--format=value(state.state)"]


def ssh_command(tpu: TpuSlice, command: str, worker: str = "all") -> list[str]:
    """Runs the shell `command` on `worker` (by default on every worker at once)."""
    return [*_TPU_VM, "ssh", tpu.name, *_location(tpu), f"--worker={worker}", f"--command={command}"]


def _in_repo(remote_dir: str, command: str) -> str:
    return f"cd {shlex.quote(remote_dir)} && {command}"


def clean_remote_command(tpu: TpuSlice, remote_dir: str = REMOTE_DIR) -> list[str]:
    """Makes `remote_dir` on every worker and removes the copied sources there (not .venv)."""
    return ssh_command(tpu, f"mkdir -p {shlex.quote(remote_dir)} && "
                            + _in_repo(remote_dir, shlex.join(["rm", "-rf", "--", *REPO_PATHS])))


def _scp(tpu: TpuSlice, sources: Sequence[str], destination: str, recurse: bool) -> list[str]:
    return [*_TPU_VM, "scp", *(["--recurse"] if recurse else []), *sources,
            f"{tpu.name}:{destination}", *_location(tpu), "--worker=all"]


def copy_repo_command(tpu: TpuSlice, local_dir: str | Path = REPO_ROOT,
                      remote_dir: str = REMOTE_DIR) -> list[str]:
    """Copies the sources needed to train (REPO_PATHS) into `remote_dir` on every worker."""
    return _scp(tpu, [str(Path(local_dir) / path) for path in REPO_PATHS], remote_dir, recurse=True)


def hf_token_commands(tpu: TpuSlice, token_file: str | Path) -> list[list[str]]:
    """Copies a Hugging Face token file to every worker, for gated teachers such as Llama."""
    return [ssh_command(tpu, shlex.join(["mkdir", "-p", str(Path(HF_TOKEN_FILE).parent)])),
            _scp(tpu, [str(Path(token_file).expanduser())], HF_TOKEN_FILE, recurse=False)]


def setup_command(tpu: TpuSlice, remote_dir: str = REMOTE_DIR) -> list[str]:
    """Creates the venv and installs jax[tpu] on every worker."""
    return ssh_command(tpu, _in_repo(remote_dir, shlex.join(["bash", SCRIPT, "--setup"])))


def check_workdir(tpu: TpuSlice, workdir: str) -> None:
    """Refuses a workdir the hosts of a multi-host slice cannot share."""
    if tpu.is_multi_host and not workdir.startswith("gs://"):
        raise ValueError(
            f"{tpu.accelerator_type} has {tpu.num_workers} hosts, which must share the workdir, but "
            f"{workdir!r} is local to each host; use a Cloud Storage path such as "
            "--workdir=gs://YOUR_BUCKET/spellm/RUN.")


def train_command(tpu: TpuSlice, preset: str, workdir: str, overrides: Mapping[str, str] | None = None,
                  remote_dir: str = REMOTE_DIR, detach: bool = False) -> list[str]:
    """Trains on every worker; `overrides` {"train.steps": "100"} become --config.train.steps=100.

    `detach` starts the run in the background and returns at once (follow it with `logs`).
    """
    check_workdir(tpu, workdir)
    flags = [f"--config.{key}={value}" for key, value in (overrides or {}).items()]
    command = shlex.join(["bash", SCRIPT, preset, workdir, *flags])
    if detach:
        command = f"nohup {command} > /dev/null 2>&1 < /dev/null &"
    return ssh_command(tpu, _in_repo(remote_dir, command))


def compile_check_command(tpu: TpuSlice, preset: str, overrides: Mapping[str, str] | None = None,
                          local_dir: str | Path = REPO_ROOT) -> list[str]:
    """Compiles the preset's train step for the slice here, before any slice exists: it fails
    (with the numbers) when the step does not fit the chips' memory. Needs libtpu locally."""
    flags = [f"--config.{key}={value}" for key, value in (overrides or {}).items()]
    return [sys.executable, "-m", "spellm_jax.train",
            f"--config={Path(local_dir) / 'configs' / 'llama.py'}:{preset}", "--compile_only",
            f"--topology={tpu.accelerator_type}", *flags]


def logs_command(tpu: TpuSlice, lines: int = 100, follow: bool = True) -> list[str]:
    """Shows the end of worker 0's training log (and keeps following it)."""
    tail = ["tail", "-n", str(lines), *(["-F"] if follow else []), LOG_FILE]
    return ssh_command(tpu, shlex.join(tail), worker="0")


def stop_command(tpu: TpuSlice) -> list[str]:
    """Stops the slice's VMs (they keep their disks; not every slice type can be stopped)."""
    return [*_TPU_VM, "stop", tpu.name, *_location(tpu)]


def delete_command(tpu: TpuSlice) -> list[str]:
    """Deletes the slice (a queued resource together with its node)."""
    if tpu.queued:
        return [*_QUEUED, "delete", tpu.name, *_location(tpu), "--force", "--quiet"]
    return [*_TPU_VM, "delete", tpu.name, *_location(tpu), "--quiet"]


@dataclasses.dataclass(frozen=True)
class WaitUntilActive:
    """A step that polls a queued resource until its slice is provisioned."""

    tpu: TpuSlice
    poll_s: float = 60.0


Step = list[str] | WaitUntilActive
Runner = Callable[..., subprocess.CompletedProcess]
_FAILED_STATES = ("FAILED", "SUSPENDING", "SUSPENDED", "DELETING")


def _run(command: list[str], runner: Runner, **kwargs) -> subprocess.CompletedProcess | None:
    """Runs `command` with check=True; on failure prints why and returns None."""
    try:
        return runner(command, check=True, **kwargs)
    except FileNotFoundError:
        print(f"{command[0]} is not on PATH; install the Google Cloud SDK.", file=sys.stderr)
    except subprocess.CalledProcessError as error:
        print(f"failed with exit status {error.returncode}: {shlex.join(command)}", file=sys.stderr)
    return None


def _wait(step: WaitUntilActive, runner: Runner, sleep: Callable[[float], None]) -> bool:
    state, command = "", queued_state_command(step.tpu)
    while True:
        result = _run(command, runner, capture_output=True, text=True)
        if result is None:
            return False
        previous, state = state, result.stdout.strip()
        if state != previous:
            print(f"{step.tpu.name}: {state or 'no state yet'}", flush=True)
        if state == "ACTIVE":
            return True
        if state in _FAILED_STATES:
            print(f"queued resource {step.tpu.name} is {state}; delete it and create it again.",
                  file=sys.stderr)
            return False
        sleep(step.poll_s)


def execute(commands: Sequence[Step], dry_run: bool = False, runner: Runner = subprocess.run,
            sleep: Callable[[float], None] = time.sleep) -> int:
    """Prints and runs `commands` in order, stopping at the first failure; 0 if all succeeded.

    With `dry_run` it only prints them (and calls neither `runner` nor `sleep`).
    """
    for index, step in enumerate(commands):
        if isinstance(step, WaitUntilActive):
            command = shlex.join(queued_state_command(step.tpu))
            print(f"{command}  # every {step.poll_s:g} s until ACTIVE", flush=True)
            ok = dry_run or _wait(step, runner, sleep)
        else:
            print(shlex.join(step) if dry_run else f"+ {shlex.join(step)}", flush=True)
            ok = dry_run or _run(step, runner) is not None
        if not ok:
            if index + 1 < len(commands):
                print(f"stopped; {len(commands) - index - 1} later command(s) not run.", file=sys.stderr)
            return 1
    return 0


def plan(action: str, args: argparse.Namespace) -> list[Step]:
    """The steps of `action` for parsed command-line `args`."""
    tpu = TpuSlice(args.name, args.zone, args.accelerator_type, args.runtime_version, args.project,
                   args.spot, args.queued)
    match action:
        case "up":
            parts = [part for part in UP_ACTIONS
                     if part != "compile_check" or not args.no_compile_check]
            return [step for part in parts for step in plan(part, args)]
        case "compile_check":
            return [compile_check_command(tpu, args.preset, dict(args.override), args.local_dir)]
        case "create":
            return [create_command(tpu), *plan("wait", args)]
        case "wait":
            return [WaitUntilActive(tpu)] if tpu.queued else []
        case "copy":
            token = hf_token_commands(tpu, args.hf_token_file) if args.hf_token_file else []
            return [clean_remote_command(tpu, args.remote_dir),
                    copy_repo_command(tpu, args.local_dir, args.remote_dir), *token]
        case "setup":
            return [setup_command(tpu, args.remote_dir)]
        case "train":
            return [train_command(tpu, args.preset, args.workdir, dict(args.override), args.remote_dir,
                                  args.detach)]
        case "logs":
            return [logs_command(tpu)]
        case "stop":
            return [stop_command(tpu)]
        case "delete":
            return [delete_command(tpu)]
    raise ValueError(f"unknown action {action!r}; choose one of {', '.join(ACTIONS)}.")


def _override(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not (key and sep):
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE (e.g. train.steps=100), got {text!r}")
    return key, value


def build_parser() -> argparse.ArgumentParser:
    """The command line of `main`."""
    parser = argparse.ArgumentParser(prog="python launch/tpu_vm.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("--name", required=True, help="TPU VM (and queued resource) name")
    parser.add_argument("--zone", required=True, help="e.g. us-central2-b")
    parser.add_argument("--accelerator_type", required=True, help="e.g. v4-8, v5litepod-16")
    parser.add_argument("--runtime_version", help="TPU VM software version (default: per family)")
    parser.add_argument("--project", help="GCP project (default: gcloud's core/project)")
    parser.add_argument("--spot", action="store_true", help="use preemptible Spot VMs")
    parser.add_argument("--queued", action="store_true", help="create through a queued resource")
    parser.add_argument("--preset", help="configs/llama.py preset, e.g. llama3_1b (train, up)")
    parser.add_argument("--workdir", help="gs:// path for checkpoints and metrics (train, up)")
    parser.add_argument("--override", type=_override, action="append", default=[],
                        metavar="KEY=VALUE", help="config override, e.g. train.steps=100 (repeatable)")
    parser.add_argument("--detach", action="store_true", help="train in the background; see `logs`")
    parser.add_argument("--local_dir", default=str(REPO_ROOT), help="repository to copy")
    parser.add_argument("--remote_dir", default=REMOTE_DIR, help="repository on the workers")
    parser.add_argument("--hf_token_file", help="copy this Hugging Face token file to the workers "
                        "(copy, up), for gated teachers; e.g. ~/.cache/huggingface/token")
    parser.add_argument("--no_compile_check", action="store_true", help="up: skip compiling the "
                        "train step for the slice here first (which needs libtpu)")
    parser.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    return parser


def main(argv: Sequence[str] | None = None, runner: Runner = subprocess.run) -> int:
    """Runs (or with --dry_run prints) the gcloud commands of one action; the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.action in ("train", "up") and not (args.preset and args.workdir):
        parser.error(f"{args.action} needs --preset and --workdir")
    if args.action == "compile_check" and not args.preset:
        parser.error("compile_check needs --preset")
    try:
        steps = plan(args.action, args)
    except ValueError as error:
        parser.error(str(error))
    return execute(steps, args.dry_run, runner)


if __name__ == "__main__":
    sys.exit(main())
