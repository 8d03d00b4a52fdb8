"""Defaults shared by every spellm_jax training config (big_vision style: configs are code)."""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """The self-distillation defaults; presets in configs/llama.py override them."""
    config = ml_collections.ConfigDict()
    config.teacher = "smollm2"  # HF or converted dir (local or gs://), hub name, .gguf, smollm2, tiny_random
    config.seed = 0
    config.init_from = ""  # another run's workdir or checkpoint: start from its trained params

    config.model = ml_collections.ConfigDict()
    config.model.dtype = "float32"  # compute dtype: float32 or bfloat16
    config.model.param_dtype = "float32"
    config.model.scan_layers = False
    config.model.remat = "none"  # none | full | dots
    config.model.tiny = ml_collections.ConfigDict()  # architecture of teacher=tiny_random
    config.model.tiny.hidden_size = 64
    config.model.tiny.intermediate_size = 128
    config.model.tiny.num_layers = 2
    config.model.tiny.num_heads = 4
    config.model.tiny.num_kv_heads = 2

    config.heads = ml_collections.ConfigDict()
    config.heads.kind = "independent"  # the character decoder: independent | chain
    config.heads.recurrent_width = 128  # chain: width of the state over the symbols so far
    config.heads.hidden_every_step = False  # chain: each recurrent step rereads the hidden state
    # chain: this many of the training text's most frequent tokens keep their own (LM-head) rows
    config.heads.shortlist = 0
    config.heads.k = 16  # 0: the smallest k covering `coverage_target` of the training tokens
    config.heads.coverage_target = 0.999
    config.heads.use_bias = True
    config.heads.adapter = "none"  # none | shared | per_head
    config.heads.init = "lm_head_mean"  # lm_head_mean | normal
    config.heads.prior_tokens = 64  # teacher-sampled tokens weighting the lm_head_mean init

    config.train = ml_collections.ConfigDict()
    config.train.trainable = "top_layers"  # heads | top_layers | lora | full
    config.train.top_layers = 8
    config.train.lora_rank = 16
    config.train.lora_alpha = 32.0
    config.train.steps = 40
    config.train.batch_size = 16  # global, in sequences
    config.train.seq_len = 128
    config.train.grad_accum = 1
    config.train.learning_rate = 5e-4
    config.train.fresh_lr_scale = 1.0  # learning-rate multiplier for the decoder's new parameters
    config.train.warmup_steps = 5
    config.train.weight_decay = 0.01
    config.train.grad_clip = 1.0
    config.train.log_every = 5
    config.train.eval_every = 20
    config.train.eval_beams = (4,)  # chain kind: held-out agreement also with these beams

    config.loss = ml_collections.ConfigDict()
    config.loss.soft_weight = 0.5
    config.loss.hard_weight = 1.0
    config.loss.temperature = 1.0
    config.loss.chunk_size = 64
    config.loss.save_targets = True  # 2 x k x C floats per position and path kept for the backward
    config.loss.paths = 1  # chain kind: the soft loss follows the teacher's top-`paths` spellings

    config.data = ml_collections.ConfigDict()
    config.data.source = "corpus"  # self_generated | corpus | mixed (corpus measured best, see README)
    # Built-in names, tfds:NAME, or .txt/.jsonl[.gz]/.array_record paths and globs (local or
    # gs://), each with ?weight=...&text_key=... options (spellm_jax/data/sources.py).
    config.data.corpora = ("shakespeare", "wiki")
    # Documents in flight per row slot and source (data/stream.py): each lane gives a run
    # steps / lanes consecutive rows of text, so more lanes spread a short run over more places.
    config.data.lanes = 40
    config.data.num_samples = 192  # teacher generations
    config.data.prompt_tokens = 24
    config.data.new_tokens = 104
    config.data.temperature = 1.0
    config.data.top_p = 1.0
    config.data.generation_batch = 32
    config.data.eval_prompts = 32  # held-out prompts for greedy-continuation agreement
    config.data.eval_new_tokens = 32

    # A small downstream-benchmark subset scored at every evaluation (spellm_jax.benchmarks);
    # off on CPU presets (minutes per evaluation there), on in the pod presets.
    config.benchmark = ml_collections.ConfigDict()
    config.benchmark.enabled = False
    config.benchmark.tasks = ("lambada", "hellaswag", "arc_easy", "piqa", "winogrande")
    config.benchmark.limit = 200  # first documents of each task
    config.benchmark.batch_size = 16

    config.mesh = ml_collections.ConfigDict()
    config.mesh.shape = (-1, 1, 1)  # (data, fsdp, tensor); one entry may be -1
    config.distributed = False  # call jax.distributed.initialize() (multi-host TPU pods)

    config.checkpoint = ml_collections.ConfigDict()
    config.checkpoint.save_every = 20
    config.checkpoint.keep = 3
    config.checkpoint.async_save = True
    return config
