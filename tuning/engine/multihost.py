"""Starting JAX's distributed runtime from flags or the environment.

On Cloud TPU (and under SLURM) `jax.distributed.initialize()` finds the
coordinator by itself: pass `--distributed`. Elsewhere give the coordinator
address, the number of processes and this process's id.
"""

from absl import flags
import jax

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_string(
      'coordinator_address',
      None,
      'host:port of process 0, for multi-process runs.',
  )
  flags.DEFINE_integer('num_processes', None, 'Number of processes.')
  flags.DEFINE_integer('process_id', None, 'This process (0..n-1).')
  flags.DEFINE_bool(
      'distributed',
      False,
      'Call jax.distributed.initialize() with auto-detection '
      '(Cloud TPU VMs, SLURM).',
  )


def initialize_from_flags():
  if FLAGS.coordinator_address:
    if FLAGS.num_processes is None or FLAGS.process_id is None:
      raise flags.ValidationError(
          '--coordinator_address needs ' '--num_processes and --process_id'
      )
    jax.distributed.initialize(
        FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  elif FLAGS.distributed:
    jax.distributed.initialize()
