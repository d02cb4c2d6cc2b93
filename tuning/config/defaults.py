"""The base experiment config: every field a run reads, with its default.

Experiments in `experiments/` start from `base_config()` and change a few
fields, so that every field is overridable from the command line
(`--config.optimizer.learning_rate=3e-4`) whichever experiment is loaded.
"""

from ml_collections import config_dict

placeholder = config_dict.placeholder


def base_config() -> config_dict.ConfigDict:
  """Returns the defaults shared by all experiments."""
  c = config_dict.ConfigDict()
  c.mode = 'train'  # train | eval | ensemble | soup
  # What is learnt (tuning/tasks/): its loss, metrics, evaluation and
  # report. classification | regression | causal_lm | seq2seq
  c.task = 'classification'
  c.seed = 0
  # Computation dtype: float32 or bfloat16 (params and optimizer state stay
  # float32; losses, softmax and norms are computed in float32).
  c.dtype = 'float32'
  # XLA:CPU's dot kernels (tuning/platform/xla_cpu.py): 'auto' = Eigen's for float32
  # (faster and closer to float64 than YNNPACK's here), YNNPACK's for
  # bfloat16. eigen | ynnpack force one. Other platforms ignore it.
  c.xla_cpu_dots = 'auto'
  # glibc malloc for main.py's process (tuning/platform/host_malloc.py): 'tuned'
  # keeps XLA's per-step blocks mapped (no page faults each step; memory is
  # then not returned to the system before exit), 'default' is glibc's own.
  # Read from the command line before the process restarts with it.
  c.host_malloc = 'tuned'
  # How the train state and batches are laid out over devices
  # (tuning/engine/layouts.py): 'pmap' replicates the state on every local device;
  # 'mesh' jits the step on a data x fsdp mesh of all devices, shards each
  # state array (params, optimizer state, EMA) over 'fsdp' along its largest
  # dimension divisible by the fsdp size, and splits batch rows over both
  # axes: for models whose replicated state does not fit one device.
  c.parallelism = 'pmap'  # pmap | mesh
  # Mesh axis sizes ('mesh' only); their product is the device count, and
  # -1 takes the rest of the devices (data=-1, fsdp=1: plain data parallel).
  c.mesh = config_dict.ConfigDict()
  c.mesh.data = -1
  c.mesh.fsdp = 1

  # ---------------------------------------------------------------- data
  c.data = config_dict.ConfigDict()
  # digits (scikit-learn's 8x8 images) | csv | tsv | jsonl | npz | tfds |
  # array_record (a directory written by `python -m tuning.data.to_records`,
  # streamed from disk; text tokenized at conversion or on the fly)
  c.data.source = 'digits'
  c.data.records_dir = placeholder(str)  # for source array_record
  # array_record: threads reading (and tokenizing) training batches ahead;
  # the batches are the same for any number.
  c.data.read_threads = 1
  c.data.path = placeholder(str)  # train file for csv/tsv/jsonl/npz
  c.data.validation_path = placeholder(str)
  c.data.test_path = placeholder(str)
  c.data.tfds_name = placeholder(str)  # e.g. 'glue/sst2', 'mnist'
  c.data.tfds_data_dir = placeholder(str)
  c.data.train_split = 'train'
  c.data.validation_split = placeholder(str)  # None: carved from train
  c.data.test_split = placeholder(str)  # None: carved from train
  c.data.validation_fraction = 0.1
  c.data.test_fraction = 0.2  # only where the source has no test split
  c.data.label_column = 'label'
  # Headerless CSV/TSV files: their column names, e.g. ('text', 'label');
  # the first line is then data. None: the first line is the header.
  c.data.column_names = placeholder(tuple)
  # How csv/tsv/jsonl files are decoded, e.g. 'latin-1' (a file that is
  # not valid in it is an error naming file:line).
  c.data.encoding = 'utf-8'
  c.data.feature_columns = placeholder(tuple)  # None: every other column
  c.data.text_column = placeholder(str)  # set for text classification
  c.data.text_pair_column = placeholder(str)
  # The task's classes: raw labels to keep (renumbered in this order), or
  # tuples of raw labels merged into one class; None keeps every label.
  c.data.classes = placeholder(tuple)
  c.data.class_names = placeholder(tuple)  # names for the table/results
  c.data.examples_per_class = placeholder(int)  # few-label training sets
  c.data.max_train_examples = placeholder(int)
  c.data.max_validation_examples = placeholder(int)  # faster validation
  # Malformed rows, and validation/test rows that cannot be used (missing
  # label or feature): error (naming file:line) | drop (dropped and counted).
  c.data.on_bad_rows = 'error'
  # Drop exact duplicates from the training split (rows with missing values
  # always are), before any validation/test split is carved from it. Given
  # validation and test splits are used as given: never de-duplicated.
  c.data.drop_duplicates = True
  c.data.normalize = placeholder(str)  # standard | minmax
  c.data.pca_components = placeholder(int)
  c.data.image_shape = placeholder(tuple)  # e.g. (8, 8, 1) for the CNN
  # Text: 'whitespace' builds a vocabulary on the training split; a path to
  # tokenizer.json / vocab.txt (or its folder) uses a pretrained tokenizer.
  c.data.tokenizer = 'whitespace'
  c.data.vocab_size = 20000
  c.data.max_length = 64
  c.data.length_buckets = (16, 32, 64)
  # Training batches of similar lengths (tokenized text in memory): each
  # epoch's shuffled examples are sorted by length in chunks of this many
  # batches, cut into batches, and the batches shuffled. 0: off.
  c.data.group_by_length = 0
  # Language modelling (task=causal_lm): place each split's documents
  # (each ending with the end-of-text token), in order and whole, into rows
  # of max_length tokens; attention and positions stay within each document.
  c.data.pack = False
  # Instruction data (task=causal_lm; loss on the response tokens only):
  # prompt/response columns, or a messages column (JSON Lines: a list of
  # {role, content}) rendered by the tokenizer's chat template.
  c.data.prompt_column = placeholder(str)
  c.data.response_column = placeholder(str)
  c.data.messages_column = placeholder(str)
  # Prompt/response rows as a user turn and an assistant turn of the
  # tokenizer's chat template (when it has one), else prompt + response.
  c.data.use_chat_template = True
  # Sequence-to-sequence (task=seq2seq, tuning/data/parallel.py): source
  # 'parallel' reads two line-aligned files per split, data.path (and
  # validation_path, test_path) holding '{lang}', filled with source_lang
  # and target_lang (e.g. 'train.{lang}.gz'); sources 'tsv'/'jsonl' read
  # source_column and target_column; 'array_record' reads records_dir
  # converted from such files (to_records --text_column=SRC
  # --text_pair_column=TGT --labels=none). Training pairs longer than max_length
  # tokens on a side, or with a token-length ratio above max_length_ratio
  # (None: off), are dropped and counted; validation/test never are.
  # tokenizer 'train' trains a joint `subword` ('bpe' | 'unigram')
  # tokenizer of vocab_size tokens on the training pairs, saved as
  # WORKDIR/tokenizer.json and reused on resume.
  c.data.source_lang = placeholder(str)
  c.data.target_lang = placeholder(str)
  c.data.source_column = 'source'
  c.data.target_column = 'target'
  c.data.max_length_ratio = placeholder(float)
  c.data.subword = 'bpe'

  # ---------------------------------------------------------------- model
  c.model = config_dict.ConfigDict()
  c.model.name = 'mlp'  # mlp | cnn | lstm | gru | bert
  c.model.num_classes = placeholder(int)  # None: from the data
  c.model.hidden = (128, 128)
  c.model.dropout = 0.5
  c.model.embed_dim = 64  # lstm/gru
  c.model.bidirectional = True
  c.model.channels = (32, 64)  # cnn
  c.model.hf_config = placeholder(str)  # bert: HF config.json or folder
  c.model.pooling = 'pooler'  # bert: pooler | cls | mean

  # ---------------------------------------------------------------- optimizer
  c.optimizer = config_dict.ConfigDict()
  c.optimizer.name = 'adamw'  # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.weight_decay = 1e-4  # adamw (decoupled) / sgd (L2)
  c.optimizer.momentum = 0.9  # sgd
  c.optimizer.nesterov = False
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.clip_norm = 1.0  # global-norm clipping; 0 turns it off
  # cosine | linear | constant | rsqrt (peak * min(step / warmup,
  # sqrt(warmup / step)): inverse square root after a linear warm-up)
  c.optimizer.schedule = 'cosine'
  c.optimizer.warmup_steps = placeholder(int)
  c.optimizer.warmup_epochs = placeholder(float)
  c.optimizer.end_learning_rate_factor = 0.0
  # Regexes over '/'-joined parameter paths (full match).
  c.optimizer.frozen = ()  # no optimizer state, no update
  # The head's regexes; linear_probing=True trains only them (a preset).
  # None: the model family's (tuning/methods/naming.py).
  c.optimizer.head = placeholder(tuple)
  c.optimizer.linear_probing = False
  # Learning-rate multipliers: ((regex, mult), ...), the first match wins;
  # a multiplier of 0 freezes.
  c.optimizer.lr_mults = ()
  # Layer-wise LR decay: lr x layer_decay^depth, depth counted from the top
  # (layer i of L: L - i; embeddings: L + 1; head, pooler: 0).
  # layer_decay None: off. layer_index_regex captures the layer index; None:
  # the model family's.
  c.optimizer.layer_decay = placeholder(float)
  c.optimizer.layer_index_regex = placeholder(str)
  c.optimizer.embedding_regex = r'.*(embed|embeddings).*'
  c.optimizer.no_decay = (
      r'.*bias$',
      r'.*(LayerNorm|layer_norm|norm).*',
      r'.*(embed|embeddings).*',
  )

  # ---------------------------------------------------------------- training
  c.training = config_dict.ConfigDict()
  c.training.batch_size = 64  # global, split across all devices
  c.training.eval_batch_size = 256
  # Durations: give exactly one of *_steps / *_epochs.
  c.training.total_steps = placeholder(int)
  c.training.total_epochs = placeholder(float)
  c.training.eval_every_steps = placeholder(int)
  c.training.eval_every_epochs = placeholder(float)
  c.training.checkpoint_every_steps = placeholder(int)
  c.training.checkpoint_every_epochs = placeholder(float)
  c.training.log_every_steps = 50
  # Evaluate on validation before the first step too (logged as step 0, in
  # results.json as validation_at_start): e.g. a pretrained model's
  # zero-shot figures. Not a checkpoint; early stopping ignores it.
  c.training.eval_at_start = False
  # Language modelling (task=causal_lm): at each evaluation, greedily
  # continue the first half of this many validation documents (0: none) by
  # sample_tokens tokens (log, samples.jsonl and results.json).
  c.training.samples = 0
  c.training.sample_tokens = 16
  # Sequence-to-sequence (task=seq2seq): label smoothing of the training
  # loss (validation loss/perplexity are the plain cross-entropy).
  c.training.label_smoothing = 0.0
  # Dropout random bits (tuning/engine/prng.py): 'hash' (a keyed hash of each
  # element's position; threefry keys) or JAX's 'threefry2x32', 'rbg',
  # 'unsafe_rbg'. hash and threefry2x32 give the same numbers on any device
  # count (with per-example keys); hash costs a tenth of threefry's time.
  c.training.prng_impl = 'hash'
  # 'per_example': each example's dropout masks come from its own key (its
  # global index folded in; tuning/models/dropout.py), so that results do
  # not depend on the device count, the number of hosts or gradient
  # accumulation. 'per_shard': one key per device's (micro-)batch; results
  # then change with how the batch is split.
  c.training.dropout_keys = 'per_example'
  # Micro-batches per optimizer step (lax.scan inside the step); batch_size
  # stays the global batch per optimizer step.
  c.training.accumulation_steps = 1
  # A non-finite loss/gradient: 'stop' (report the step, keep the last good
  # checkpoint) or 'skip' (keep the old state for that step, count it).
  c.training.on_nonfinite = 'stop'
  c.training.ema_decay = placeholder(float)  # EMA of params, e.g. 0.999
  c.training.evaluate_ema = False  # validate/test with the EMA params
  # Stop after this many evaluations without a better checkpoint.best_metric.
  c.training.early_stopping_patience = placeholder(int)

  # ---------------------------------------------------------------- decode
  # Sequence-to-sequence validation/test translations (task=seq2seq), made
  # at every evaluation and scored with sacreBLEU (bleu, chrf): beam search
  # (beam_size 1: greedy), scores divided by length^length_penalty, at most
  # max_length_ratio * source tokens + max_length_offset target tokens;
  # sources batched by length, batch_size at a time.
  c.decode = config_dict.ConfigDict()
  c.decode.beam_size = 1
  c.decode.length_penalty = 1.0
  c.decode.max_length_ratio = 1.5
  c.decode.max_length_offset = 10
  c.decode.batch_size = 128

  # ---------------------------------------------------------------- lora
  c.lora = config_dict.ConfigDict()
  c.lora.rank = 0  # 0: off
  c.lora.alpha = 16.0  # the adapters' output is scaled by alpha / rank
  c.lora.dropout = 0.0  # on the adapters' input
  # Regexes over Dense module paths (full match); None: the model family's.
  c.lora.targets = placeholder(tuple)
  c.lora.train_head = True  # the optimizer.head parameters train too
  # Write the merged plain parameters to WORKDIR/merged at the end.
  c.lora.export_merged = True

  # ---------------------------------------------------------------- checkpoints
  c.checkpoint = config_dict.ConfigDict()
  # A validation metric and max | min; None: the task's (classification:
  # accuracy, max; regression: loss, min).
  c.checkpoint.best_metric = placeholder(str)
  c.checkpoint.best_mode = placeholder(str)
  # Which checkpoint the final test evaluation (and mode=eval) uses.
  c.checkpoint.evaluate = 'best'  # best | latest
  # How many of the latest checkpoints are kept (besides the best one),
  # e.g. for averaging the last N (mode=soup with soup.run).
  c.checkpoint.keep = 1

  # ---------------------------------------------------------------- init
  c.init = config_dict.ConfigDict()
  # An orbax checkpoint to start from: a run's work directory, its
  # checkpoints/ folder, or a converted pretrained model. Only parameters
  # are restored, against the model's own shapes.
  c.init.checkpoint = placeholder(str)
  c.init.step = 'best'  # best | latest | a step number, for run directories
  c.init.reinit = ()  # regexes of parameter paths to initialise afresh

  # ---------------------------------------------------------------- ensemble
  # mode='ensemble': evaluates these run work directories together (mean of
  # probabilities, mean of logits, majority vote), each member beside them.
  # '@stage' names a stage of this experiment.
  c.ensemble = config_dict.ConfigDict()
  c.ensemble.members = ()
  c.ensemble.checkpoint = 'best'  # best | latest, in every member

  # ---------------------------------------------------------------- soup
  # mode='soup': averages the weights of runs fine-tuned from one start and
  # writes the average as this work directory's checkpoint.
  c.soup = config_dict.ConfigDict()
  c.soup.members = ()
  c.soup.method = 'greedy'  # greedy | uniform
  c.soup.checkpoint = 'best'  # best | latest, in every member
  # Or checkpoint averaging: the mean of the last `last_checkpoints`
  # checkpoints of the run work directory `run` (instead of members; the
  # run must have kept them: checkpoint.keep >= last_checkpoints).
  c.soup.run = placeholder(str)
  c.soup.last_checkpoints = placeholder(int)

  # ---------------------------------------------------------------- distill
  # Knowledge distillation: a teacher (run work directories; several = an
  # ensemble, its probabilities averaged) trains this model with
  # alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
  # or alpha * CE + (1 - alpha) * MSE(logits) with loss='mse'.
  c.distill = config_dict.ConfigDict()
  c.distill.teacher = ()  # empty: no distillation
  c.distill.alpha = 0.5
  c.distill.temperature = 2.0
  c.distill.loss = 'kl'  # kl | mse
  # 'cache': teacher logits computed once into WORKDIR/teacher_logits and
  # read from disk (memory-mapped); 'step': teacher applied in the train
  # step (teacher and student must read the same inputs).
  c.distill.teacher_logits = 'cache'
  # Extra student training text labelled only by the teacher: a file of the
  # same format as data.path (its label column may be empty) ...
  c.distill.transfer_path = placeholder(str)
  # ... and/or augmented copies of the training sentences (Tang et al.
  # 2019: words masked with mask_prob, or an n-gram of 1-5 words kept with
  # ngram_prob); the teacher labels them, CE is not applied to them.
  c.distill.augment_copies = 0
  c.distill.mask_prob = 0.1
  c.distill.ngram_prob = 0.25

  # ---------------------------------------------------------------- stages
  # A multi-stage experiment (e.g. pretrain -> fine-tune -> scratch) lists
  # its stages; each stage is this config with `stage_overrides[name]`
  # applied, runs in WORKDIR/<name>, and '@name' in init.checkpoint refers
  # to that stage's work directory. Empty: a single run in WORKDIR.
  c.stages = ()
  c.stage_overrides = config_dict.ConfigDict()
  return c


def merged_onto_defaults(values: dict) -> config_dict.ConfigDict:
  """`base_config()` with `values` (e.g. a run's config.json) merged onto
  it, so that a run written before a field existed gets its default."""
  merged = base_config().to_dict()
  merge_into(merged, values)
  return config_dict.ConfigDict(merged)


def merge_into(base: dict, overrides: dict):
  """Merges nested `overrides` into the dict `base`, in place."""
  for key, value in overrides.items():
    if isinstance(value, dict) and isinstance(base.get(key), dict):
      merge_into(base[key], value)
    else:
      base[key] = value
