"""Fault injection for sparsetune processes started by the tests (never imported by sparsetune itself).

A test puts this folder on PYTHONPATH (`tests.e2e_helpers.child_env(hooks=True, ...)`); Python imports
`sitecustomize` at start-up in every process, the `accelerate launch` workers included, and the variables below
place a fault exactly:

  SPARSETUNE_TEST_PREEMPT_AT_STEP=k   behave as if SIGTERM arrived during step k (on every rank)
  SPARSETUNE_TEST_KILL_IN_SAVE=k      SIGKILL the process half-way through writing checkpoint k (after the model)
"""

import os

if os.environ.get("SPARSETUNE_TEST_PREEMPT_AT_STEP"):
    from sparsetune.training import preemption

    _stop_at = int(os.environ["SPARSETUNE_TEST_PREEMPT_AT_STEP"])
    _should_stop = preemption.PreemptionGuard.should_stop

    def should_stop(self, step: int) -> bool:
        if step == _stop_at and not self.requested:
            self.requested, self.signal_name = True, "SIGTERM (test hook)"
        return _should_stop(self, step)

    preemption.PreemptionGuard.should_stop = should_stop

if os.environ.get("SPARSETUNE_TEST_KILL_IN_SAVE"):
    import signal

    from sparsetune.training import engines

    _kill_at = f"step-{int(os.environ['SPARSETUNE_TEST_KILL_IN_SAVE']):08d}"
    _save_state = engines.Engine.save_state

    def save_state(self, model, optimizer, folder):
        _save_state(self, model, optimizer, folder)
        if folder.name.endswith(_kill_at):
            os.kill(os.getpid(), signal.SIGKILL)

    engines.Engine.save_state = save_state

if os.environ.get("SPARSETUNE_TEST_SIGNAL") or os.environ.get("SPARSETUNE_TEST_PAUSE"):
    import fault_points  # tests/hooks/fault_points.py: real signals and pauses at a phase of the run

    fault_points.install_from_env()
