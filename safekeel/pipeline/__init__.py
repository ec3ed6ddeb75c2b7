"""The one pipeline every fine-tune runs through (CLI, service, benchmark): safekeel.pipeline.run."""

from safekeel.pipeline.run import Cancelled, PipelineResult, load_user_data, run_pipeline
from safekeel.pipeline.spec import GateSpec, GuardSpec, JobSpec

__all__ = ["Cancelled", "GateSpec", "GuardSpec", "JobSpec", "PipelineResult", "load_user_data", "run_pipeline"]
