"""The workdir: the per-epoch metrics file survives a kill mid-line."""

from jaxtransfer.workdir import Workdir


def test_metrics_lines_survive_a_killed_writer(tmp_path):
  workdir = Workdir(str(tmp_path))
  assert workdir.read_metrics() == []
  workdir.append_metrics([{'run': 'a', 'epoch': 1, 'loss': 2.0},
                          {'run': 'b', 'epoch': 1, 'loss': 3.0}])
  with open(workdir.file('metrics.jsonl'), 'a') as f:
    f.write('{"run": "a", "epoch": 2, "lo')  # a kill in the middle of a write
  assert sorted(r['run'] for r in workdir.read_metrics()) == ['a', 'b']
  # The stack is retrained after the kill: its records come again and the last ones count.
  workdir.append_metrics([{'run': 'a', 'epoch': 1, 'loss': 1.5},
                          {'run': 'a', 'epoch': 2, 'loss': 1.0}])
  records = {(r['run'], r['epoch']): r['loss'] for r in workdir.read_metrics()}
  assert records == {('a', 1): 1.5, ('b', 1): 3.0, ('a', 2): 1.0}
  lines = open(workdir.file('metrics.jsonl')).read().split('\n')
  assert lines[2] == '{"run": "a", "epoch": 2, "lo' and len(lines) == 6 and lines[-1] == ''
