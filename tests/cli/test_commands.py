"""Every command's command line (tuning/cli/flags.py): absl flags, the shared
--checkpoint/--step, main.py's process settings, and one error line with
its exit code (2: the command line, 1: the command)."""

import json

import pytest

from tuning.cli import convert
from tuning.cli import export
from tuning.cli import flags as cli_flags
from tuning.cli import generate
from tuning.cli import sweep
from tuning.cli import to_records
from tuning.cli import translate

# Each command with the flags it needs to get past its required ones.
COMMANDS = {
    'convert': (convert.main, ['--source=x', '--out=y']),
    'export': (
        export.main,
        ['--checkpoint=x', '--format=hf', '--out=y'],
    ),
    'generate': (generate.main, []),
    'sweep': (sweep.main, ['--workdir=x']),
    'to_records': (to_records.main, []),
    'translate': (translate.main, []),
}


def one_error_line(capfd) -> str:
  err = capfd.readouterr().err
  assert err.count('\n') == 1 and err.startswith('error: '), err
  return err


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_a_mistyped_flag_is_one_line_and_exit_code_2(name, capfd):
  main, needed = COMMANDS[name]
  assert main(needed + ['--no_such_flag=1']) == 2
  err = one_error_line(capfd)
  assert 'no_such_flag' in err and '--help lists the flags' in err


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_arguments_that_are_not_flags_are_one_line(name, capfd):
  main, needed = COMMANDS[name]
  assert main(needed + ['stray']) == 2
  assert 'unexpected arguments: stray' in one_error_line(capfd)


@pytest.mark.parametrize('name', sorted(COMMANDS))
def test_every_command_takes_the_process_flags(name, capfd):
  main, needed = COMMANDS[name]
  assert main(needed + ['--xla_cpu_dots=fast']) == 2
  assert 'flag --xla_cpu_dots=fast' in one_error_line(capfd)
  assert main(['--help']) == 0
  out = capfd.readouterr().out
  assert '--malloc' in out and '--xla_cpu_dots' in out


@pytest.mark.parametrize(
    'main, other',
    [
        (generate.main, ['--prompt=x']),
        (translate.main, ['--input=src.txt']),
        (export.main, ['--format=hf', '--out=exported']),
    ],
)
def test_the_run_readers_share_checkpoint_and_step(
    main, other, tmp_path, monkeypatch, capfd
):
  for define in (
      generate.define_flags,
      translate.define_flags,
      export.define_flags,
  ):
    fv = cli_flags.flags.FlagValues()
    define(fv)
    assert fv['step'].help == cli_flags.STEP_HELP
    assert "or a run's work directory" in fv['checkpoint'].help
  run = tmp_path / 'run'  # a run's config.json, read up to --step
  run.mkdir()
  (run / 'config.json').write_text(
      json.dumps({'task': 'causal_lm', 'model': {}, 'training': {}})
  )
  (tmp_path / 'src.txt').write_text('ein Hund\n')
  monkeypatch.chdir(tmp_path)
  assert main([f'--checkpoint={run}', '--step=last', *other]) == 2
  assert one_error_line(capfd) == (
      "error: --step='last': use best, latest or a step number\n"
  )


def test_an_error_of_this_project_is_its_message(capfd):
  """The project's own error classes speak for themselves; Python's keep
  their name (tuning/terminal/errors.py's describe)."""
  assert cli_flags.error_line(cli_flags.UsageError('bad')) == 'bad'
  assert cli_flags.error_line(ValueError('bad')) == 'ValueError: bad'
  assert sweep.main(['--workdir=x', '--config.training.steps=1']) == 2
  assert one_error_line(capfd).startswith('error: --config=')
