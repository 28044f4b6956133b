"""Two processes of two CPU devices each, joined as two hosts would be.

The tests of ``initialize_distributed`` and of ``imaml-train --coordinator``
run a script as process 0 and process 1 on this machine; each gets two
forced host devices (and the child settings of ``fast_compile``) and the
coordinator's port.
"""

import os
import socket
import subprocess
import sys

import fast_compile


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def run(script: str, args_of, timeout: float) -> None:
  """Runs ``python -c script PID PORT *args_of(PID)`` for PID 0 and 1 at the
  same time; asserts that both exit with 0 (else shows their output)."""
  env = dict(
    os.environ,
    XLA_FLAGS=fast_compile.flags("--xla_force_host_platform_device_count=2"),
  )
  port = str(free_port())
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(pid), port, *map(str, args_of(pid))],
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=env,
    )
    for pid in (0, 1)
  ]
  try:
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for p, log in zip(procs, logs):
    assert p.returncode == 0, log
