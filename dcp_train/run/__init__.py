"""The run around the loop: preemption, orphan watch, fault points, metrics, redaction."""
