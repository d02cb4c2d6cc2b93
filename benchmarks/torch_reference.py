"""PyTorch's MiniLM steps for the benchmarks (no JAX imported here, so that
a child process measuring PyTorch's memory holds PyTorch alone)."""

import time


def peak_matmul_flops(n: int = 2048) -> float | None:
  """A 2048^2 float32 matmul in PyTorch (its oneDNN/MKL kernels)."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  a = torch.ones((n, n), dtype=torch.float32)
  for _ in range(2):
    a @ a  # pylint: disable=pointless-statement
  start = time.perf_counter()
  for _ in range(5):
    a @ a  # pylint: disable=pointless-statement
  return 2 * n**3 / ((time.perf_counter() - start) / 5)


def autocast(bf16: bool):
  """PyTorch's mixed precision on CPU (float32 weights and optimizer,
  bfloat16 matmuls) where `bf16`, else a context that does nothing."""
  import torch  # pylint: disable=g-import-not-at-top

  return torch.autocast('cpu', dtype=torch.bfloat16, enabled=bf16)


def steps(model_dir: str, batch: int, length: int, dtype: str = 'float32'):
  """(train_once, eval_once, torch version, threads) on random token ids,
  or None without torch/transformers. train_once: forward, backward,
  global-norm clipping at 1, AdamW (lr 1e-4, weight decay 0.01), dropout
  0.1: the step of experiments/minilm_sst2.py. `dtype='bfloat16'`: the
  forward passes under `torch.autocast('cpu', torch.bfloat16)`, PyTorch's
  mixed precision (float32 weights and optimizer, bfloat16 matmuls)."""
  try:
    # pylint: disable=g-import-not-at-top
    import torch
    import transformers
  except ImportError:
    return None
  torch.manual_seed(0)
  config = transformers.BertConfig.from_pretrained(
      model_dir, num_labels=2, hidden_dropout_prob=0.1
  )
  model = transformers.BertForSequenceClassification.from_pretrained(
      model_dir, config=config
  )
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01)
  ids = torch.randint(1000, 20000, (batch, length))
  mask = torch.ones_like(ids)
  labels = torch.randint(0, 2, (batch,))
  bf16 = dtype == 'bfloat16'

  def train_once():
    model.train()
    with autocast(bf16):
      out = model(input_ids=ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad()
    return out.loss.item()

  def eval_once():
    model.eval()
    with torch.no_grad(), autocast(bf16):
      return model(input_ids=ids, attention_mask=mask).logits.sum().item()

  return train_once, eval_once, torch.__version__, torch.get_num_threads()
