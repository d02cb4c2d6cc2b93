"""GRPO training (`config.task=grpo`): rewards instead of labels.

Each step takes `grpo.prompts_per_step` prompts (a fixed permutation per
epoch of the prompt file, drawn from the seed), samples `grpo.group_size`
completions of each with the KV-cache sampler (tuning/decoding/sampling.py,
on the adapters merged into the kernels), scores them with the reward
(tuning/multirun/rewards.py), and makes `grpo.updates_per_batch` updates of
the LoRA adapters on the clipped-ratio + KL loss (tuning/tasks/grpo.py).
The old log-probs are the policy's at sampling time; the reference is the
same parameters with the adapters off (`lora.without_adapters`: no second
copy). `training.accumulation_steps` splits the rows of an update into
micro-batches whose gradients add up to the whole batch's exactly.

The sampler's key of step s is derived from (seed, s), so that a resumed run
(WORKDIR/grpo_state.msgpack: adapters, optimizer state, step) samples the
same completions as an uninterrupted one. Per step it logs the reward mean
and std, accuracy (checks), KL, completion length, sampling and training
seconds, into WORKDIR/metrics.jsonl.
"""

from __future__ import annotations

import csv
import gzip
import json
import os
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from tuning.decoding import sampling
from tuning.methods import lora as lora_lib
from tuning.models import decoder as decoder_lib
from tuning.multirun import rewards as rewards_lib
from tuning.tasks import grpo as grpo_loss
from tuning.terminal import console

STATE_FILE = 'grpo_state.msgpack'


def read_rows(path: str, what: str) -> list[dict]:
  """Rows of a jsonl (optionally .gz) or tsv/csv file (one-line errors)."""
  if not path or not os.path.exists(path):
    raise ValueError(f'{what}={path!r}: no such file')
  opener = gzip.open if path.endswith('.gz') else open
  base = path[:-3] if path.endswith('.gz') else path
  with opener(path, 'rt', encoding='utf-8') as f:
    if base.endswith('.jsonl') or base.endswith('.json'):
      return [json.loads(line) for line in f if line.strip()]
    if base.endswith('.tsv') or base.endswith('.csv'):
      delimiter = '\t' if base.endswith('.tsv') else ','
      return list(
          csv.DictReader(f, delimiter=delimiter, quoting=csv.QUOTE_NONE)
      )
  raise ValueError(f'{what}={path!r}: use a .jsonl, .tsv or .csv file')


def columns_of(rows: list[dict], prompt_column: str, what: str):
  """(prompts, {other column: values}) of the rows."""
  if not rows:
    raise ValueError(f'{what}: the file has no rows')
  if prompt_column not in rows[0]:
    raise ValueError(
        f'{what}: no column {prompt_column!r} (have: '
        f'{", ".join(rows[0])}): set config.grpo.prompt_column'
    )
  prompts = [str(r[prompt_column]) for r in rows]
  others = {k: [r.get(k) for r in rows] for k in rows[0] if k != prompt_column}
  return prompts, others


def left_pad(sequences, pad_id: int, multiple: int = 8):
  """(ids, mask) [rows, L] left padded, L rounded up to `multiple`."""
  longest = max(len(s) for s in sequences)
  length = -(-longest // multiple) * multiple
  ids = np.full((len(sequences), length), pad_id, np.int32)
  mask = np.zeros((len(sequences), length), np.int32)
  for i, s in enumerate(sequences):
    if len(s):
      ids[i, -len(s) :] = s
      mask[i, -len(s) :] = 1
  return ids, mask


def sampler_seed(seed: int, step: int) -> int:
  """The sampler's seed at `step`: a function of (seed, step) only."""
  key = jax.random.fold_in(jax.random.PRNGKey(seed), step)
  return int(jax.random.randint(key, (), 0, 2**31 - 1))


def prompt_indices(seed: int, step: int, per_step: int, n: int) -> list[int]:
  """The prompts of `step`: consecutive ones of a per-epoch permutation."""
  out = []
  for i in range(step * per_step, (step + 1) * per_step):
    epoch, at = divmod(i, n)
    out.append(int(np.random.default_rng([seed, epoch]).permutation(n)[at]))
  return out


class Grpo:
  """The GRPO loop on a decoder with LoRA adapters.

  `model`: a `LoraModel` around a `DecoderLM`; `params` its parameters
  (with adapters); `encode(text) -> ids`, `decode(ids) -> text`.
  """

  def __init__(
      self,
      model: lora_lib.LoraModel,
      params,
      encode,
      decode,
      prompts,
      columns,
      reward: rewards_lib.Reward,
      grpo_config,
      *,
      learning_rate: float,
      weight_decay: float = 0.0,
      seed: int = 0,
      accumulation_steps: int = 1,
      stop_tokens=(),
      pad_id: int = 0,
  ):
    c = grpo_config
    if c.loss_averaging not in grpo_loss.AVERAGING:
      raise ValueError(
          f'config.grpo.loss_averaging={c.loss_averaging!r}: use sequence or'
          ' token'
      )
    rows = c.prompts_per_step * c.group_size
    if rows % accumulation_steps:
      raise ValueError(
          f'config.training.accumulation_steps={accumulation_steps} does not'
          f' divide the {rows} completions of a step (prompts_per_step x '
          'group_size)'
      )
    self.model, self.c, self.reward = model, c, reward
    self.encode, self.decode = encode, decode
    self.prompts, self.columns = list(prompts), columns
    self.prompt_ids = [
        np.asarray(encode(p), np.int32)[-c.max_prompt_tokens :]
        for p in self.prompts
    ]
    self.seed, self.accumulation = seed, accumulation_steps
    self.stop_tokens, self.pad_id = tuple(stop_tokens), pad_id
    self.base, adapters = lora_lib.split(params)
    if not adapters:
      raise ValueError(
          'config.task=grpo trains LoRA adapters: set config.lora.rank > 0'
      )
    self.adapters = jax.tree.map(jnp.asarray, adapters)
    self.optimizer = optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adamw(learning_rate, weight_decay=weight_decay),
    )
    self.opt_state = self.optimizer.init(self.adapters)
    self.step = 0
    self._build()

  def _build(self):
    model, c = self.model, self.c

    def logps(params, ids, mask, prompt_len):
      logits = model.apply({'params': params}, ids, mask)
      targets = ids[:, prompt_len:]
      return grpo_loss.token_log_probs(logits[:, prompt_len - 1 : -1], targets)

    self._logps = jax.jit(logps, static_argnums=3)
    self._ref_logps = jax.jit(
        lambda p, ids, mask, n: logps(
            lora_lib.without_adapters(p), ids, mask, n
        ),
        static_argnums=3,
    )

    def loss_fn(adapters, base, batch, prompt_len, denom):
      params = lora_lib.join(base, adapters)
      lp = logps(params, batch['ids'], batch['mask'], prompt_len)
      return grpo_loss.sequence_loss(
          lp,
          batch['old'],
          batch['ref'],
          batch['adv'],
          batch['cmask'],
          beta=c.beta,
          clip_eps=c.clip_eps,
          averaging=c.loss_averaging,
          denom=denom,
      )

    self._grad = jax.jit(
        jax.value_and_grad(loss_fn, has_aux=True), static_argnums=3
    )
    self._update = jax.jit(self._apply_update)

  def _apply_update(self, adapters, opt_state, grads):
    updates, opt_state = self.optimizer.update(grads, opt_state, adapters)
    return optax.apply_updates(adapters, updates), opt_state

  def params(self):
    return lora_lib.join(self.base, self.adapters)

  def generate(self, prompt_ids, greedy: bool, seed: int):
    """(tokens [rows, T], lengths, completion texts) of the prompts."""
    ids, mask = left_pad(prompt_ids, self.pad_id)
    merged = lora_lib.merge(self.params(), self.model.config)
    out = sampling.generate(
        self.model.model,
        merged,
        ids,
        mask,
        max_new_tokens=self.c.max_new_tokens,
        temperature=0.0 if greedy else self.c.temperature,
        top_p=self.c.top_p,
        stop_tokens=self.stop_tokens,
        pad_id=self.pad_id,
        seed=seed,
    )
    texts = []
    for row, n in zip(out.tokens, out.lengths):
      kept = [int(t) for t in row[:n] if int(t) not in self.stop_tokens]
      texts.append(self.decode(kept))
    return ids, mask, out.tokens, out.lengths, texts

  def _chunks(self, rows: int):
    size = rows // self.accumulation
    return [slice(i, i + size) for i in range(0, rows, size)]

  def train_step(self) -> dict:
    """One GRPO step (sampling, rewards, updates); its metrics."""
    c, step = self.c, self.step
    start = time.time()
    chosen = prompt_indices(
        self.seed, step, c.prompts_per_step, len(self.prompts)
    )
    rows = [i for i in chosen for _ in range(c.group_size)]
    pids, pmask, tokens, lengths, texts = self.generate(
        [self.prompt_ids[i] for i in rows], False, sampler_seed(self.seed, step)
    )
    prompt_len = pids.shape[1]
    cmask = (np.arange(tokens.shape[1])[None] < lengths[:, None]).astype(
        np.int32
    )
    ids = np.concatenate([pids, tokens], 1)
    mask = np.concatenate([pmask, cmask], 1)
    columns = {k: [v[i] for i in rows] for k, v in self.columns.items()}
    r = self.reward([self.prompts[i] for i in rows], texts, **columns)
    adv = grpo_loss.group_advantages(r, c.group_size, c.std_eps)
    sample_s = time.time() - start

    start = time.time()
    params = self.params()
    chunks = self._chunks(len(rows))
    old, ref = [], []
    for s in chunks:
      old.append(self._logps(params, ids[s], mask[s], prompt_len))
      ref.append(self._ref_logps(params, ids[s], mask[s], prompt_len))
    denom = grpo_loss.denominator(cmask, c.loss_averaging)
    loss = kl = clipped = 0.0
    for _ in range(c.updates_per_batch):
      grads, loss, kl, clipped = None, 0.0, 0.0, 0.0
      for s, o, rf in zip(chunks, old, ref):
        batch = dict(
            ids=ids[s], mask=mask[s], cmask=cmask[s], adv=adv[s], old=o, ref=rf
        )
        (value, stats), g = self._grad(
            self.adapters, self.base, batch, prompt_len, jnp.float32(denom)
        )
        grads = g if grads is None else jax.tree.map(jnp.add, grads, g)
        loss += float(value)
        kl += float(stats['kl'])
        clipped += float(stats['clipped'])
      self.adapters, self.opt_state = self._update(
          self.adapters, self.opt_state, grads
      )
    train_s = time.time() - start
    self.step += 1
    tokens_total = max(float(cmask.sum()), 1.0)
    metrics = {
        'step': self.step,
        'loss': loss,
        'reward_mean': float(r.mean()),
        'reward_std': float(r.std()),
        'kl': kl / tokens_total,
        'clip_fraction': clipped / tokens_total,
        'completion_length': float(lengths.mean()),
        'sample_s': sample_s,
        'train_s': train_s,
    }
    if self.reward.is_check:
      metrics['accuracy'] = float((r > 0.5).mean())
    self.last_completions = texts
    return metrics

  def evaluate(self, prompts, columns) -> dict:
    """Greedy completions of held-out prompts: mean reward, samples."""
    if not prompts:
      return {}
    ids = [
        np.asarray(self.encode(p), np.int32)[-self.c.max_prompt_tokens :]
        for p in prompts
    ]
    *_, lengths, texts = self.generate(ids, True, 0)
    r = self.reward(prompts, texts, **columns)
    out = {
        'reward_mean': float(r.mean()),
        'completion_length': float(np.mean(lengths)),
        'examples': len(prompts),
        'samples': [
            {'prompt': p, 'completion': t, 'reward': float(v)}
            for p, t, v in list(zip(prompts, texts, r))[:8]
        ],
    }
    if self.reward.is_check:
      out['accuracy'] = float((r > 0.5).mean())
    return out

  # Exact resume: adapters, optimizer state and step (the sampler's keys
  # and the prompt order follow from the seed and the step).
  def state(self):
    return {
        'adapters': self.adapters,
        'opt_state': self.opt_state,
        'step': self.step,
    }

  def save(self, path: str):
    data = flax.serialization.to_bytes(jax.device_get(self.state()))
    tmp = path + '.tmp'
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)

  def restore(self, path: str):
    with open(path, 'rb') as f:
      state = flax.serialization.from_bytes(
          jax.device_get(self.state()), f.read()
      )
    self.adapters = jax.tree.map(jnp.asarray, state['adapters'])
    self.opt_state = jax.tree.map(jnp.asarray, state['opt_state'])
    self.step = int(state['step'])


def _policy(config, workdir: str):
  """(LoraModel, params with pretrained weights, tokenizer, stops, pad)."""
  # pylint: disable=g-import-not-at-top
  from tuning.data import tokenization
  from tuning.engine.checkpoints import load_pretrained_params
  from tuning.engine.checkpoints import resolve_init_source
  from tuning.methods.naming import naming_rules
  from tuning.models.registry import build_model

  if not lora_lib.enabled(config.lora):
    raise ValueError(
        'config.task=grpo trains LoRA adapters: set config.lora.rank > 0'
    )
  tokenizer = tokenization.load_tokenizer(config.data.tokenizer)
  plain = build_model(config.model, config.dtype, num_outputs=None)
  if not isinstance(plain, decoder_lib.DecoderLM):
    raise ValueError(
        f'config.task=grpo needs a decoder (config.model.name llama or '
        f'gpt2), not {config.model.name!r}'
    )
  model = lora_lib.LoraModel(plain, config.lora, naming=naming_rules(config))
  ids = jnp.zeros((1, 8), jnp.int32)
  params = jax.jit(lambda k: model.init({'params': k}, ids)['params'])(
      jax.random.fold_in(jax.random.key(config.seed), 2**31 - 1)
  )
  params = jax.tree.map(np.asarray, params)
  if config.init.checkpoint:
    source = resolve_init_source(
        config.init.checkpoint, os.path.join(workdir, 'pretrained')
    )
    base, adapters = lora_lib.split(params)
    base, report = load_pretrained_params(source, base, (), config.init.step)
    console.info(
        f'init: loaded {len(report["loaded"])} parameters from {source}'
    )
    params = lora_lib.join(base, adapters)
  eos = tokenization.eos_token_id(config.data.tokenizer, tokenizer)
  stops = tuple(plain.config.eos_token_ids) or (
      (eos,) if eos is not None else ()
  )
  pad = plain.config.pad_token_id
  pad = tokenization.pad_token_id(tokenizer) if pad is None else pad
  return model, params, tokenizer, stops, int(pad)


def train(config, workdir: str) -> dict:
  """The GRPO run of `config` in `workdir` (resumes from its state)."""
  c = config.grpo
  reward = rewards_lib.build(c.reward, c.answer_column)
  prompts, columns = columns_of(
      read_rows(config.data.path, 'config.data.path'),
      c.prompt_column,
      'config.data.path',
  )
  held_prompts, held_columns = [], {}
  if config.data.validation_path and c.eval_prompts:
    held_prompts, held_columns = columns_of(
        read_rows(config.data.validation_path, 'config.data.validation_path')[
            : c.eval_prompts
        ],
        c.prompt_column,
        'config.data.validation_path',
    )
  model, params, tokenizer, stops, pad = _policy(config, workdir)
  loop = Grpo(
      model,
      params,
      lambda t: tokenizer.encode(t, add_special_tokens=False).ids,
      lambda ids: tokenizer.decode(ids, skip_special_tokens=True),
      prompts,
      columns,
      reward,
      c,
      learning_rate=float(config.optimizer.learning_rate),
      weight_decay=float(config.optimizer.weight_decay or 0.0),
      seed=int(config.seed),
      accumulation_steps=int(config.training.accumulation_steps),
      stop_tokens=stops,
      pad_id=pad,
  )
  os.makedirs(workdir, exist_ok=True)
  state_path = os.path.join(workdir, STATE_FILE)
  results_path = os.path.join(workdir, 'results.json')
  results = {'task': 'grpo', 'reward': c.reward}
  if os.path.exists(state_path):
    loop.restore(state_path)
    console.info(f'grpo: resumed at step {loop.step} from {state_path}')
    if os.path.exists(results_path):
      with open(results_path, encoding='utf-8') as f:
        results.update(json.load(f))
  total = int(config.training.total_steps or 1)
  every = int(config.training.checkpoint_every_steps or 10)
  start = time.time()
  if loop.step == 0 and held_prompts:
    results['before'] = loop.evaluate(held_prompts, held_columns)
    console.info(
        f'grpo: held-out reward before {results["before"]["reward_mean"]:.4f}'
    )
  log = open(os.path.join(workdir, 'metrics.jsonl'), 'a', encoding='utf-8')
  try:
    while loop.step < total:
      m = loop.train_step()
      log.write(json.dumps(m) + '\n')
      log.flush()
      if m['step'] % int(config.training.log_every_steps) == 0 or (
          m['step'] == total
      ):
        console.info(
            f'grpo step {m["step"]}: reward {m["reward_mean"]:.4f} +- '
            f'{m["reward_std"]:.4f}'
            + (f'  accuracy {m["accuracy"]:.3f}' if 'accuracy' in m else '')
            + f'  kl {m["kl"]:.4f}  length {m["completion_length"]:.1f}  '
            f'loss {m["loss"]:.4f}  sample {m["sample_s"]:.1f}s  '
            f'train {m["train_s"]:.1f}s'
        )
      if m['step'] % every == 0 or m['step'] == total:
        loop.save(state_path)
  finally:
    log.close()
  if held_prompts:
    results['after'] = loop.evaluate(held_prompts, held_columns)
    console.info(
        f'grpo: held-out reward after {results["after"]["reward_mean"]:.4f}'
    )
  results['steps'] = loop.step
  results['wall_time_s'] = results.get('wall_time_s', 0.0) + time.time() - start
  with open(results_path, 'w', encoding='utf-8') as f:
    json.dump(results, f, indent=2)
  return results
