"""The self-distillation run: mesh, sharded state, data, the jitted step, checkpoints, metrics."""

from __future__ import annotations

import dataclasses
import functools
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from spellm_jax import decoding, sharding
from spellm_jax.charset import SpellingTable, choose_k
from spellm_jax.checkpointing import TrainCheckpoints, as_path
from spellm_jax.conversion.sources import Pretrained, load_source
from spellm_jax.conversion.spellm_files import has_spellm_parts
from spellm_jax.distill import DistillSpec, make_optimizer, split_model, train_step
from spellm_jax.errors import ConfigError
from spellm_jax.losses import LossConfig
from spellm_jax.metrics import continuation_agreement, continuation_rows
from spellm_jax.models.char_heads import HeadsConfig
from spellm_jax.models.config import ModelConfig
from spellm_jax.models.llama import LlamaForCausalLM, RuntimeOptions
from spellm_jax.models.params import model_params
from spellm_jax.pretrained import build_spellm, load_exported

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
TINY_TEACHER = "tiny_random"
METADATA_FILE = "spellm.json"
SPELLING_FILE = "spelling_table.json"


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
    if train.seq_len % min(config.loss.chunk_size, train.seq_len):
        raise ConfigError(f"train.seq_len={train.seq_len} is not a multiple of "
                          f"loss.chunk_size={config.loss.chunk_size}.")
    if train.trainable == "top_layers" and config.model.scan_layers:
        raise ConfigError("train.trainable=top_layers needs model.scan_layers=False (the top "
                          "blocks train apart from the stacked lower ones).")
    DistillSpec(train.trainable, train.top_layers, loss_config(config), train.grad_accum)
    if config.model.dtype not in DTYPES or config.model.param_dtype not in DTYPES:
        raise ConfigError(f"model.dtype / param_dtype must be one of {sorted(DTYPES)}.")


def loss_config(config) -> LossConfig:
    return LossConfig(config.loss.soft_weight, config.loss.hard_weight, config.loss.temperature,
                      config.loss.chunk_size)


def runtime_options(config) -> RuntimeOptions:
    lora = config.train.trainable == "lora"
    return RuntimeOptions(dtype=DTYPES[config.model.dtype],
                          param_dtype=DTYPES[config.model.param_dtype],
                          scan_layers=config.model.scan_layers, remat=config.model.remat,
                          lora_rank=config.train.lora_rank if lora else 0,
                          lora_alpha=config.train.lora_alpha)


def load_teacher(config) -> Pretrained:
    """The frozen teacher: a pretrained source, or a seeded random tiny model for tests."""
    if config.teacher != TINY_TEACHER:
        return load_source(config.teacher)
    from spellm_jax.tokenizers import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    tiny = config.model.tiny
    model_config = ModelConfig(
        vocab_size=len(tokenizer), hidden_size=tiny.hidden_size,
        intermediate_size=tiny.intermediate_size, num_layers=tiny.num_layers,
        num_heads=tiny.num_heads, num_kv_heads=tiny.num_kv_heads,
        head_dim=tiny.hidden_size // tiny.num_heads, tie_word_embeddings=True,
        eos_token_ids=(tokenizer.eos_token_id,))
    model = LlamaForCausalLM(model_config, rngs=nnx.Rngs(config.seed))
    params = {k: np.asarray(v) for k, v in model_params(model).items()}
    return Pretrained(model_config, params, tokenizer, TINY_TEACHER)


def _place(tree, mesh):
    """Puts every variable of an NNX state onto `mesh` by its logical axes."""
    return jax.device_put(tree, sharding.shardings_of(tree, mesh))


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
    out = {name: float(sums[name]) / tokens
           for name in ("loss", "soft_kl", "hard_ce", "exact_token_acc", "truncated_share")}
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


def run(config: ml_collections.ConfigDict, workdir: str | Path, stop_after: int | None = None
        ) -> dict[str, Any]:
    """Self-distils a SpeLLM into `workdir`; resumes from its latest checkpoint if there is one.

    `stop_after` ends the run (with a checkpoint) after that step, as a kill would.
    """
    if config.distributed:
        jax.distributed.initialize()
    validate(config, jax.device_count(), jax.process_count())
    workdir = as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    mesh = sharding.make_mesh(config.mesh.shape)
    from spellm_jax import data

    teacher = load_teacher(config)
    tokenizer = teacher.tokenizer
    dataset = data.training_data(config, teacher)
    k = config.heads.k or choose_k(
        SpellingTable.from_tokenizer(tokenizer, 64, teacher.config.vocab_size).lengths,
        np.bincount(dataset.tokens.ravel(), minlength=teacher.config.vocab_size),
        config.heads.coverage_target)
    spelling = SpellingTable.from_tokenizer(tokenizer, k, vocab_size=teacher.config.vocab_size)
    if jax.process_index() == 0:
        spelling.save(workdir / SPELLING_FILE)
    heads = HeadsConfig(k=k, num_symbols=spelling.num_symbols, use_bias=config.heads.use_bias,
                        adapter=config.heads.adapter, init=config.heads.init)
    metadata = {"config": json.loads(config.to_json_best_effort()),
                "model_config": json.loads(teacher.config.to_json()),
                "heads_config": dataclasses.asdict(heads), "teacher_source": teacher.source,
                "spelling_table_hash": spelling.content_hash,
                "scan_layers": config.model.scan_layers, "trainable": config.train.trainable,
                "format_version": 1}
    _check_or_write_metadata(workdir, metadata)

    setup = prepare(config, teacher, spelling, heads, mesh)
    graphdef, rest, teacher_params = setup.graphdef, setup.rest, setup.teacher_params
    state = setup.state
    checkpoints = TrainCheckpoints(workdir, config.checkpoint.keep, config.checkpoint.save_every,
                                   config.checkpoint.async_save)
    iterator = data.BatchIterator(dataset.tokens, dataset.loss_mask, config.train.batch_size,
                                      config.seed, jax.process_index(), jax.process_count())
    # Resume order: this workdir's latest checkpoint, else the parameters of `init_from`, else
    # the teacher source (converted or not; random for tiny_random) as built above.
    start_step = checkpoints.latest_step() or 0
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    if start_step:
        state, data_state, _ = checkpoints.restore(start_step, abstract)
        iterator.set_state(data_state)
        print(f"resumed from checkpoint {start_step} in {workdir}", file=sys.stderr)
    elif config.init_from:
        state["params"] = _params_from(as_path(config.init_from), abstract)
        print(f"initialised the trained parameters from {config.init_from}", file=sys.stderr)
    batch_sharding, step_fn = setup.batch_sharding, setup.step_fn
    teacher_model = nnx.merge(graphdef, teacher_params, rest)
    eval_set = _eval_sequences(teacher_model, dataset, config)
    benchmark = None
    if config.benchmark.enabled:
        from spellm_jax.benchmarks.in_training import TrainingBenchmark

        benchmark = TrainingBenchmark(config.benchmark, teacher_model, tokenizer)
    writer = MetricsWriter(workdir)
    preempted = Preempted()
    progress = _progress(start_step, config.train.steps)
    step, tokens_per_step = start_step, config.train.batch_size * config.train.seq_len
    last_time, summary = time.time(), {}
    try:
        last_step = config.train.steps if stop_after is None else min(stop_after,
                                                                       config.train.steps)
        while step < last_step and not preempted.requested:
            local = iterator.next()
            batch = {name: jax.make_array_from_process_local_data(batch_sharding, value)
                     for name, value in local.items()}
            state, sums = step_fn(state, teacher_params, rest, batch)
            step += 1
            if step % config.train.log_every == 0 or step == config.train.steps:
                summary = _summarise(sums)
                if not np.isfinite(summary["loss"]):
                    raise FloatingPointError(
                        f"loss is {summary['loss']} at step {step}; lower train.learning_rate or "
                        "use model.dtype=float32. The last good checkpoint is kept.")
                now = time.time()
                summary["tokens_per_s"] = tokens_per_step * config.train.log_every / (
                    now - last_time)
                last_time = now
                writer.write(step, summary)
                progress(step, summary)
            if step % config.train.eval_every == 0 or step == last_step:
                evaluation = _evaluate(graphdef, state["params"], rest, eval_set)
                writer.write(step, {f"heldout/{k}": v for k, v in evaluation.items()})
                if benchmark is not None:
                    scores = benchmark(nnx.merge(graphdef, state["params"], rest))
                    writer.write(step, {f"benchmark/{k}": v for k, v in scores.items()})
                summary |= evaluation
            checkpoints.save(step, state, iterator.get_state(), metadata,
                             force=step == last_step or preempted.requested)
    finally:
        checkpoints.wait()
        checkpoints.close()
        writer.close()
        preempted.restore()
    path = workdir / "checkpoints" / str(step)
    if preempted.requested:
        print(f"\nstopped by SIGTERM; checkpoint: {path}", file=sys.stderr)
        return {"checkpoint": str(path), "step": step, **summary}
    evaluation = {k: summary[k] for k in ("free_agreement", "vocab_agreement", "positions")
                  if k in summary} or _evaluate(graphdef, state["params"], rest, eval_set)
    print(f"\ncheckpoint: {path}\nheld-out agreement with the teacher's greedy continuations: "
          f"free {evaluation['free_agreement']:.1%}, vocabulary-constrained "
          f"{evaluation['vocab_agreement']:.1%} ({evaluation['positions']} positions)")
    return {"checkpoint": str(path), "step": step, **summary, **evaluation}


def build_student(config, teacher: Pretrained, spelling: SpellingTable, heads: HeadsConfig,
                  prior_tokens: int):
    """`(spec, graphdef, trainable params, rest, optimizer)` of a fresh SpeLLM on the teacher."""
    spec = DistillSpec(config.train.trainable, config.train.top_layers, loss_config(config),
                       config.train.grad_accum)
    model = build_spellm(teacher, spelling, heads, runtime_options(config), seed=config.seed,
                         prior_tokens=prior_tokens)
    graphdef, params, rest = split_model(model, spec)
    tx = make_optimizer(config.train.learning_rate, config.train.warmup_steps, config.train.steps,
                        config.train.weight_decay, config.train.grad_clip)
    return spec, graphdef, params, rest, tx


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

    state = jax.tree.map(on_mesh, {"step": jnp.zeros((), jnp.int32), "params": params,
                                   "opt_state": jax.jit(tx.init)(params)})
    state_shardings = jax.tree.map(lambda x: x.sharding, state)
    batch_sharding = NamedSharding(mesh, sharding.logical_to_spec(("batch", "length")))
    step_fn = jax.jit(functools.partial(train_step, graphdef, tx, spec),
                      in_shardings=(state_shardings, sharding.shardings_of(teacher_params, mesh),
                                    sharding.shardings_of(rest, mesh), batch_sharding),
                      out_shardings=(state_shardings, replicated),
                      donate_argnums=(0,))
    return Setup(graphdef, state, teacher_params, rest, step_fn, batch_sharding)


def _params_from(path: epath.Path, abstract_state: dict):
    """Only the trained parameters of another run's checkpoint (a workdir: its latest step, or
    `workdir/checkpoints/N`); optimizer and data state start fresh."""
    workdir, step = _checkpoint_location(path)
    checkpoints = TrainCheckpoints(workdir, keep=1, save_every=1)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"config.init_from={path} holds no checkpoint.")
    state, _, _ = checkpoints.restore(step, abstract_state)
    checkpoints.close()
    return state["params"]


def _check_or_write_metadata(workdir: epath.Path, metadata: dict) -> None:
    """Writes `spellm.json` (process 0); a workdir from another teacher or spelling table is
    refused."""
    path = workdir / METADATA_FILE
    if path.exists():
        old = json.loads(path.read_text())
        for key in ("teacher_source", "spelling_table_hash", "trainable", "heads_config"):
            if old.get(key) != metadata[key]:
                raise ConfigError(
                    f"{workdir} holds a run with {key}={old.get(key)!r}, but this config gives "
                    f"{metadata[key]!r}; use a fresh --workdir (nothing was overwritten).")
    if jax.process_index() == 0:
        path.write_text(json.dumps(metadata, indent=2))


def _eval_sequences(teacher_model, dataset, config) -> tuple[np.ndarray, np.ndarray]:
    """Held-out prompts followed by the teacher's greedy continuations, and the mask of the
    positions that predict a continuation token."""
    prompts = dataset.heldout_prompts[:config.data.eval_prompts]
    continuations = decoding.generate(teacher_model, prompts, config.data.eval_new_tokens,
                                      decoding.LMHeadRule())
    return continuation_rows(prompts, continuations, pad_id=0)


def _evaluate(graphdef, params, rest, eval_set) -> dict[str, float]:
    return continuation_agreement(nnx.merge(graphdef, params, rest), *eval_set)


def _progress(start: int, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, initial=start, desc="distilling", unit="step",
               disable=jax.process_index() != 0)

    def update(step: int, summary: dict) -> None:
        bar.n = step
        bar.set_postfix(loss=f"{summary['loss']:.3f}", tok_s=f"{summary['tokens_per_s']:.0f}",
                        exact=f"{summary['exact_token_acc']:.2f}")

    return update


def _checkpoint_location(path: epath.Path) -> tuple[epath.Path, int | None]:
    """`(workdir, step or None for the latest)` of a workdir or a `workdir/checkpoints/N` dir."""
    if (path / METADATA_FILE).is_file():
        return path, None
    if path.parent.name == "checkpoints" and (path.parent.parent / METADATA_FILE).is_file():
        return path.parent.parent, int(path.name)
    raise FileNotFoundError(f"{path} is not a training workdir (with {METADATA_FILE}), a "
                            "checkpoint directory inside one, or an exported SpeLLM directory.")


def run_metadata(path: str | Path) -> dict[str, Any]:
    """The `spellm.json` of the run that `path` (a workdir or one of its checkpoints) belongs to."""
    workdir, _ = _checkpoint_location(as_path(path))
    return json.loads((workdir / METADATA_FILE).read_text())


def load_spellm(path: str | Path, teacher: Pretrained | None = None
                ) -> tuple[Any, Any, SpellingTable]:
    """`(model, tokenizer, spelling)` of a trained SpeLLM: a workdir (its latest checkpoint), one
    `workdir/checkpoints/N` directory, or an exported directory. A training checkpoint holds no
    teacher weights: the frozen parts are rebuilt from its recorded source (or `teacher`, when
    the caller has loaded it already)."""
    path = as_path(path)
    if has_spellm_parts(path):
        return load_exported(str(path))
    workdir, step = _checkpoint_location(path)
    metadata = run_metadata(workdir)
    config = ml_collections.ConfigDict(metadata["config"])
    spelling = SpellingTable.load(workdir / SPELLING_FILE)
    spelling.check_hash(metadata["spelling_table_hash"], str(workdir / METADATA_FILE))
    teacher = teacher or load_teacher(config)
    _, graphdef, params, rest, tx = build_student(
        config, teacher, spelling, HeadsConfig(**metadata["heads_config"]), prior_tokens=0)
    state = {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    checkpoints = TrainCheckpoints(workdir, config.checkpoint.keep, config.checkpoint.save_every)
    step = checkpoints.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir} has no checkpoint yet.")
    state, _, _ = checkpoints.restore(step, abstract)
    checkpoints.close()
    return nnx.merge(graphdef, state["params"], rest), teacher.tokenizer, spelling
