"""The flow's audit-log wiring, at the path dataflows/outputs.py imports until its writers
move to sinks/; the access audit itself is ``ops.privacy.audit``."""

from ops.privacy.audit import hash_key, open_audit

__all__ = ["hash_key", "open_audit"]
