"""Chat templates: the jinja2 programs that turn messages into a prompt.

Models tuned for chat store a template (tokenizer_config.json's
`chat_template`, or a GGUF file's `tokenizer.chat_template`). `render` runs
it the way transformers' `apply_chat_template` does: a sandboxed jinja2
environment with `trim_blocks`, `lstrip_blocks`, loop controls, a `tojson`
filter and `raise_exception`.

    text = render(template, [{'role': 'user', 'content': 'Hi'}],
                  add_generation_prompt=True, bos_token='<s>')
"""

from __future__ import annotations

import functools
import json
from typing import Any, Sequence


@functools.lru_cache(maxsize=8)
def _compile(template: str):
  try:
    import jinja2  # pylint: disable=g-import-not-at-top
    import jinja2.ext  # pylint: disable=g-import-not-at-top
    from jinja2 import sandbox  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ValueError(
        'chat templates need jinja2: pip install jinja2, or '
        'pass --nochat for raw prompts'
    ) from None

  def raise_exception(message):
    raise ValueError(f'chat template: {message}')

  env = sandbox.ImmutableSandboxedEnvironment(
      trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
  )
  env.filters['tojson'] = lambda x, indent=None, **_: json.dumps(
      x, ensure_ascii=False, indent=indent
  )
  env.globals['raise_exception'] = raise_exception
  try:
    return env.from_string(template)
  except jinja2.TemplateSyntaxError as e:
    raise ValueError(f'the chat template does not parse: {e}') from None


def render(
    template: str,
    messages: Sequence[dict[str, Any]],
    *,
    add_generation_prompt: bool = True,
    **special_tokens,
) -> str:
  """The prompt text for `messages` ({'role', 'content'} dicts)."""
  return _compile(template).render(
      messages=list(messages),
      add_generation_prompt=add_generation_prompt,
      **special_tokens,
  )
