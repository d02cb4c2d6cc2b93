"""The layers of docs/architecture.md: no import points down the table,
every module belongs to a listed folder, model families import only models
and platform code, and the package's top level stays small."""

import os
import re

import pytest

from test_import_cycles import import_graph

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHITECTURE = os.path.join(REPO, 'docs', 'architecture.md')
MAX_TOP_LEVEL_MODULES = 8


def read_layers(path: str = ARCHITECTURE) -> tuple[list[str], set[str]]:
  """(layer folders, bottom first; shim modules) from the doc's table."""
  with open(path, encoding='utf-8') as f:
    text = f.read()
  folders = re.findall(r'^\| \w+ \| `tuning/(\w+)/` \|', text, re.M)
  shims_text = text.split('Command shims', 1)[-1]
  shims = {
      'tuning.' + p[: -len('.py')].replace('/', '.')
      for p in re.findall(r'`tuning/([\w/]+\.py)`', shims_text)
  }
  return folders, shims


def layer_errors(graph, folders, shims) -> list[str]:
  """Every import of a layer listed after the importer's, every module
  outside the listed folders, every shim importing beyond cli."""
  rank = {folder: i for i, folder in enumerate(folders)}
  errors = []

  def layer_of(module):
    parts = module.split('.')
    if len(parts) == 1:
      return None  # the package itself
    return parts[1] if parts[1] in rank else '?'

  for module in sorted(graph):
    if module in shims:
      bad = [d for d in graph[module] if layer_of(d) not in ('cli', None)]
      errors += [f'shim {module} imports {d}' for d in sorted(bad)]
      continue
    layer = layer_of(module)
    if layer == '?':
      errors.append(f'{module} is in no layer of docs/architecture.md')
      continue
    if layer is None:
      continue
    for dep in sorted(graph[module]):
      dep_layer = layer_of(dep)
      if dep_layer in (None, '?') or dep in shims:
        continue
      if rank[dep_layer] > rank[layer]:
        errors.append(
            f'{module} ({layer}) imports {dep} ({dep_layer}), a layer'
            ' listed after its own'
        )
  return errors


def test_no_import_points_down_the_table():
  folders, shims = read_layers()
  assert len(folders) >= 10 and 'engine' in folders  # the table was read
  assert 'tuning.generate' in shims
  assert layer_errors(import_graph(), folders, shims) == []


def test_model_families_import_only_models_and_platform():
  graph = import_graph()
  families = [m for m in graph if m.startswith('tuning.models.')]
  assert len(families) > 5
  outside = {
      (m, d)
      for m in families
      for d in graph[m]
      if d != 'tuning'
      and not d.startswith(('tuning.models', 'tuning.platform'))
  }
  assert outside == set()


def test_the_top_level_is_small():
  root = os.path.join(REPO, 'tuning')
  modules = [n for n in os.listdir(root) if n.endswith('.py')]
  assert len(modules) <= MAX_TOP_LEVEL_MODULES, sorted(modules)


def test_a_downward_import_is_found(tmp_path):
  package = tmp_path / 'tuning'
  for folder in ('low', 'high'):
    (package / folder).mkdir(parents=True)
    (package / folder / '__init__.py').write_text('')
  (package / '__init__.py').write_text('')
  (package / 'low' / 'a.py').write_text('from tuning.high import b\n')
  (package / 'high' / 'b.py').write_text('from tuning.low import c\n')
  (package / 'low' / 'c.py').write_text('')
  (package / 'stray.py').write_text('')
  errors = layer_errors(import_graph(str(package)), ['low', 'high'], set())
  after = 'a layer listed after its own'
  assert errors == [
      f'tuning.low.a (low) imports tuning.high (high), {after}',
      f'tuning.low.a (low) imports tuning.high.b (high), {after}',
      'tuning.stray is in no layer of docs/architecture.md',
  ]


@pytest.mark.parametrize('name', ['architecture.md'])
def test_the_doc_names_every_folder(name):
  folders, _ = read_layers(os.path.join(REPO, 'docs', name))
  root = os.path.join(REPO, 'tuning')
  on_disk = {
      n
      for n in os.listdir(root)
      if os.path.isdir(os.path.join(root, n)) and n != '__pycache__'
  }
  assert set(folders) == on_disk


def test_the_doc_names_every_module():
  """Every module of tuning/ is named in docs/architecture.md (its layer's
  section or the shims), and every module the doc names exists."""
  with open(ARCHITECTURE, encoding='utf-8') as f:
    named = {
        n
        for n in re.findall(r'`(tuning/[\w/]+\.py)`', f.read())
        if not n.endswith('__init__.py')
    }
  on_disk = set()
  for folder, _, files in os.walk(os.path.join(REPO, 'tuning')):
    for name in files:
      if name.endswith('.py') and name != '__init__.py':
        on_disk.add(os.path.relpath(os.path.join(folder, name), REPO))
  assert sorted(on_disk - named) == [], 'modules the doc does not name'
  assert sorted(named - on_disk) == [], 'the doc names modules not on disk'
