"""When a test worker frees its compiled programs."""


def _map_limit() -> int:
  try:
    with open("/proc/sys/vm/max_map_count") as f:
      return int(f.read())
  except (OSError, ValueError):
    return 65530


# Compiled programs are released once a worker holds half the kernel's limit on
# memory mappings (below), not after every module: releasing also drops every
# traced and compiled function, which later modules would trace and compile again.
_MAP_BUDGET = _map_limit() // 2


def release_if_many_mappings() -> bool:
  """Frees every compiled executable when this process maps many memory regions.

  XLA:CPU maps memory for each executable it JITs; a whole-suite worker
  process otherwise accumulates tens of thousands of mappings and hits the
  kernel's vm.max_map_count (65 530 by default), where compilation aborts or
  segfaults (seen as "worker crashed" under pytest-xdist). Where the count
  cannot be read (no /proc), it frees every time. Returns whether it freed.
  """
  try:
    with open("/proc/self/maps", "rb") as f:
      if sum(1 for _ in f) < _MAP_BUDGET:
        return False
  except OSError:
    pass
  import gc  # pylint: disable=g-import-not-at-top

  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()
  gc.collect()
  return True
