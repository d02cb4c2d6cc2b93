"""Memory plans of Llama-family fine-tuning (python -m tuning.plan).

The argument names a shipped config.json (tests/fixtures/hf_configs/: the
published architecture numbers of the model, no weights) and a method:

  python -m tuning.plan --config=experiments/plan_llama.py:llama-3.2-1b,full \\
      --devices=8 --device_memory=v5e
  python -m tuning.plan --config=experiments/plan_llama.py:llama-3.1-8b,lora \\
      --devices=8 --device_memory=h100

  models   llama-3.2-1b, llama-3.1-8b, smollm2-1.7b
  methods  full  every parameter trains (AdamW, float32 state);
           lora  rank-16 adapters on q, k, v, o, gate, up, down (the base
                 frozen, float32; the final norm trains, as the family's
                 head rule says)

Both: causal_lm, a global batch of 8 rows of 2048 tokens, float32
parameters, bfloat16 compute (config.dtype), mesh data=1 x fsdp=N (the
state sharded over all devices). Override with --config.*, e.g.
--config.training.batch_size=16 --config.data.max_length=4096. Planning
reads no data; a training run from this config would set data.* and
init.checkpoint (the model's weights) too.

The first command printed (on a shared 2-core CPU: the compile time is this
machine's, nothing ran on an accelerator; docs/scale-out.md has the table of
the four plans):

  note: rope_type='llama3' dropped for the plan (it changes the rotary frequencies, not any shape; the decoder family builds only 'default')
  plan: 8 devices, mesh data=1 x fsdp=8; global batch 8 rows x 2048 tokens; 1,235,814,400 parameters (1,235,814,400 trained); compiled in 27.9 s
  per device:
    parameters                                 617,907,200 B     0.58 GiB
    optimizer state                          1,235,814,408 B     1.15 GiB
    other state                                          4 B     0.00 GiB
    batch                                           16,388 B     0.00 GiB
    gradients, activations (temporaries)    30,267,977,440 B    28.19 GiB
    outputs (metrics)                                3,600 B     0.00 GiB
    total                                   32,121,719,040 B    29.92 GiB
  fits v5e (16.00 GiB per device): no (187% of it)
  largest state arrays per device:
     125.2 MiB  params/decoder/embed/embedding  float32[128256, 2048]  sharded ('fsdp', None)
     125.2 MiB  opt_state/1/0/mu/decoder/embed/embedding  float32[128256, 2048]  sharded ('fsdp', None)
     125.2 MiB  opt_state/1/0/nu/decoder/embed/embedding  float32[128256, 2048]  sharded ('fsdp', None)
       8.0 MiB  params/decoder/layer_0/mlp/down/kernel  float32[8192, 2048]  sharded ('fsdp', None)
       8.0 MiB  params/decoder/layer_0/mlp/gate/kernel  float32[2048, 8192]  sharded (None, 'fsdp')
       8.0 MiB  params/decoder/layer_0/mlp/up/kernel  float32[2048, 8192]  sharded (None, 'fsdp')
  largest values the step computes per device (not all alive at once):
    1002.0 MiB  f32[128256,2048] f32[2048]  transpose(jvp(DecoderLM))/(decoder.attend/dot_general:decoder/layer_9/mlp_norm/reduce_sum)
    1002.0 MiB  f32[128256,2048]  transpose(jvp(DecoderLM))/decoder.attend/dot_general
    1002.0 MiB  f32[16384,16032]  jvp(DecoderLM)/decoder.attend/dot_general
    1002.0 MiB  f32[128256,2048]  transpose(jvp())/pad
    1002.0 MiB  f32[2048,128256]  transpose(jvp())/pad
    1001.5 MiB  f32[8,2047,16032]  jvp()/slice
  (XLA:CPU's buffer assignment of the step GPU and TPU run; their compilers schedule temporaries differently: an estimate)
"""

import os

from ml_collections import config_dict

from tuning.config.defaults import base_config

HF_CONFIGS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    'tests',
    'fixtures',
    'hf_configs',
)
MODELS = ('llama-3.2-1b', 'llama-3.1-8b', 'smollm2-1.7b')
METHODS = ('full', 'lora')


def get_config(arg='llama-3.2-1b,full'):
  model, _, method = arg.partition(',')
  method = method or 'full'
  if model not in MODELS or method not in METHODS:
    raise ValueError(
        f'unknown argument {arg!r}: use experiments/plan_llama.py:MODEL,METHOD'
        f' with MODEL one of {", ".join(MODELS)} and METHOD '
        f'{" or ".join(METHODS)}'
    )
  c = base_config()
  c.task = 'causal_lm'
  c.model.name = 'llama'
  c.model.hf_config = os.path.join(HF_CONFIGS, model)
  c.model.dropout = 0.0
  c.dtype = 'bfloat16'
  c.parallelism = 'mesh'
  c.mesh.data = 1
  c.mesh.fsdp = -1
  c.data.max_length = 2048
  c.data.length_buckets = (2048,)
  c.optimizer.name = 'adamw'
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 100
  c.optimizer.schedule = 'cosine'
  c.training.batch_size = 8
  c.training.total_steps = 1000
  if method == 'lora':
    c.lora.rank = 16
    c.lora.alpha = 32.0
    c.optimizer.learning_rate = 2e-4
  else:
    c.optimizer.learning_rate = 2e-5
  c.stages = (method,)
  c.stage_overrides = config_dict.ConfigDict({method: {}})
  return c
