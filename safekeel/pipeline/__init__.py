"""The one pipeline every fine-tune runs through (CLI, service, benchmark): safekeel.pipeline.run."""

from safekeel.pipeline.run import Cancelled, DataRejected, PipelineResult, load_user_data, run_pipeline
from safekeel.pipeline.spec import AuditSpec, DataGateSpec, GateSpec, GuardSpec, JobSpec, MethodSpec

__all__ = ["AuditSpec", "Cancelled", "DataGateSpec", "DataRejected", "GateSpec", "GuardSpec", "JobSpec", "MethodSpec", "PipelineResult", "load_user_data", "run_pipeline"]
