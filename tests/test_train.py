"""Configs, resumable training runs, checkpoints across meshes, preemption, bad configs."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import llama as llama_configs
from spellm_jax import runs, sharding, trainer
from spellm_jax.checkpointing import TrainCheckpoints
from spellm_jax.errors import ConfigError
from tests.test_distill import tiny_config


def read_metrics(workdir):
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return {(r["step"], k): v for r in map(json.loads, lines) for k, v in r.items() if k != "step"}


@pytest.mark.parametrize("preset", llama_configs.PRESETS)
def test_every_preset_loads_and_validates(preset):
    config = llama_configs.get_config(preset)
    devices = {"llama3_8b": 8, "qwen2_7b": 8}.get(preset, 1)
    trainer.validate(config, devices)
    trainer.validate(config, 8)
    with pytest.raises(AttributeError):  # configs are locked: a typo is not a new field
        config.train.stepz = 3


def test_bad_configs_fail_before_any_compute():
    with pytest.raises(ConfigError, match="needs 6 devices"):
        trainer.validate(tiny_config(**{"mesh.shape": (2, 3, 1)}), 8)
    with pytest.raises(ConfigError, match="multiple of 8"):
        trainer.validate(tiny_config(**{"train.batch_size": 12}), 8)
    with pytest.raises(ConfigError, match="scan_layers=False"):
        trainer.validate(tiny_config(**{"train.trainable": "top_layers",
                                        "model.scan_layers": True}), 1)
    with pytest.raises(ConfigError, match=r"generation_batch=12: .* pick a multiple of 8"):
        trainer.validate(tiny_config(**{"data.source": "mixed", "data.generation_batch": 12}), 8)
    trainer.validate(tiny_config(**{"data.generation_batch": 12}), 8)  # corpus: no generation
    with pytest.raises(ConfigError, match="fresh_lr_scale"):
        trainer.validate(tiny_config(**{"train.fresh_lr_scale": 0.0}), 1)
    with pytest.raises(ConfigError, match="paths=3 teaches only the chain decoder"):
        trainer.validate(tiny_config(**{"loss.paths": 3}), 1)
    with pytest.raises(ConfigError, match="paths=0: must be >= 1"):
        trainer.validate(tiny_config(**{"loss.paths": 0, "heads.kind": "chain"}), 1)
    trainer.validate(tiny_config(**{"loss.paths": 3, "heads.kind": "chain"}), 1)
    own = ("shakespeare", "gs://bucket/c4/*.jsonl.gz?weight=3", "tfds:c4/en:3.1.0")
    trainer.validate(tiny_config(**{"data.corpora": own}), 1)  # any source streams
    with pytest.raises(ConfigError, match=r"data.corpora: .*corpus.csv.*is not a built-in"):
        trainer.validate(tiny_config(**{"data.corpora": ("corpus.csv",)}), 1)
    with pytest.raises(ConfigError, match="not one of shakespeare, wiki"):  # prompts to generate
        trainer.validate(tiny_config(**{"data.corpora": own, "data.source": "mixed"}), 1)
    command = [sys.executable, "-m", "spellm_jax.train", "--config=configs/llama.py:tiny",
               "--workdir=/nonexistent/never"]
    unknown = subprocess.run([*command, "--config.train.stepz=3"], capture_output=True, text=True)
    assert unknown.returncode != 0 and "stepz" in unknown.stderr
    no_fit = subprocess.run([*command, "--config.mesh.shape=(3,1,1)"], capture_output=True,
                            text=True)
    assert no_fit.returncode == 2 and "mesh" in no_fit.stderr
    assert not os.path.exists("/nonexistent/never")


def test_runs_resume_bitwise_and_start_from_another_runs_params(tmp_path):
    """An independent run learns; a chain run started from its parameters (`init_from`), killed
    after 2 steps and resumed, equals the uninterrupted chain run bit for bit."""
    independent = tiny_config(**{"train.steps": 4, "train.log_every": 1, "train.eval_every": 100,
                                 "train.learning_rate": 1e-2})
    trainer.run(independent, tmp_path / "independent")
    first = read_metrics(tmp_path / "independent")
    assert first[(4, "loss")] < first[(1, "loss")]  # the tiny preset learns
    chain = tiny_config(**{"heads.kind": "chain", "heads.shortlist": 32, "train.steps": 4,
                           "train.log_every": 1, "train.eval_every": 100,
                           "init_from": str(tmp_path / "independent")})
    trainer.run(chain, tmp_path / "whole")
    trainer.run(chain, tmp_path / "resumed", stop_after=2)
    assert trainer.run(chain, tmp_path / "resumed")["step"] == 4
    whole, resumed = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "resumed")
    assert [whole[(s, "loss")] for s in range(1, 5)] == [resumed[(s, "loss")] for s in range(1, 5)]

    def state(workdir):
        checkpoints = TrainCheckpoints(workdir, keep=3, save_every=1)
        flat = checkpoints.manager.restore(4)["state"]
        checkpoints.close()
        return {k: np.asarray(v) for k, v in flat.items()}

    a, b = state(tmp_path / "whole"), state(tmp_path / "resumed")
    assert a.keys() == b.keys() and any("readout" in key for key in a)
    for key in a:
        assert np.array_equal(a[key], b[key]), key

    # Started from the independent run's parameters: the first update has learning rate 0
    # (warmup), so checkpoint 1 holds its heads; the run then trains on from there.
    kernels = {}
    for name, step in (("independent", 4), ("whole", 4), ("whole", 1)):
        model, _, _ = runs.load_spellm(tmp_path / name / "checkpoints" / str(step))
        kernels[name, step] = np.asarray(model.char_heads.kernel[...])
    assert model.heads_config.kind == "chain" and model.char_heads.readout[...].shape[0] == 16
    np.testing.assert_array_equal(kernels["whole", 1], kernels["independent", 4])
    assert not np.array_equal(kernels["whole", 4], kernels["independent", 4])


def test_checkpoint_restores_onto_another_mesh(tmp_path):
    config = tiny_config(**{"train.steps": 2, "mesh.shape": (8, 1, 1), "train.eval_every": 100})
    trainer.run(config, tmp_path)
    teacher = runs.load_teacher(config)
    from spellm_jax.models.char_decoders import HeadsConfig
    from spellm_jax.spelling import SPELLING_FILE, SpellingTable

    spelling = SpellingTable.load(tmp_path / SPELLING_FILE)
    metadata = json.loads((tmp_path / runs.METADATA_FILE).read_text())
    heads = HeadsConfig(**metadata["heads_config"])
    restored = {}
    for shape in [(8, 1, 1), (2, 2, 2)]:
        setup = trainer.prepare(config, teacher, spelling, heads, sharding.make_mesh(shape))
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), setup.state)
        checkpoints = TrainCheckpoints(tmp_path, keep=3, save_every=1)
        state, data_state, _ = checkpoints.restore(2, abstract)
        checkpoints.close()
        assert data_state["step"] == 2
        kernel = state["params"]["model"]["layers"][0]["mlp"]["up_proj"]["kernel"]
        assert kernel.sharding.mesh.devices.shape == shape
        restored[shape] = jax.tree.map(np.asarray, state["params"])
    for a, b in zip(jax.tree.leaves(restored[(8, 1, 1)]), jax.tree.leaves(restored[(2, 2, 2)]),
                    strict=True):
        assert np.array_equal(a, b)


def test_a_multi_host_run_on_the_built_in_corpora_is_warned_with_the_override():
    pod = llama_configs.get_config("llama3_1b")
    assert trainer.small_corpus_warning(pod, 1) is None  # one host: the CPU presets' default
    assert "--config.data.corpora=" in trainer.small_corpus_warning(pod, 4)
    own = tiny_config(**{"data.corpora": ("shakespeare", "gs://bucket/c4/*.jsonl.gz")})
    assert trainer.small_corpus_warning(own, 4) is None


def test_a_teacher_read_onto_the_mesh_trains_as_one_read_whole(tmp_path):
    """A converted teacher is restored straight into its shards (each device reading its
    part); the run, with the token prior sampled from that sharded teacher, is the same."""
    from spellm_jax.conversion.sources import write_converted

    overrides = {"train.steps": 3, "train.eval_every": 100, "heads.prior_tokens": 4,
                 "mesh.shape": (2, 2, 2)}
    config = tiny_config(**overrides)
    write_converted(runs.load_teacher(config), tmp_path / "teacher")
    trainer.run(config, tmp_path / "whole")
    trainer.run(tiny_config(**overrides, teacher=str(tmp_path / "teacher")), tmp_path / "sharded")
    want, got = read_metrics(tmp_path / "whole"), read_metrics(tmp_path / "sharded")
    losses = sorted(key for key in want if key[1] == "loss")
    assert losses and [got[key] for key in losses] == [want[key] for key in losses]


def test_a_run_recorded_before_a_loss_option_existed_still_loads(tiny_chain_run, tmp_path):
    _, workdir = tiny_chain_run
    old = shutil.copytree(workdir, tmp_path / "old")
    metadata = json.loads((old / runs.METADATA_FILE).read_text())
    del metadata["config"]["loss"]["save_targets"], metadata["config"]["loss"]["paths"]
    (old / runs.METADATA_FILE).write_text(json.dumps(metadata))
    model, _, _ = runs.load_spellm(old)
    reference, _, _ = runs.load_spellm(workdir)
    assert np.array_equal(model.char_heads.kernel[...], reference.char_heads.kernel[...])


def test_k_zero_is_the_smallest_k_covering_the_training_tokens(tmp_path):
    from spellm_jax.spelling import SPELLING_FILE, SpellingTable, choose_k

    config = tiny_config(**{"heads.k": 0, "heads.coverage_target": 0.99})
    run = trainer.start(config, tmp_path)
    run.checkpoints.close()
    assert run.iterator.step == 0  # choosing k did not use up training batches
    tokens = run.iterator.peek_tokens(trainer.K_SAMPLE_BATCHES)
    teacher = runs.load_teacher(config)
    lengths = SpellingTable.from_tokenizer(teacher.tokenizer, 64, teacher.config.vocab_size).lengths
    counts = np.bincount(tokens.ravel(), minlength=len(lengths))
    assert SpellingTable.load(tmp_path / SPELLING_FILE).k == choose_k(lengths, counts, 0.99) > 1


def test_a_chain_run_reports_held_out_agreement_with_a_beam_too(tiny_chain_run):
    config, workdir = tiny_chain_run
    metrics = read_metrics(workdir)
    for mode in ("free", "vocab"):
        for key in (f"heldout/{mode}_agreement", f"heldout/{mode}_agreement_beam4"):
            assert 0.0 <= metrics[(config.train.steps, key)] <= 1.0


def test_sigterm_mid_run_leaves_a_restorable_checkpoint(tmp_path):
    command = [sys.executable, "-m", "spellm_jax.train", "--config=configs/llama.py:tiny",
               f"--workdir={tmp_path}", "--config.train.steps=100000",
               "--config.train.log_every=1", "--config.checkpoint.save_every=1000"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(1)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 0, stderr
    assert "stopped by SIGTERM" in stderr
    model, _, spelling = runs.load_spellm(tmp_path)
    latest = TrainCheckpoints(tmp_path, keep=3, save_every=1).latest_step()
    assert latest >= 3
    assert model.char_heads.kernel[...].shape[0] == spelling.k


def test_run_files_work_on_a_gs_workdir(monkeypatch):
    """Object stores cannot append or rename in place: the spelling table, the run metadata and
    metrics.jsonl go through epath, here on fsspec's in-memory filesystem standing in for gcsfs."""
    from etils import epath
    from fsspec.implementations.memory import MemoryFileSystem

    from spellm_jax.paths import as_path
    from spellm_jax.spelling import SPELLING_FILE, SpellingTable

    if importlib.util.find_spec("gcsfs") is None:  # as on this CPU machine: a clear refusal
        with pytest.raises(FileNotFoundError, match="pip install gcsfs"):
            as_path("gs://bucket/run")
    monkeypatch.setitem(sys.modules["fsspec.registry"]._registry, "gcs", MemoryFileSystem)
    monkeypatch.setattr("tensorboardX.SummaryWriter", FakeSummaryWriter)
    workdir = epath.Path(f"gs://spellm-test-{os.getpid()}/run")
    workdir.mkdir(parents=True, exist_ok=True)
    spelling = SpellingTable(kind="byte_level", k=4, vocab_size=3, spellings=(b"a", b"bc", b""),
                             special_ids=(2,))
    spelling.save(workdir / SPELLING_FILE)
    spelling.save(workdir / SPELLING_FILE)  # the same table again: kept as it is
    assert SpellingTable.load(workdir / SPELLING_FILE).content_hash == spelling.content_hash
    metadata = {"teacher_source": "t", "spelling_table_hash": "h", "trainable": "full",
                "heads_config": {}}
    trainer._check_or_write_metadata(workdir, metadata)
    with pytest.raises(ConfigError, match="fresh --workdir"):
        trainer._check_or_write_metadata(workdir, metadata | {"teacher_source": "other"})
    for step in (1, 2):  # a resumed run keeps what the first one wrote
        writer = trainer.MetricsWriter(workdir)
        writer.write(step, {"loss": float(step)})
        writer.close()
    assert read_metrics(workdir) == {(1, "loss"): 1.0, (2, "loss"): 2.0}
    assert {p.name for p in workdir.iterdir()} == {runs.METADATA_FILE, "metrics.jsonl",
                                                   SPELLING_FILE}


class FakeSummaryWriter:
    """Stands in for tensorboardX's writer, whose gs:// support needs google-cloud-storage."""

    def __init__(self, logdir: str):
        assert logdir.startswith("gs://")

    def add_scalar(self, *args) -> None:
        pass

    def flush(self) -> None:
        pass

    def close(self) -> None:
        pass
