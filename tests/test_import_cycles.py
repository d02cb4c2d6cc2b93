"""No import cycle among the modules of `tuning/` (imports inside
functions count too: they hide a cycle, they do not remove it)."""

import ast
import os

ROOT = os.path.join(os.path.dirname(os.path.dirname(__file__)), 'tuning')


def _module_name(path: str, root: str) -> str:
  relative = os.path.relpath(path, os.path.dirname(root))
  return relative[:-3].replace(os.sep, '.').removesuffix('.__init__')


def import_graph(root: str = ROOT) -> dict[str, set[str]]:
  """{module: the package modules it imports}; importing `a.b.c` also
  runs the packages `a.b` and `a`."""
  paths = {}
  for directory, _, files in os.walk(root):
    for name in files:
      if name.endswith('.py'):
        path = os.path.join(directory, name)
        paths[_module_name(path, root)] = path
  graph = {m: set() for m in paths}
  for module, path in paths.items():
    with open(path, encoding='utf-8') as f:
      tree = ast.parse(f.read())
    package = (
        module if path.endswith('__init__.py') else module.rpartition('.')[0]
    )
    for node in ast.walk(tree):
      names = []
      if isinstance(node, ast.Import):
        names = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          parts = package.split('.')
          parts = parts[: len(parts) - node.level + 1]
          base = '.'.join(parts + ([base] if base else []))
        names = [f'{base}.{a.name}' for a in node.names] + [base]
      for name in names:
        parts = name.split('.')
        for i in range(1, len(parts) + 1):
          target = '.'.join(parts[:i])
          if (
              target in graph
              and target != module
              and not module.startswith(target + '.')
          ):
            graph[module].add(target)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, found = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        found.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return found


def test_no_import_cycle_in_tuning():
  graph = import_graph()
  assert len(graph) > 30  # the package was found
  assert cycles(graph) == []


def test_a_cycle_is_found(tmp_path):
  package = tmp_path / 'tuning'
  package.mkdir()
  (package / '__init__.py').write_text('')
  (package / 'a.py').write_text('def f():\n  from tuning import b\n')
  (package / 'b.py').write_text('from tuning.a import f\n')
  (package / 'c.py').write_text('import tuning.a\n')
  assert cycles(import_graph(str(package))) == [['tuning.a', 'tuning.b']]
