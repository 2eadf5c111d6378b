"""The engine core (docs/architecture.md): the reference interpreter and loop
(:mod:`~llmqueue.core.engine`, :mod:`~llmqueue.core.loop`) and the compiled core
(:mod:`~llmqueue.core.fastcore` over ``_fastcore.c``) that run every policy's plan, and the
entry points on top of them: :func:`~llmqueue.core.simulator.simulate` (one run),
:func:`~llmqueue.core.stream.simulate_stream` (no records) and :class:`~llmqueue.core.stepper.Stepper`
(advanced piecewise)."""
