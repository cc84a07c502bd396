"""The package as a whole: no import cycles, one code style."""

import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'jaxtransfer')


def imports_of(path: str) -> set[str]:
  """The jaxtransfer modules that `path` imports, at any depth (lazy imports count too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and node.module == 'jaxtransfer':
      out |= {alias.name for alias in node.names}
    elif isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jaxtransfer.'):
      out.add(node.module.split('.')[1])
    elif isinstance(node, ast.Import):
      out |= {a.name.split('.')[1] for a in node.names if a.name.startswith('jaxtransfer.')}
  return out


def test_no_import_cycles():
  graph = {
      name[:-3]: imports_of(os.path.join(PACKAGE, name))
      for name in os.listdir(PACKAGE)
      if name.endswith('.py') and name != '__init__.py'
  }
  state = {}  # module -> 'visiting' | 'done'

  def visit(module, path):
    if state.get(module) == 'visiting':
      raise AssertionError('import cycle: ' + ' -> '.join(path + [module]))
    if state.get(module) != 'done':
      state[module] = 'visiting'
      for dep in sorted(graph.get(module, ())):
        visit(dep, path + [module])
      state[module] = 'done'

  for module in sorted(graph):
    visit(module, [])
  assert {'plan', 'workdir', 'study', 'train', 'similarity', 'campaigns', 'data'} <= set(graph)


def test_code_is_formatted():
  """yapf, as configured in pyproject.toml, leaves every file as it is."""
  proc = subprocess.run([
      sys.executable, '-m', 'yapf', '--diff', '--recursive', 'jaxtransfer', 'experiments', 'tests',
      'benchmarks'
  ], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[:3000] + proc.stderr[-1000:]
