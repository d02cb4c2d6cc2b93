"""The regexes that name parts of a model: its head, the Dense layers LoRA
adapts and the layer index that layer-wise LR decay reads.

`config.optimizer.head`, `config.lora.targets` and
`config.optimizer.layer_index_regex` default to None, meaning the model
family's (`Family.head_regex`, `lora_targets`, `layer_regex`); a value the
user sets wins. This module is the one place that resolves them.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

from tuning.models import registry
from tuning.models.family import Family


@dataclasses.dataclass(frozen=True)
class NamingRules:
  """Effective regexes over `/`-joined parameter (or module) paths."""

  head: tuple[str, ...]
  lora_targets: tuple[str, ...]
  layer_regex: str


def resolve(
    model_family: Optional[Family], opt_config=None, lora_config=None
) -> NamingRules:
  """The user's values in `opt_config`/`lora_config` where set (not None),
  else `model_family`'s; `model_family=None` stands for a family that
  declares nothing (the defaults in tuning/models/family.py)."""
  fallback = model_family or _UNDECLARED

  def user(sub_config, field):
    return None if sub_config is None else sub_config.get(field, None)

  head = user(opt_config, 'head')
  targets = user(lora_config, 'targets')
  layer_regex = user(opt_config, 'layer_index_regex')
  return NamingRules(
      head=tuple(fallback.head_regex if head is None else head),
      lora_targets=tuple(fallback.lora_targets if targets is None else targets),
      layer_regex=fallback.layer_regex if layer_regex is None else layer_regex,
  )


def naming_rules(config) -> NamingRules:
  """The effective naming rules of a run's config: the user's where set,
  else those of the family of `config.model.name`."""
  return resolve(
      registry.family(config.model.name),
      config.get('optimizer'),
      config.get('lora'),
  )


# A family that declares no naming rules of its own: family.py's defaults.
_UNDECLARED = Family(names=(), build=None)
