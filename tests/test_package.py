"""The package as a whole: imports only go down its floors, no import cycles, one code style."""

import ast
import os
import subprocess
import sys

from tests.conftest import ROOT

PACKAGE = os.path.join(ROOT, 'jaxtransfer')
# The architecture, lowest floor first: a module imports from its own floor or below, never up.
FLOORS = (
    ('conditions', 'config', 'errors', 'files'),  # facts and the schema: no JAX
    ('data',),  # datasets as arrays
    ('transfer', 'nets'),  # parameter pytrees, the networks
    ('train',),  # the stacked trainer
    ('analysis',),  # rows, statistics, report, figures
    ('study',),  # running studies on a workdir
)
FLOOR = {unit: i for i, units in enumerate(FLOORS) for unit in units}


def modules() -> dict[str, str]:
  """Dotted module name -> path, for every module of the package but its `__init__`s."""
  out = {}
  for folder, _, names in os.walk(PACKAGE):
    for name in names:
      if name.endswith('.py') and name != '__init__.py':
        rel = os.path.relpath(os.path.join(folder, name[:-3]), ROOT)
        out[rel.replace(os.sep, '.')] = os.path.join(folder, name)
  return out


def imports_of(path: str, known: set[str]) -> set[str]:
  """The package's modules that `path` imports, at any depth (lazy imports count too)."""
  out = set()
  for node in ast.walk(ast.parse(open(path).read())):
    if isinstance(node, ast.ImportFrom) and (node.module or '').startswith('jaxtransfer'):
      for alias in node.names:
        full = f'{node.module}.{alias.name}'
        out.add(full if full in known else node.module)
    elif isinstance(node, ast.Import):
      out |= {a.name for a in node.names if a.name.startswith('jaxtransfer.')}
  return out


def unit(module: str) -> str:
  """The floor unit of a module: its subpackage or, at the top, itself."""
  return module.split('.')[1]


def graph() -> dict[str, set[str]]:
  mods = modules()
  return {name: imports_of(path, set(mods)) for name, path in mods.items()}


def test_every_module_has_a_floor():
  assert {unit(m) for m in modules()} == set(FLOOR)


def test_imports_go_down():
  upward = [
      f'{m} imports {dep}' for m, deps in graph().items() for dep in deps
      if dep != 'jaxtransfer' and FLOOR[unit(dep)] > FLOOR[unit(m)]
  ]
  assert not upward, upward


def test_no_import_cycles():
  deps = graph()
  state = {}  # module -> 'visiting' | 'done'

  def visit(module, path):
    if state.get(module) == 'visiting':
      raise AssertionError('import cycle: ' + ' -> '.join(path + [module]))
    if state.get(module) != 'done':
      state[module] = 'visiting'
      for dep in sorted(deps.get(module, ())):
        visit(dep, path + [module])
      state[module] = 'done'

  for module in sorted(deps):
    visit(module, [])


def test_code_is_formatted():
  """yapf, as configured in pyproject.toml, leaves every file as it is (files in parallel: 15 s
  alone, 7 s on two cores)."""
  proc = subprocess.run([
      sys.executable, '-m', 'yapf', '--diff', '--parallel', '--recursive', 'jaxtransfer',
      'experiments', 'tests', 'benchmarks'
  ], cwd=ROOT, capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout[:3000] + proc.stderr[-1000:]
