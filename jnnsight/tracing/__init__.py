"""The pipeline of a trace, one module per step.

capture -> collate -> discover -> program -> schedule -> execute -> resolve,
orchestrated by :mod:`jnnsight.tracing.tracer`. Nothing here imports upward.
"""
