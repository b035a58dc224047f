"""What every stage flow shares: its upstream artifacts as parameters (Prefect draws the pipeline's DAG from
them), a `Cached` state for a reused artifact, and a failed stage's MLflow run closed as FAILED."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

from prefect.states import Completed, State
from prefect.utilities.engine import RunType, link_state_to_result

from dalle_core.config import Config
from storage.tracking import one_line_error
from tasks.common import ArtifactRef, StagePlan
from tasks.pipeline import check_inputs, fail_stage_run

Inputs = dict[str, ArtifactRef] | None  # the upstream artifacts a stage flow reads, by pipeline stage


def finished(ref: ArtifactRef) -> ArtifactRef | State:
    """A stage flow's return value: a reused artifact ends the flow run as `Cached` (a Completed state), so
    the Prefect run graph shows at a glance what was reused and what ran."""
    if ref.cached:
        return Completed(name="Cached", message=f"reused {ref.stage}/{ref.key}", data=ref)
    return ref


def run_stage(stage_flow: Callable, *args, inputs: dict[str, ArtifactRef], **kwargs) -> ArtifactRef:
    """Call a stage subflow and return its artifact, linked to the subflow run so that a later stage given
    this artifact as a parameter gets an edge from this stage in Prefect's run graph (a flow that
    ends in a named state such as `Cached` is not linked by Prefect itself)."""
    state = stage_flow(*args, inputs=inputs, return_state=True, **kwargs)
    ref = state.result()
    link_state_to_result(state, ref, RunType.FLOW_RUN)
    return ref


@contextlib.contextmanager
def failing_run(cfg: Config, plan: StagePlan) -> Iterator[None]:
    """Work reporting to a stage run opened by an earlier task: an error marks the run FAILED, with the error,
    and ends the stage's claim."""
    try:
        yield
    except BaseException as err:
        plan.abandon(cfg)  # another run may redo the stage
        if plan.run_id:
            fail_stage_run(cfg, plan.run_id, one_line_error(err))
        raise


__all__ = ["Inputs", "check_inputs", "failing_run", "finished", "run_stage"]
