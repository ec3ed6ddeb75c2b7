"""Dataset audit: how far a user's dataset sits from harmful and from safe reference data."""

from safekeel.audit.shift import AuditReport, audit_dataset

__all__ = ["AuditReport", "audit_dataset"]
