"""Peak host memory of loading a teacher onto a mesh: sharded reads against a whole read.

    python bench/teacher_load.py [--mesh=1,8,1] [--dtype=float32]

Saves the bundled SmolLM2-135M as a Hugging Face safetensors directory, then loads it onto 8
simulated CPU devices, held by one process or by two (each a host with 4), fresh processes for
each way of reading:
- whole: every tensor read into host memory, then laid out on the mesh by the rules
  (`read_source(path)` + `jax.device_put`), as a teacher was loaded before sharded reads;
- sharded: each device's slice read straight into its buffer (`read_source(path, mesh)`).
On a CPU the devices' buffers are host memory too (and XLA may alias a host array instead of
copying it), so what tells the two apart is a host whose devices hold part of the model: there
a whole read still holds all of it, a sharded read only its part. Writes
bench/results/teacher_load.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MEASURE = """
import json, sys, time
import jax
import jax.experimental.multihost_utils
from spellm_jax import sharding
from spellm_jax.conversion.sources import read_source
from spellm_jax.conversion.sharded_read import canonical_shardings

path, way, shape = sys.argv[1], sys.argv[2], tuple(int(n) for n in sys.argv[3].split(","))
if int(sys.argv[4]) > 1:  # one of several hosts (processes), each with its share of the devices
    from spellm_jax.trainer import initialize_distributed
    initialize_distributed()
import threading

def status_mib(field):  # VmHWM starts afresh in each process (ru_maxrss survives exec)
    line = next(l for l in open("/proc/self/status") if l.startswith(field + ":"))
    return int(line.split()[1]) / 1024

anon_peak, done = [0.0], threading.Event()

def sample_anonymous():  # the mapped file's pages count in VmHWM but are the kernel's to drop
    while not done.is_set():
        anon_peak[0] = max(anon_peak[0], status_mib("RssAnon"))
        time.sleep(0.002)

mesh = sharding.make_mesh(shape)
before, anon_before = status_mib("VmHWM"), status_mib("RssAnon")
sampler = threading.Thread(target=sample_anonymous)
sampler.start()
start = time.perf_counter()
if way == "whole":
    pretrained = read_source(path)
    layouts = canonical_shardings(pretrained.config, mesh)
    params = {k: jax.device_put(v, layouts[k]) for k, v in pretrained.params.items()}
    del pretrained
else:
    params = read_source(path, mesh).params
jax.block_until_ready(params)
jax.experimental.multihost_utils.sync_global_devices("loaded")
seconds = time.perf_counter() - start
on_mesh = sum(s.data.nbytes for v in params.values() for s in v.addressable_shards) / 2**20
done.set()
sampler.join()
print(json.dumps({"way": way, "seconds": seconds, "peak_growth_mib": status_mib("VmHWM") - before,
                  "anonymous_peak_growth_mib": anon_peak[0] - anon_before, "on_mesh_mib": on_mesh}))
"""


def save_hf_copy(out: Path, dtype: str) -> Path:
    """The bundled SmolLM2 as an HF directory (config.json + model.safetensors)."""
    import numpy as np

    from spellm_jax.conversion import hf_dir, mapping
    from spellm_jax.conversion.sources import load_source

    pretrained = load_source("smollm2")
    params = {k: np.asarray(v).astype(dtype) for k, v in pretrained.params.items()}
    hf_dir.write_hf_dir(out, pretrained.config.to_hf(), mapping.to_hf(pretrained.config, params))
    return out


def measure(path: Path, way: str, mesh: str, hosts: int) -> list[dict]:
    """One row per host: `MEASURE` run as `hosts` processes sharing the 8 devices."""
    from tests.test_multiprocess import free_port

    port, processes = free_port(), []
    for process_id in range(hosts):
        env = os.environ | {"JAX_PLATFORMS": "cpu",
                            "XLA_FLAGS": f"--xla_force_host_platform_device_count={8 // hosts}",
                            "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                            "JAX_NUM_PROCESSES": str(hosts), "JAX_PROCESS_ID": str(process_id)}
        processes.append(subprocess.Popen(
            [sys.executable, "-c", MEASURE, str(path), way, mesh, str(hosts)], env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    rows = []
    for process in processes:
        out, err = process.communicate(timeout=600)
        if process.returncode:
            raise RuntimeError(err[-3000:])
        rows.append(json.loads(out.splitlines()[-1]) | {"hosts": hosts})
    return rows


def main() -> None:
    from bench.decode import machine, save_results

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mesh", default="1,8,1", help="data,fsdp,tensor over 8 devices")
    parser.add_argument("--dtype", default="float32", help="the dtype the safetensors store")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        path = save_hf_copy(Path(scratch) / "smollm2_hf", args.dtype)
        size = sum(f.stat().st_size for f in path.glob("*.safetensors")) / 2**20
        rows = [row for hosts in (1, 2) for way in ("whole", "sharded")
                for row in measure(path, way, args.mesh, hosts)]
    report = {"machine": machine(), "mesh": args.mesh, "dtype": args.dtype,
              "safetensors_mib": size, "rows": rows}
    lines = [f"Machine: {report['machine']}. SmolLM2-135M as {args.dtype} safetensors "
             f"({size:.0f} MiB); 8 simulated CPU devices, in one process or in two (4 each, "
             f"a localhost coordinator); mesh (data, fsdp, tensor) = ({args.mesh}). Per host:", "",
             "| hosts | read | peak anonymous memory growth (sampled every 2 ms) | of it, the "
             "arrays on this host's devices | above them | peak resident growth (with the "
             "file's mapped pages) | seconds |", "| ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(f"| {row['hosts']} | {row['way']} | {row['anonymous_peak_growth_mib']:.0f} MiB | "
                     f"{row['on_mesh_mib']:.0f} MiB | "
                     f"{row['anonymous_peak_growth_mib'] - row['on_mesh_mib']:.0f} MiB | "
                     f"{row['peak_growth_mib']:.0f} MiB | {row['seconds']:.1f} |")
    save_results("teacher_load", report, "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
