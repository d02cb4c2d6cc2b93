"""Loading experiment configs, with one-line errors for bad input.

ml_collections' config flags raise a raw `AttributeError` traceback for a
mistyped override and defer a missing config file to the first access.
`check_config_flags(argv)` looks at the command line first and turns each
such problem into one line naming the problem and its fix.
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import re

from ml_collections import config_dict

from tuning.platform import process_flags


class ConfigError(ValueError):
  """A bad config file, argument or override, worded for the user."""


def load_config_file(spec: str) -> config_dict.ConfigDict:
  """Loads 'path/to/exp.py[:arg]' by calling its `get_config(arg)`."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    here = os.path.dirname(path) or '.'
    options = (
        sorted(f for f in os.listdir(here) if f.endswith('.py'))
        if os.path.isdir(here)
        else []
    )
    hint = difflib.get_close_matches(os.path.basename(path), options, 1)
    raise ConfigError(
        f'config file not found: {path}'
        + (
            f' (did you mean {os.path.join(here, hint[0])}?)'
            if hint
            else ' (pass --config=experiments/<name>.py)'
        )
    )
  module_spec = importlib.util.spec_from_file_location(
      'experiment_config', path
  )
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:  # the user's file: report it in one line
    raise ConfigError(
        f'{path} failed to load: {type(e).__name__}: {e}'
    ) from None
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} has no get_config(arg=None) function')
  try:
    config = module.get_config(arg) if arg else module.get_config()
  except Exception as e:  # get_config rejecting its argument
    raise ConfigError(
        f'{path}: get_config({arg!r}) failed: ' f'{type(e).__name__}: {e}'
    ) from None
  for field in process_flags.MOVED_CONFIG_FIELDS:
    if field in config:
      raise ConfigError(
          f'{path}: {process_flags.moved_config_field_error(field)}; '
          'remove it from the config and give the flag'
      )
  return config


def all_paths(config, prefix: str = '') -> list[str]:
  """Every dotted field path of a (nested) ConfigDict."""
  paths = []
  for key in config.keys():
    value = config[key]
    path = f'{prefix}{key}'
    paths.append(path)
    if isinstance(value, config_dict.ConfigDict):
      paths.extend(all_paths(value, path + '.'))
  return paths


def check_override(config, dotted: str):
  """Raises ConfigError naming the closest valid key for an unknown path."""
  moved = process_flags.moved_config_field_error(dotted)
  if moved:
    raise ConfigError(f'--{moved}')
  node = config
  parts = dotted.split('.')
  for i, part in enumerate(parts):
    if not isinstance(node, config_dict.ConfigDict) or part not in node:
      where = '.'.join(parts[:i])
      siblings = (
          list(node.keys()) if isinstance(node, config_dict.ConfigDict) else []
      )
      close = difflib.get_close_matches(part, siblings, n=1, cutoff=0.3)
      if close:
        suggestion = '.'.join(parts[:i] + close)
      else:
        close = difflib.get_close_matches(
            dotted, all_paths(config), n=1, cutoff=0.5
        )
        suggestion = close[0] if close else None
      hint = f'; did you mean --config.{suggestion}?' if suggestion else ''
      raise ConfigError(
          f'unknown config key --config.{dotted} ({part!r} is '
          f'not a field of {where or "the config"}){hint}'
      )
    node = node[part]


def check_config_flags(
    argv: list[str], default_spec: str, flag: str = 'config'
):
  """Validates --config and every --config.a.b override in `argv`."""
  spec = default_spec
  overrides = []
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith(f'--{flag}='):
      spec = arg.split('=', 1)[1]
    elif arg == f'--{flag}' and i + 1 < len(argv):
      spec = argv[i + 1]
    elif arg.startswith(f'--{flag}.'):
      overrides.append(arg[len(flag) + 3 :].split('=', 1)[0])
  config = load_config_file(spec)
  for dotted in overrides:
    check_override(config, dotted)
  return config


def parse_config_flags(
    argv: list[str], default_spec: str, flag: str = 'config'
):
  """The config with every --config.a.b=value of `argv` applied.

  Parses with ml_collections' own parser (as main.py's flags do), on flags
  of its own, so that a value of the wrong type is one line naming the
  field, its type and the value, not absl's two-line fatal error.
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  base = check_config_flags(argv, default_spec, flag)
  mine = [argv[0]]
  for i, arg in enumerate(argv[1:], start=1):
    if arg.startswith((f'--{flag}=', f'--{flag}.', f'--no{flag}.')):
      mine.append(arg)
    elif arg == f'--{flag}' or (
        arg.startswith(f'--{flag}.') and '=' not in arg
    ):
      mine.extend(argv[i : i + 2])
  values = flags.FlagValues()
  holder = config_flags.DEFINE_config_file(
      flag, default_spec, flag_values=values, lock_config=True, sys_argv=mine
  )
  try:
    values(mine)
  except flags.Error as e:
    raise ConfigError(_flag_error_text(str(e), base)) from None
  return holder.value


def _flag_error_text(text: str, config) -> str:
  """absl's 'flag --config.a=v: why' as one line with the field's type."""
  from ml_collections.config_flags import config_path  # pylint: disable=g-import-not-at-top

  text = ' '.join(text.split())
  match = re.match(r'flag --[\w.]+?\.([\w.]+)=(.*?): (.*)', text)
  if not match:
    return text + ' (python main.py --helpfull lists the flags)'
  field, value, why = match.groups()
  try:
    kind = getattr(config_path.get_type(field, config), '__name__', None)
  except Exception:  # pylint: disable=broad-except
    kind = None
  typed = f' (config.{field} is {_a(kind)})' if kind else ''
  return (
      f'bad value {value!r} for --config.{field}: {why}{typed}; give a '
      'value of that type'
  )


def _a(kind: str) -> str:
  return f'an {kind}' if kind[0] in 'aeiou' else f'a {kind}'
