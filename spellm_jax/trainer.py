"""The self-distillation run: set up (mesh, teacher, data, spelling, sharded state, jitted step,
checkpoints) and then a plain loop over steps."""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spellm_jax import decoding, sharding
from spellm_jax.checkpointing import TrainCheckpoints
from spellm_jax.conversion.sources import Pretrained
from spellm_jax.distill import TRAINABLE_SETS, make_optimizer, split_model, train_step
from spellm_jax.errors import ConfigError
from spellm_jax.losses import SCALAR_METRICS
from spellm_jax.metrics import continuation_agreement, continuation_rows
from spellm_jax.models.char_decoders import ADAPTERS, DECODER_KINDS, INITS, HeadsConfig
from spellm_jax.models.char_decoders.shortlist import most_frequent_tokens
from spellm_jax.models.llama import REMAT_POLICIES, RuntimeOptions
from spellm_jax.paths import as_path
from spellm_jax.pretrained import build_model, build_spellm
from spellm_jax.runs import (
    DTYPES,
    METADATA_FILE,
    checkpoint_location,
    distill_spec,
    load_teacher,
    runtime_options,
)
from spellm_jax.sampling import Sampling
from spellm_jax.spelling import SPELLING_FILE, SpellingTable, choose_k

K_SAMPLE_BATCHES = 16  # training batches whose tokens choose k when heads.k = 0


def validate(config: ml_collections.ConfigDict, num_devices: int, num_processes: int = 1) -> None:
    """Refuses configs that cannot run on these devices, with the fix in the message."""
    train = config.train
    try:
        resolved = sharding.resolve_mesh_shape(config.mesh.shape, num_devices)
    except ValueError as error:
        raise ConfigError(f"config.mesh.shape: {error}") from error
    batch_shards = resolved[0] * resolved[1]
    per_update = train.batch_size // max(train.grad_accum, 1)
    if train.batch_size % train.grad_accum or per_update % batch_shards:
        raise ConfigError(
            f"train.batch_size={train.batch_size} must split into grad_accum={train.grad_accum} "
            f"micro-batches that divide over data*fsdp={batch_shards} devices; pick a batch size "
            f"that is a multiple of {train.grad_accum * batch_shards}.")
    if train.batch_size % num_processes:
        raise ConfigError(f"train.batch_size={train.batch_size} is not a multiple of the "
                          f"{num_processes} hosts.")
    if config.data.source != "corpus" and config.data.generation_batch % batch_shards:
        raise ConfigError(f"data.generation_batch={config.data.generation_batch}: the teacher "
                          f"generates split over data*fsdp={batch_shards} devices; pick a "
                          f"multiple of {batch_shards}.")
    if train.fresh_lr_scale <= 0:
        raise ConfigError(f"train.fresh_lr_scale={train.fresh_lr_scale} must be positive (1.0 "
                          "trains the decoder's new parameters at train.learning_rate).")
    if train.seq_len % min(config.loss.chunk_size, train.seq_len):
        raise ConfigError(f"train.seq_len={train.seq_len} is not a multiple of "
                          f"loss.chunk_size={config.loss.chunk_size}.")
    if train.trainable == "top_layers" and config.model.scan_layers:
        raise ConfigError("train.trainable=top_layers needs model.scan_layers=False (the top "
                          "blocks train apart from the stacked lower ones).")
    for name, value, choices in _fixed_choices(config):
        if value not in choices:
            raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}; "
                              f"set --config.{name}= to one of them.")
    _validate_corpora(config)
    if config.loss.paths > 1 and config.heads.kind != "chain":
        raise ConfigError(f"loss.paths={config.loss.paths} teaches only the chain decoder (the "
                          f"{config.heads.kind} kind's targets do not depend on the spelling "
                          "followed); set --config.loss.paths=1 or --config.heads.kind=chain.")
    if config.heads.get("shortlist", 0) and config.heads.kind != "chain":
        raise ConfigError(f"heads.shortlist={config.heads.shortlist} is part of the chain decoder; "
                          "set --config.heads.shortlist=0 or --config.heads.kind=chain.")
    try:
        distill_spec(config)
    except ValueError as error:
        raise ConfigError(f"config.loss / config.train: {error}") from error


def small_corpus_warning(config: ml_collections.ConfigDict, num_processes: int) -> str | None:
    """A warning for a multi-host run that trains on the built-in corpora only (a few MB, the
    CPU presets' default), naming the override that points it at a real corpus."""
    from spellm_jax.data.corpora import CORPORA

    if num_processes == 1 or config.data.source == "self_generated" or not set(
            config.data.corpora) <= set(CORPORA):
        return None
    return (f"warning: this {num_processes}-host run trains on the small built-in corpora "
            f"{', '.join(config.data.corpora)} (a few MB, read by every epoch many times over); "
            "point it at your own, e.g. --config.data.corpora='(\"gs://BUCKET/c4/*.jsonl.gz\",)' "
            "or '(\"tfds:wikipedia/20230601.en\",)' (README: Training data).")


def _fixed_choices(config: ml_collections.ConfigDict) -> list[tuple[str, Any, tuple]]:
    """`(name, value, allowed values)` of every config field with a fixed set of choices."""
    from spellm_jax.data.corpora import CORPORA
    from spellm_jax.data.pipeline import SOURCES

    fields = [("train.trainable", config.train.trainable, TRAINABLE_SETS),
              ("heads.kind", config.heads.kind, tuple(DECODER_KINDS)),
              ("heads.adapter", config.heads.adapter, ADAPTERS),
              ("heads.init", config.heads.init, INITS),
              ("model.remat", config.model.remat, REMAT_POLICIES),
              ("model.dtype", config.model.dtype, tuple(DTYPES)),
              ("model.param_dtype", config.model.param_dtype, tuple(DTYPES)),
              ("data.source", config.data.source, SOURCES)]
    generated = config.data.source != "corpus"  # the generations' prompts: built-ins only
    return fields + [("data.corpora", name, tuple(CORPORA)) for name in config.data.corpora
                     if generated]


def _validate_corpora(config: ml_collections.ConfigDict) -> None:
    """Every `data.corpora` entry parses (spellm_jax/data/sources.py), and lanes are positive."""
    from spellm_jax.data.sources import parse_source

    if not config.data.corpora:
        raise ConfigError("data.corpora is empty; name at least one source.")
    for entry in config.data.corpora:
        try:
            parse_source(entry)
        except ValueError as error:
            raise ConfigError(f"data.corpora: {error}") from error
    if config.data.lanes < 1:
        raise ConfigError(f"data.lanes={config.data.lanes}; each row slot needs at least one lane.")




class MetricsWriter:
    """metrics.jsonl plus TensorBoard event files in the workdir (process 0 only). Object stores
    (`gs://`) cannot append, so there the JSONL file is rewritten whole at each write."""

    def __init__(self, workdir: epath.Path):
        from tensorboardX import SummaryWriter

        self.enabled = jax.process_index() == 0
        if self.enabled:
            self.jsonl = workdir / "metrics.jsonl"
            self.appends = "://" not in str(workdir)
            self.lines = ([] if self.appends or not self.jsonl.exists()
                          else self.jsonl.read_text().splitlines(True))
            self.tensorboard = SummaryWriter(str(workdir / "tensorboard"))

    def write(self, step: int, metrics: dict[str, float]) -> None:
        if not self.enabled:
            return
        line = json.dumps({"step": step, **metrics}) + "\n"
        if self.appends:
            with self.jsonl.open("a") as file:
                file.write(line)
        else:
            self.lines.append(line)
            self.jsonl.write_text("".join(self.lines))
        for name, value in metrics.items():
            self.tensorboard.add_scalar(name, value, step)
        self.tensorboard.flush()

    def close(self) -> None:
        if self.enabled:
            self.tensorboard.close()


def _summarise(sums: dict) -> dict[str, float]:
    sums = jax.device_get(sums)
    tokens = max(float(sums["tokens"]), 1.0)
    out = {name: float(sums[name]) / tokens for name in SCALAR_METRICS}
    out |= {f"head_acc/{i}": float(v) / tokens for i, v in enumerate(sums["head_acc"])}
    out["grad_norm"] = float(sums["grad_norm"])
    return out


class Preempted:
    """Turns SIGTERM (a preempted TPU VM) into a flag the loop checks after each step."""

    def __init__(self):
        self.requested = False
        self.previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self.previous)


def heads_config(config: ml_collections.ConfigDict, k: int, num_symbols: int,
                 shortlist_tokens: tuple[int, ...] = ()) -> HeadsConfig:
    """The decoder a config asks for, spelling k symbols from an alphabet of `num_symbols`."""
    heads = config.heads
    return HeadsConfig(k=k, num_symbols=num_symbols, kind=heads.kind, use_bias=heads.use_bias,
                       adapter=heads.adapter, init=heads.init,
                       recurrent_width=heads.recurrent_width,
                       hidden_every_step=heads.get("hidden_every_step", False),
                       shortlist_tokens=shortlist_tokens)


def shortlist_for(config: ml_collections.ConfigDict, tokenizer, spelling: SpellingTable
                  ) -> tuple[int, ...]:
    """The chain decoder's shortlist: the `heads.shortlist` tokens most frequent in the
    training corpora (none when it is 0)."""
    size = config.heads.get("shortlist", 0)
    if not size:
        return ()
    from spellm_jax.data import token_counts

    counts = token_counts(config.data.corpora, tokenizer, spelling.vocab_size)
    return most_frequent_tokens(counts, spelling, size)


def optimizer_for(config: ml_collections.ConfigDict, decoder: type) -> optax.GradientTransformation:
    """The run's optimizer; the `decoder` class names the parameters that start from scratch."""
    train = config.train
    return make_optimizer(train.learning_rate, train.warmup_steps, train.steps, train.weight_decay,
                          train.grad_clip, fresh=decoder.FRESH_PARAMETERS,
                          fresh_lr_scale=train.fresh_lr_scale)


def build_student(config, teacher: Pretrained, spelling: SpellingTable, heads: HeadsConfig,
                  prior_tokens: int):
    """`(spec, graphdef, trainable params, rest, optimizer)` of a fresh SpeLLM on the teacher."""
    spec = distill_spec(config)
    model = build_spellm(teacher, spelling, heads, runtime_options(config), seed=config.seed,
                         prior_tokens=prior_tokens)
    graphdef, params, rest = split_model(model, spec)
    return spec, graphdef, params, rest, optimizer_for(config, type(model.char_heads))


def jit_train_step(graphdef, tx: optax.GradientTransformation, spec, mesh, state_shardings,
                   teacher_shardings, rest_shardings):
    """`(step_fn, batch_sharding)`: the train step compiled for these layouts on `mesh`, the state
    donated and the metric sums replicated."""
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx, spec),
                      in_shardings=(state_shardings, teacher_shardings, rest_shardings,
                                    batch_sharding),
                      out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
                      donate_argnums=(0,))
    return step_fn, batch_sharding


@dataclasses.dataclass
class Setup:
    """Everything a train step needs, placed on the mesh."""

    graphdef: Any
    state: dict  # step, trainable params, optimizer state (donated each step)
    teacher_params: Any  # the trainable set's original values: the teacher's part
    rest: Any  # frozen parameters and spelling constants
    step_fn: Any  # jitted (state, teacher_params, rest, batch) -> (state, metric sums)
    batch_sharding: NamedSharding


def prepare(config, teacher: Pretrained, spelling: SpellingTable, heads: HeadsConfig,
            mesh) -> Setup:
    """Builds the SpeLLM on the teacher, splits what trains, shards it and jits the step."""
    spec, graphdef, params, rest, tx = build_student(config, teacher, spelling, heads,
                                                     config.heads.prior_tokens)
    params, rest = _place(params, mesh), _place(rest, mesh)
    teacher_params = jax.tree.map(jnp.copy, params)
    replicated = NamedSharding(mesh, PartitionSpec())

    def on_mesh(x):  # scalars such as Adam's count come out of jit on one device
        on = isinstance(x.sharding, NamedSharding) and x.sharding.mesh == mesh
        return x if on else jax.device_put(x, replicated)

    # The optimizer state is laid out by the rules, as its parameters are (jit alone would leave
    # Adam's zero-initialised moments replicated on every device).
    opt_shardings = sharding.shardings_of(jax.eval_shape(tx.init, params), mesh)
    state = jax.tree.map(on_mesh, {"step": jnp.zeros((), jnp.int32), "params": params,
                                   "opt_state": jax.jit(tx.init, out_shardings=opt_shardings)(params)})
    step_fn, batch_sharding = jit_train_step(
        graphdef, tx, spec, mesh, jax.tree.map(lambda x: x.sharding, state),
        sharding.shardings_of(teacher_params, mesh), sharding.shardings_of(rest, mesh))
    return Setup(graphdef, state, teacher_params, rest, step_fn, batch_sharding)


def _place(tree, mesh):
    """Puts every variable of an NNX state onto `mesh` by its logical axes."""
    return jax.device_put(tree, sharding.shardings_of(tree, mesh))


def _teacher_sampler(teacher: Pretrained, config: ml_collections.ConfigDict, mesh):
    """The teacher's self-generation for the data package, built only when it is asked for:
    the teacher laid out on the training `mesh` by the rules, each batch split over it."""
    data = config.data

    def build():
        model = build_model(teacher.config, RuntimeOptions(), teacher.params, teacher.source)
        graphdef, state = nnx.split(model)
        model = nnx.merge(graphdef, _place(state, mesh))
        rule = decoding.LMHeadRule(Sampling(data.temperature, data.get("top_k", 0), data.top_p))
        return decoding.sampler(model, teacher.tokenizer, rule, data.new_tokens, mesh)

    return build


def _spelling_for(config, teacher: Pretrained, batches) -> SpellingTable:
    """The run's spelling table: `heads.k` symbols, or (k = 0) the smallest k that spells
    `heads.coverage_target` of (a sample of) the training tokens in full."""
    vocab_size = teacher.config.vocab_size
    k = config.heads.k
    if not k:  # every host counts its slice of the same batches: the counts of all hosts agree
        counts = np.bincount(batches.peek_tokens(K_SAMPLE_BATCHES).ravel(), minlength=vocab_size)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        k = choose_k(SpellingTable.from_tokenizer(teacher.tokenizer, 64, vocab_size).lengths,
                     counts, config.heads.coverage_target)
    return SpellingTable.from_tokenizer(teacher.tokenizer, k, vocab_size=vocab_size)


@dataclasses.dataclass
class Run:
    """A run ready to step: where it is, what it trains and on what, and its state."""

    config: ml_collections.ConfigDict
    workdir: epath.Path
    metadata: dict
    setup: Setup
    state: dict
    start_step: int
    iterator: Any
    checkpoints: TrainCheckpoints
    eval_set: tuple[np.ndarray, np.ndarray]
    benchmark: Any = None  # a TrainingBenchmark when config.benchmark.enabled


def initialize_distributed() -> None:
    """`jax.distributed.initialize()`: JAX finds its peers on TPU VMs and the clusters it knows;
    elsewhere (several processes on one machine, a cluster it does not know) set
    JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    if "JAX_NUM_PROCESSES" not in os.environ:
        jax.distributed.initialize()
        return
    try:
        address = os.environ["JAX_COORDINATOR_ADDRESS"]
        process_id = int(os.environ["JAX_PROCESS_ID"])
    except KeyError as missing:
        raise ConfigError(f"JAX_NUM_PROCESSES is set but {missing} is not; set "
                          "JAX_COORDINATOR_ADDRESS (host:port of process 0) and JAX_PROCESS_ID "
                          "too.") from None
    jax.distributed.initialize(address, int(os.environ["JAX_NUM_PROCESSES"]), process_id)


def start(config: ml_collections.ConfigDict, workdir: str | Path) -> Run:
    """Everything before the first step: checks the config, loads the teacher and the data,
    writes the spelling table and `spellm.json`, places the state on the mesh and restores it
    (this workdir's latest checkpoint, else `init_from`'s parameters, else fresh from the
    teacher)."""
    if config.distributed:
        initialize_distributed()
    validate(config, jax.device_count(), jax.process_count())
    if (warning := small_corpus_warning(config, jax.process_count())) and jax.process_index() == 0:
        print(warning, file=sys.stderr, flush=True)
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape)
    from spellm_jax import data

    teacher = load_teacher(config, mesh)
    dataset = data.training_data(config, teacher.tokenizer, teacher.source,
                                 _teacher_sampler(teacher, config, mesh), jax.process_index(),
                                 jax.process_count())
    spelling = _spelling_for(config, teacher, dataset.batches)
    if jax.process_index() == 0:
        spelling.save(workdir / SPELLING_FILE)
    heads = heads_config(config, spelling.k, spelling.num_symbols,
                         shortlist_for(config, teacher.tokenizer, spelling))
    metadata = {"config": json.loads(config.to_json_best_effort()),
                "model_config": json.loads(teacher.config.to_json()),
                "heads_config": dataclasses.asdict(heads), "teacher_source": teacher.source,
                "spelling_table_hash": spelling.content_hash,
                "scan_layers": config.model.scan_layers, "trainable": config.train.trainable,
                "format_version": 1}
    _check_or_write_metadata(workdir, metadata)

    setup = prepare(config, teacher, spelling, heads, mesh)
    checkpoints = TrainCheckpoints(workdir, config.checkpoint.keep, config.checkpoint.save_every,
                                   config.checkpoint.async_save)
    iterator = dataset.batches
    state, start_step = setup.state, checkpoints.latest_step() or 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    if start_step:
        state, data_state, _ = checkpoints.restore(start_step, abstract)
        iterator.set_state(data_state)
        print(f"resumed from checkpoint {start_step} in {workdir}", file=sys.stderr)
    elif config.init_from:
        state["params"] = _params_from(as_path(config.init_from), abstract["params"],
                                       state["params"])
        print(f"initialised the trained parameters from {config.init_from}", file=sys.stderr)
    teacher_model = nnx.merge(setup.graphdef, setup.teacher_params, setup.rest)
    eval_set = heldout_sequences(teacher_model, dataset.heldout_prompts, config)
    benchmark = None
    if config.benchmark.enabled:
        from spellm_jax.benchmarks.in_training import TrainingBenchmark

        benchmark = TrainingBenchmark(config.benchmark, teacher_model, teacher.tokenizer)
    return Run(config, workdir, metadata, setup, state, start_step, iterator, checkpoints,
               eval_set, benchmark)


def loop(run: Run, stop_after: int | None = None) -> dict[str, Any]:
    """Steps `run` to `train.steps` (or `stop_after`, with a checkpoint, as a kill would), with
    metrics, held-out agreement and checkpoints on their schedules; SIGTERM saves and stops."""
    config, setup, state = run.config, run.setup, run.state
    train = config.train
    writer, preempted = MetricsWriter(run.workdir), Preempted()
    progress = _progress(run.start_step, train.steps)
    step, tokens_per_step = run.start_step, train.batch_size * train.seq_len
    last_step = train.steps if stop_after is None else min(stop_after, train.steps)
    last_time, summary = time.time(), {}
    try:
        while step < last_step and not preempted.requested:
            batch = {name: jax.make_array_from_process_local_data(setup.batch_sharding, value)
                     for name, value in run.iterator.next().items()}
            state, sums = setup.step_fn(state, setup.teacher_params, setup.rest, batch)
            step += 1
            if step % train.log_every == 0 or step == train.steps:
                summary = _summarise(sums)
                if not np.isfinite(summary["loss"]):
                    raise FloatingPointError(
                        f"loss is {summary['loss']} at step {step}; lower train.learning_rate or "
                        "use model.dtype=float32. The last good checkpoint is kept.")
                now = time.time()
                summary["tokens_per_s"] = tokens_per_step * train.log_every / (now - last_time)
                last_time = now
                writer.write(step, summary)
                progress(step, summary)
            if step % train.eval_every == 0 or step == last_step:
                evaluation = _evaluate(config, setup, state["params"], run.eval_set)
                writer.write(step, {f"heldout/{k}": v for k, v in evaluation.items()})
                if run.benchmark is not None:
                    scores = run.benchmark(nnx.merge(setup.graphdef, state["params"], setup.rest))
                    writer.write(step, {f"benchmark/{k}": v for k, v in scores.items()})
                summary |= evaluation
            force = step == last_step or preempted.requested
            if force or run.checkpoints.should_save(step):  # the data state is a collective
                run.checkpoints.save(step, state, run.iterator.get_state(), run.metadata, force)
    finally:
        run.checkpoints.wait()
        run.checkpoints.close()
        writer.close()
        preempted.restore()
    path = run.workdir / "checkpoints" / str(step)
    if preempted.requested:
        print(f"\nstopped by SIGTERM; checkpoint: {path}", file=sys.stderr)
        return {"checkpoint": str(path), "step": step, **summary}
    evaluation = ({k: v for k, v in summary.items() if "agreement" in k or k == "positions"}
                  or _evaluate(config, setup, state["params"], run.eval_set))
    print(f"\ncheckpoint: {path}\nheld-out agreement with the teacher's greedy continuations: "
          f"free {evaluation['free_agreement']:.1%}, vocabulary-constrained "
          f"{evaluation['vocab_agreement']:.1%} ({evaluation['positions']} positions)")
    for beam in _eval_beams(config):
        print(f"  with a beam of {beam}: free {evaluation[f'free_agreement_beam{beam}']:.1%}, "
              f"vocabulary-constrained {evaluation[f'vocab_agreement_beam{beam}']:.1%}")
    return {"checkpoint": str(path), "step": step, **summary, **evaluation}


def run(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: int | None = None
        ) -> dict[str, Any]:
    """Self-distils a SpeLLM into `workdir`; resumes from its latest checkpoint if there is one.

    `stop_after` ends the run (with a checkpoint) after that step, as a kill would.
    """
    return loop(start(config, workdir), stop_after)


def _params_from(path: epath.Path, abstract_params, fresh):
    """Only the trained parameters of another run's checkpoint (a workdir: its latest step, or
    `workdir/checkpoints/N`); parameters it lacks keep their `fresh` values (e.g. the chain
    decoder's recurrence from an independent run); optimizer and data state start fresh."""
    workdir, step = checkpoint_location(path)
    checkpoints = TrainCheckpoints(workdir, keep=1, save_every=1)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"config.init_from={path} holds no checkpoint.")
    params = checkpoints.restore_params(step, abstract_params, fresh)
    checkpoints.close()
    return params


def _check_or_write_metadata(workdir: epath.Path, metadata: dict) -> None:
    """Writes `spellm.json` (process 0); a workdir from another teacher, spelling table, trainable
    set or decoder is refused."""
    path = workdir / METADATA_FILE
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("teacher_source", "spelling_table_hash", "trainable", "heads_config"):
            value, given = old.get(key), metadata[key]
            if key == "heads_config":  # fields added since an older run wrote it take defaults
                value, given = _with_default_fields(value), _with_default_fields(given)
            value, given = json.loads(json.dumps(value)), json.loads(json.dumps(given))  # as read
            if value != given:
                raise ConfigError(
                    f"{workdir} holds a run with {key}={value!r}, but this config gives "
                    f"{metadata[key]!r}; use a fresh --workdir (nothing was overwritten).")
    if jax.process_index() == 0:
        path.write_text(json.dumps(metadata, indent=2))


def _with_default_fields(heads: dict | None) -> dict | None:
    """A recorded `HeadsConfig` dict with the fields it lacks at their defaults."""
    if heads is None:
        return None
    return {field.name: field.default for field in dataclasses.fields(HeadsConfig)
            if field.default is not dataclasses.MISSING} | heads


def heldout_sequences(teacher_model, heldout_prompts, config) -> tuple[np.ndarray, np.ndarray]:
    """The first `data.eval_prompts` held-out prompts followed by the teacher's greedy
    continuations, and the mask of the positions that predict a continuation token."""
    prompts = heldout_prompts[:config.data.eval_prompts]
    continuations = decoding.generate(teacher_model, prompts, config.data.eval_new_tokens,
                                      decoding.LMHeadRule()).tokens
    return continuation_rows(prompts, continuations, pad_id=0)


def _eval_beams(config) -> tuple[int, ...]:
    """The beam widths evaluated beside greedy decoding: the chain kind's (independent heads'
    greedy string is already their best)."""
    return tuple(b for b in config.train.eval_beams if b > 1) if config.heads.kind == "chain" else ()


def _evaluate(config, setup: Setup, params, eval_set) -> dict[str, float]:
    return continuation_agreement(nnx.merge(setup.graphdef, params, setup.rest), *eval_set,
                                  beams=_eval_beams(config))


def _progress(start: int, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="distilling", unit="step",
               disable=jax.process_index() != 0)

    def update(step: int, summary: dict) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_s']:.0f}",
                        exact=f"{summary['exact_token_acc']:.2f}")

    return update
