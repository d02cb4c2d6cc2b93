"""The base experiment config: every field a run reads, its default, and
the values it allows, each stated once.

Experiments in `experiments/` start from `base_config()` and change a few
fields, so that every field is overridable from the command line
(`--config.optimizer.learning_rate=3e-4`) whichever experiment is loaded.
`FIELDS` declares each field (tuning/config/fields.py): `base_config()` is
built from it, and `tuning/config/checks.py` checks a run's values against
each field's `allowed` rule. Code reads a field directly
(`config.training.on_nonfinite`): a run's config always holds every field
(experiments start from `base_config()`, a finished run's config.json is
read back through `merged_onto_defaults`).
"""

import copy

from ml_collections import config_dict

from tuning.config.fields import Field, Number, OneOf, Satisfies, Whole
from tuning.config.fields import is_whole

# Rules shared by several fields.
FRACTION = Number(0, 1, high_open=True)
EPOCHS = Number(0, low_open=True, what='use a positive number of epochs')
DEVICES = Satisfies(
    lambda v: is_whole(v) and (v >= 1 or v == -1),
    'use a positive number of devices, or -1 for the rest',
)
LAYER_SIZES = Satisfies(
    lambda v: isinstance(v, (tuple, list))
    and all(is_whole(size) and size >= 1 for size in v),
    "use a tuple of positive layer sizes, e.g. '(128, 128)'",
)
CLASSES = Satisfies(
    lambda v: is_whole(v) and v >= 2,
    'use at least 2 classes, or None to take them from the data',
)
INIT_STEP = Satisfies(
    lambda v: v in ('best', 'latest')
    or is_whole(v)
    or (isinstance(v, str) and v.isdigit()),
    "use 'best', 'latest' or a step number",
)

FIELDS = (
    Field('mode', 'train', allowed=OneOf('train', 'eval', 'ensemble', 'soup')),
    # What is learnt (tuning/tasks/): its loss, metrics, evaluation and
    # report. classification | regression | causal_lm | seq2seq | grpo
    # | preference
    Field('task', 'classification'),
    Field('seed', 0, allowed=Whole()),
    # Computation dtype: float32 or bfloat16 (params and optimizer state stay
    # float32; losses, softmax and norms are computed in float32).
    Field('dtype', 'float32', allowed=OneOf('float32', 'bfloat16')),
    # (XLA:CPU's dot kernels and glibc's malloc settings are process flags,
    # not fields: --xla_cpu_dots, --malloc; tuning/platform/process_flags.py.)
    # How the train state and batches are laid out over devices
    # (tuning/engine/layouts.py): 'pmap' replicates the state on every local
    # device; 'mesh' jits the step on a data x fsdp mesh of all devices,
    # shards each state array (params, optimizer state, EMA) over 'fsdp'
    # along its largest dimension divisible by the fsdp size, and splits
    # batch rows over both axes: for models whose replicated state does not
    # fit one device.
    Field('parallelism', 'pmap'),  # pmap | mesh
    # Mesh axis sizes ('mesh' only); their product is the device count, and
    # -1 takes the rest of the devices (data=-1, fsdp=1: plain data parallel).
    Field('mesh.data', -1, allowed=DEVICES),
    Field('mesh.fsdp', 1, allowed=DEVICES),
    # ---------------------------------------------------------------- data
    # digits (scikit-learn's 8x8 images) | csv | tsv | jsonl | npz | tfds |
    # array_record (a directory written by `python -m tuning.data.to_records`,
    # streamed from disk; text tokenized at conversion or on the fly) |
    # triples (knowledge-graph triples; the fields below)
    Field('data.source', 'digits'),
    Field('data.records_dir', unset=str),  # for source array_record
    # array_record: threads reading (and tokenizing) training batches ahead;
    # the batches are the same for any number.
    Field('data.read_threads', 1, allowed=Whole(1)),
    Field('data.path', unset=str),  # train file for csv/tsv/jsonl/npz
    Field('data.validation_path', unset=str),
    Field('data.test_path', unset=str),
    Field('data.tfds_name', unset=str),  # e.g. 'glue/sst2', 'mnist'
    Field('data.tfds_data_dir', unset=str),
    Field('data.train_split', 'train'),
    Field('data.validation_split', unset=str),  # None: carved from train
    Field('data.test_split', unset=str),  # None: carved from train
    Field('data.validation_fraction', 0.1, allowed=FRACTION),
    # only where the source has no test split
    Field('data.test_fraction', 0.2, allowed=FRACTION),
    Field('data.label_column', 'label'),
    # Headerless CSV/TSV files: their column names, e.g. ('text', 'label');
    # the first line is then data. None: the first line is the header.
    Field('data.column_names', unset=tuple),
    # How csv/tsv/jsonl files are decoded, e.g. 'latin-1' (a file that is
    # not valid in it is an error naming file:line).
    Field('data.encoding', 'utf-8'),
    Field('data.feature_columns', unset=tuple),  # None: every other column
    Field('data.text_column', unset=str),  # set for text classification
    Field('data.text_pair_column', unset=str),
    # The task's classes: raw labels to keep (renumbered in this order), or
    # tuples of raw labels merged into one class; None keeps every label.
    Field('data.classes', unset=tuple),
    Field('data.class_names', unset=tuple),  # names for the table/results
    # few-label training sets
    Field('data.examples_per_class', unset=int, allowed=Whole(1)),
    Field('data.max_train_examples', unset=int, allowed=Whole(1)),
    # faster validation
    Field('data.max_validation_examples', unset=int, allowed=Whole(1)),
    # Malformed rows, and validation/test rows that cannot be used (missing
    # label or feature): error (naming file:line) | drop (dropped and counted).
    Field('data.on_bad_rows', 'error', allowed=OneOf('error', 'drop')),
    # Drop exact duplicates from the training split (rows with missing values
    # always are), before any validation/test split is carved from it. Given
    # validation and test splits are used as given: never de-duplicated.
    Field('data.drop_duplicates', True),
    Field(
        'data.normalize', unset=str, allowed=OneOf('none', 'standard', 'minmax')
    ),
    Field('data.pca_components', unset=int, allowed=Whole(1)),
    Field('data.image_shape', unset=tuple),  # e.g. (8, 8, 1) for the CNN
    # Text: 'whitespace' builds a vocabulary on the training split; a path to
    # tokenizer.json / vocab.txt (or its folder) uses a pretrained tokenizer.
    Field('data.tokenizer', 'whitespace'),
    Field('data.vocab_size', 20000, allowed=Whole(1)),
    Field('data.max_length', 64, allowed=Whole(1)),
    Field('data.length_buckets', (16, 32, 64)),
    # Training batches of similar lengths (tokenized text in memory): each
    # epoch's shuffled examples are sorted by length in chunks of this many
    # batches, cut into batches, and the batches shuffled. 0: off.
    Field('data.group_by_length', 0, allowed=Whole(0)),
    # Augmentation of training batches (never validation or test), on the
    # fly from the seed and the batch number (exactly resumable): ops with a
    # rate, applied in order, e.g. 'mask:0.1,ngram:0.25' or 'crop:1,mixup:0.2'.
    # Text (classification/regression on raw text): mask, delete, swap,
    # replace, ngram (probabilities); images (cnn): crop, flip, shift
    # (probabilities), mixup, cutmix (Beta parameters; mixup also on flat
    # features). '' = none. Ops and values: tuning/data/augmentation.py,
    # which checks them. Under distillation they make the teacher-labelled
    # copies of distill.augment_copies instead.
    Field('data.augment', ''),
    # Knowledge-graph triples (source 'triples', tuning/data/triples.py):
    # data.path holds head<TAB>relation<TAB>tail[<TAB>label] lines; the words
    # of each id in id<TAB>words files; negatives: corruptions per true
    # training triple, redrawn in every batch (0: the file has false ones);
    # triple_input: what the model reads: ids (column `triples`: entity and
    # relation ids), words (`triple_words`: each entity as the ids of its
    # words, each relation as one id of its own) or text ("head words [SEP]
    # relation words [SEP] tail words", tokenized: KG-BERT).
    Field('data.entity_names', unset=str),
    Field('data.relation_names', unset=str),
    Field('data.negatives', 0, allowed=Whole(0)),
    Field('data.triple_input', 'ids', allowed=OneOf('ids', 'words', 'text')),
    # Language modelling (task=causal_lm): place each split's documents
    # (each ending with the end-of-text token), in order and whole, into rows
    # of max_length tokens; attention and positions stay within each document.
    Field('data.pack', False),
    # Instruction data (task=causal_lm; loss on the response tokens only):
    # prompt/response columns, or a messages column (JSON Lines: a list of
    # {role, content}) rendered by the tokenizer's chat template.
    Field('data.prompt_column', unset=str),
    Field('data.response_column', unset=str),
    Field('data.messages_column', unset=str),
    # Prompt/response rows as a user turn and an assistant turn of the
    # tokenizer's chat template (when it has one), else prompt + response.
    Field('data.use_chat_template', True),
    # Sequence-to-sequence (task=seq2seq, tuning/data/parallel.py): source
    # 'parallel' reads two line-aligned files per split, data.path (and
    # validation_path, test_path) holding '{lang}', filled with source_lang
    # and target_lang (e.g. 'train.{lang}.gz'); sources 'tsv'/'jsonl' read
    # source_column and target_column; 'array_record' reads records_dir
    # converted from such files (to_records --text_column=SRC
    # --text_pair_column=TGT --labels=none). Training pairs longer than
    # max_length tokens on a side, or with a token-length ratio above
    # max_length_ratio (None: off), are dropped and counted; validation/test
    # never are.
    # tokenizer 'train' trains a joint `subword` ('bpe' | 'unigram')
    # tokenizer of vocab_size tokens on the training pairs, saved as
    # WORKDIR/tokenizer.json and reused on resume.
    Field('data.source_lang', unset=str),
    Field('data.target_lang', unset=str),
    Field('data.source_column', 'source'),
    Field('data.target_column', 'target'),
    Field('data.max_length_ratio', unset=float),
    Field('data.subword', 'bpe'),
    # ---------------------------------------------------------------- model
    # mlp | cnn | lstm | gru | bert | transe | distmult (triples) | the
    # decoders and encoder-decoders (tuning/models/registry.py)
    Field('model.name', 'mlp'),
    # None: from the data
    Field('model.num_classes', unset=int, allowed=CLASSES),
    Field('model.hidden', (128, 128), allowed=LAYER_SIZES),
    Field(
        'model.dropout',
        0.5,
        allowed=Number(
            0,
            1,
            high_open=True,
            what='use a dropout rate in [0, 1) (0 turns dropout off)',
        ),
    ),
    Field('model.embed_dim', 64),  # lstm/gru; transe/distmult embeddings
    Field('model.transe_norm', 1, allowed=OneOf(1, 2)),  # L1 or L2 distance
    Field('model.bidirectional', True),
    Field('model.channels', (32, 64), allowed=LAYER_SIZES),  # cnn
    Field('model.hf_config', unset=str),  # bert: HF config.json or folder
    Field('model.pooling', 'pooler'),  # bert: pooler | cls | mean
    # Activation rematerialisation of the blocks (bert, decoder,
    # encoder_decoder; tuning/models/remat.py): 'none' keeps every
    # activation, 'full' recomputes each block in the backward pass, the
    # others are jax.checkpoint_policies; remat_names (the names the blocks
    # tag: query, key, value, attention_context, attention_out, mlp_hidden,
    # mlp_out) for the two named policies.
    Field(
        'model.remat',
        'none',
        allowed=OneOf(
            'none',
            'full',
            'dots_saveable',
            'dots_with_no_batch_dims_saveable',
            'nothing_saveable',
            'everything_saveable',
            'save_only_these_names',
            'save_anything_except_these_names',
        ),
    ),
    Field(
        'model.remat_names',
        (),
        allowed=Satisfies(
            lambda v: isinstance(v, (tuple, list))
            and all(isinstance(name, str) for name in v),
            "use a tuple of names, e.g. \"('attention_out', 'mlp_hidden')\"",
        ),
    ),
    # ---------------------------------------------------------------- optimizer
    Field('optimizer.name', 'adamw', allowed=OneOf('adam', 'adamw', 'sgd')),
    Field(
        'optimizer.learning_rate',
        1e-3,
        allowed=Number(
            0, what='use a positive learning rate, e.g. 1e-3 (0 trains nothing)'
        ),
    ),
    # adamw (decoupled) / sgd (L2)
    Field(
        'optimizer.weight_decay',
        1e-4,
        allowed=Number(0, what='use a weight decay of at least 0'),
    ),
    Field('optimizer.momentum', 0.9, allowed=FRACTION),  # sgd
    Field('optimizer.nesterov', False),
    Field('optimizer.b1', 0.9, allowed=FRACTION),
    Field('optimizer.b2', 0.999, allowed=FRACTION),
    Field(
        'optimizer.eps',
        1e-8,
        allowed=Number(
            0, low_open=True, what='use a small positive number, e.g. 1e-8'
        ),
    ),
    # global-norm clipping; 0 turns it off
    Field(
        'optimizer.clip_norm',
        1.0,
        allowed=Number(
            0, what='use a positive norm, or 0 to turn clipping off'
        ),
    ),
    # cosine | linear | constant | rsqrt (peak * min(step / warmup,
    # sqrt(warmup / step)): inverse square root after a linear warm-up)
    Field(
        'optimizer.schedule',
        'cosine',
        allowed=OneOf('cosine', 'linear', 'constant', 'rsqrt'),
    ),
    Field('optimizer.warmup_steps', unset=int, allowed=Whole(0)),
    Field(
        'optimizer.warmup_epochs',
        unset=float,
        allowed=Number(0, what='use a number of epochs of at least 0'),
    ),
    Field(
        'optimizer.end_learning_rate_factor',
        0.0,
        allowed=Number(0, what='use a factor of at least 0'),
    ),
    # Regexes over '/'-joined parameter paths (full match).
    Field('optimizer.frozen', ()),  # no optimizer state, no update
    # The head's regexes; linear_probing=True trains only them (a preset).
    # None: the model family's (tuning/methods/naming.py).
    Field('optimizer.head', unset=tuple),
    Field('optimizer.linear_probing', False),
    # Learning-rate multipliers: ((regex, mult), ...), the first match wins;
    # a multiplier of 0 freezes.
    Field('optimizer.lr_mults', ()),
    # Layer-wise LR decay: lr x layer_decay^depth, depth counted from the top
    # (layer i of L: L - i; embeddings: L + 1; head, pooler: 0).
    # layer_decay None: off. layer_index_regex captures the layer index; None:
    # the model family's.
    Field(
        'optimizer.layer_decay',
        unset=float,
        allowed=Number(0, 1, low_open=True),
    ),
    Field('optimizer.layer_index_regex', unset=str),
    Field('optimizer.embedding_regex', r'.*(embed|embeddings).*'),
    Field(
        'optimizer.no_decay',
        (
            r'.*bias$',
            r'.*(LayerNorm|layer_norm|norm).*',
            r'.*(embed|embeddings).*',
        ),
    ),
    # ---------------------------------------------------------------- training
    # global, split across all devices
    Field('training.batch_size', 64, allowed=Whole(1)),
    Field('training.eval_batch_size', 256, allowed=Whole(1)),
    # Durations: give exactly one of *_steps / *_epochs.
    Field('training.total_steps', unset=int, allowed=Whole(1)),
    Field('training.total_epochs', unset=float, allowed=EPOCHS),
    Field('training.eval_every_steps', unset=int, allowed=Whole(1)),
    Field('training.eval_every_epochs', unset=float, allowed=EPOCHS),
    Field('training.checkpoint_every_steps', unset=int, allowed=Whole(1)),
    Field('training.checkpoint_every_epochs', unset=float, allowed=EPOCHS),
    Field('training.log_every_steps', 50, allowed=Whole(1)),
    # Evaluate on validation before the first step too (logged as step 0, in
    # results.json as validation_at_start): e.g. a pretrained model's
    # zero-shot figures. Not a checkpoint; early stopping ignores it.
    Field('training.eval_at_start', False),
    # Language modelling (task=causal_lm): at each evaluation, greedily
    # continue the first half of this many validation documents (0: none) by
    # sample_tokens tokens (log, samples.jsonl and results.json).
    Field('training.samples', 0, allowed=Whole(0)),
    Field('training.sample_tokens', 16, allowed=Whole(1)),
    # Sequence-to-sequence (task=seq2seq): label smoothing of the training
    # loss (validation loss/perplexity are the plain cross-entropy).
    Field('training.label_smoothing', 0.0),
    # Dropout random bits (tuning/engine/prng.py): 'hash' (a keyed hash of each
    # element's position; threefry keys) or JAX's 'threefry2x32', 'rbg',
    # 'unsafe_rbg'. hash and threefry2x32 give the same numbers on any device
    # count (with per-example keys); hash costs a tenth of threefry's time.
    Field(
        'training.prng_impl',
        'hash',
        allowed=OneOf('threefry2x32', 'rbg', 'unsafe_rbg', 'hash'),
    ),
    # 'per_example': each example's dropout masks come from its own key (its
    # global index folded in; tuning/models/dropout.py), so that results do
    # not depend on the device count, the number of hosts or gradient
    # accumulation. 'per_shard': one key per device's (micro-)batch; results
    # then change with how the batch is split.
    Field(
        'training.dropout_keys',
        'per_example',
        allowed=OneOf('per_example', 'per_shard'),
    ),
    # Micro-batches per optimizer step (lax.scan inside the step); batch_size
    # stays the global batch per optimizer step.
    Field('training.accumulation_steps', 1, allowed=Whole(1)),
    # A non-finite loss/gradient: 'stop' (report the step, keep the last good
    # checkpoint) or 'skip' (keep the old state for that step, count it).
    Field('training.on_nonfinite', 'stop', allowed=OneOf('stop', 'skip')),
    # EMA of params, e.g. 0.999
    Field('training.ema_decay', unset=float, allowed=FRACTION),
    Field('training.evaluate_ema', False),  # validate/test with the EMA params
    # Stop after this many evaluations without a better checkpoint.best_metric.
    Field('training.early_stopping_patience', unset=int, allowed=Whole(1)),
    # ---------------------------------------------------------------- decode
    # Sequence-to-sequence validation/test translations (task=seq2seq), made
    # at every evaluation and scored with sacreBLEU (bleu, chrf): beam search
    # (beam_size 1: greedy), scores divided by length^length_penalty, at most
    # max_length_ratio * source tokens + max_length_offset target tokens;
    # sources batched by length, batch_size at a time.
    Field('decode.beam_size', 1),
    Field('decode.length_penalty', 1.0),
    Field('decode.max_length_ratio', 1.5),
    Field('decode.max_length_offset', 10),
    Field('decode.batch_size', 128),
    # ---------------------------------------------------------------- lora
    Field('lora.rank', 0, allowed=Whole(0)),  # 0: off
    # the adapters' output is scaled by alpha / rank
    Field(
        'lora.alpha',
        16.0,
        allowed=Number(0, low_open=True, what='use a positive scale, e.g. 16'),
    ),
    Field('lora.dropout', 0.0, allowed=FRACTION),  # on the adapters' input
    # Regexes over Dense module paths (full match); None: the model family's.
    Field('lora.targets', unset=tuple),
    Field('lora.train_head', True),  # the optimizer.head parameters train too
    # How the frozen kernels of the adapted layers are stored (QLoRA with
    # 'nf4'; tuning/methods/quantization.py); the rest stays float32.
    Field(
        'lora.base_dtype',
        'float32',
        allowed=OneOf('float32', 'bfloat16', 'int8', 'nf4'),
    ),
    # Write the merged plain parameters to WORKDIR/merged at the end.
    Field('lora.export_merged', True),
    # ---------------------------------------------------------- checkpoints
    # A validation metric and max | min; None: the task's (classification:
    # accuracy, max; regression: loss, min).
    Field('checkpoint.best_metric', unset=str),
    Field('checkpoint.best_mode', unset=str, allowed=OneOf('max', 'min')),
    # Which checkpoint the final test evaluation (and mode=eval) uses.
    Field('checkpoint.evaluate', 'best', allowed=OneOf('best', 'latest')),
    # How many of the latest checkpoints are kept (besides the best one),
    # e.g. for averaging the last N (mode=soup with soup.run).
    Field('checkpoint.keep', 1, allowed=Whole(1)),
    # ---------------------------------------------------------------- init
    # An orbax checkpoint to start from: a run's work directory, its
    # checkpoints/ folder, or a converted pretrained model. Only parameters
    # are restored, against the model's own shapes.
    Field('init.checkpoint', unset=str),
    # best | latest | a step number, for run directories
    Field('init.step', 'best', allowed=INIT_STEP),
    Field('init.reinit', ()),  # regexes of parameter paths to initialise afresh
    # ---------------------------------------------------------------- ensemble
    # mode='ensemble': evaluates these run work directories together (mean of
    # probabilities, mean of logits, majority vote), each member beside them.
    # '@stage' names a stage of this experiment.
    Field('ensemble.members', ()),
    Field('ensemble.checkpoint', 'best'),  # best | latest, in every member
    # ---------------------------------------------------------------- soup
    # mode='soup': averages the weights of runs fine-tuned from one start and
    # writes the average as this work directory's checkpoint.
    Field('soup.members', ()),
    Field('soup.method', 'greedy', allowed=OneOf('greedy', 'uniform')),
    Field('soup.checkpoint', 'best'),  # best | latest, in every member
    # Or checkpoint averaging: the mean of the last `last_checkpoints`
    # checkpoints of the run work directory `run` (instead of members; the
    # run must have kept them: checkpoint.keep >= last_checkpoints).
    Field('soup.run', unset=str),
    Field('soup.last_checkpoints', unset=int, allowed=Whole(1)),
    # ---------------------------------------------------------------- distill
    # Knowledge distillation: a teacher (run work directories; several = an
    # ensemble, its probabilities averaged) trains this model with
    # alpha * CE(labels) + (1 - alpha) * T^2 * KL(teacher_T || student_T),
    # or alpha * CE + (1 - alpha) * MSE(logits) with loss='mse'.
    Field('distill.teacher', ()),  # empty: no distillation
    Field('distill.alpha', 0.5),
    Field('distill.temperature', 2.0),
    Field('distill.loss', 'kl'),  # kl | mse
    # 'cache': teacher logits computed once into WORKDIR/teacher_logits and
    # read from disk (memory-mapped); 'step': teacher applied in the train
    # step (teacher and student must read the same inputs).
    Field('distill.teacher_logits', 'cache'),
    # Extra student training text labelled only by the teacher: a file of the
    # same format as data.path (its label column may be empty) ...
    Field('distill.transfer_path', unset=str),
    # ... and/or this many augmented copies of the training sentences, made
    # by config.data.augment's text ops (Tang et al. 2019's x20 transfer set:
    # 'mask:0.1,ngram:0.25'); the teacher labels them, CE is not applied to
    # them.
    Field('distill.augment_copies', 0, allowed=Whole(0)),
    # ---------------------------------------------------------------- grpo
    # Reinforcement learning with rewards (task=grpo, tuning/modes/grpo.py,
    # docs/grpo.md): prompts from data.path's `prompt_column` (jsonl/tsv),
    # `group_size` completions per prompt, group-normalised advantages.
    # reward: gsm8k_exact | regex:<pattern> | classifier:<workdir>[:class]
    # | module.path:function (tuning/multirun/rewards.py).
    Field('grpo.reward', unset=str),
    Field('grpo.prompt_column', 'prompt'),
    Field('grpo.answer_column', 'answer'),  # gsm8k_exact's reference
    Field('grpo.group_size', 4, allowed=Whole(2)),
    Field('grpo.prompts_per_step', 4, allowed=Whole(1)),
    Field('grpo.max_new_tokens', 16, allowed=Whole(1)),
    Field('grpo.max_prompt_tokens', 64, allowed=Whole(1)),
    Field('grpo.temperature', 1.0, allowed=Number(0, low_open=True)),
    Field('grpo.top_p', 1.0, allowed=Number(0, 1, low_open=True)),
    Field('grpo.beta', 0.04, allowed=Number(0)),  # KL (k3) to the reference
    Field('grpo.clip_eps', 0.2, allowed=Number(0, low_open=True)),
    Field('grpo.std_eps', 1e-4, allowed=Number(0, low_open=True)),
    Field(
        'grpo.loss_averaging', 'sequence', allowed=OneOf('sequence', 'token')
    ),
    Field('grpo.updates_per_batch', 1, allowed=Whole(1)),  # mu
    Field('grpo.eval_prompts', 32, allowed=Whole(0)),  # held-out, greedy
    # ---------------------------------------------------------- preference
    # Preference pairs (task=preference, tuning/tasks/preference.py,
    # docs/preference.md): data.path holds JSON Lines of chosen/rejected
    # (HH-RLHF dialogues, or with a prompt column).
    # loss: dpo (sigmoid) | ipo | simpo (reference-free, length-normalised)
    # | orpo (reference-free, NLL + odds ratio).
    Field(
        'preference.loss', 'dpo', allowed=OneOf('dpo', 'ipo', 'simpo', 'orpo')
    ),
    Field('preference.beta', 0.1, allowed=Number(0, low_open=True)),
    Field('preference.gamma', 0.5, allowed=Number(0)),  # simpo's margin
    Field('preference.orpo_lambda', 0.1, allowed=Number(0)),
    # ---------------------------------------------------------------- stages
    # A multi-stage experiment (e.g. pretrain -> fine-tune -> scratch) lists
    # its stages; each stage is this config with `stage_overrides[name]`
    # applied, runs in WORKDIR/<name>, and '@name' in init.checkpoint refers
    # to that stage's work directory. Empty: a single run in WORKDIR.
    Field('stages', ()),
    Field('stage_overrides', {}),
)

FIELD = {field.path: field for field in FIELDS}


def base_config() -> config_dict.ConfigDict:
  """Returns the defaults shared by all experiments (a new ConfigDict, with
  a placeholder of its type for each field declared `unset`)."""
  c = config_dict.ConfigDict()
  for field in FIELDS:
    *sections, name = field.path.split('.')
    node = c
    for section in sections:
      if section not in node:
        node[section] = config_dict.ConfigDict()
      node = node[section]
    if field.unset is not None:
      node[name] = config_dict.placeholder(field.unset)
    else:
      node[name] = copy.deepcopy(field.default)
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
