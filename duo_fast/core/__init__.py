"""The lowest layer: what every other layer shares and nothing of duo_fast above it.

``devices`` (``--device`` and GPU peak figures), ``hostsync`` (reading a CPU tensor on purpose;
counting host round trips in tests), ``options`` (config fields that carry their help text),
``noise_schedule`` (``alpha(t)`` schedules, Gaussian coefficients), ``draws`` (Exp(1) draws with
exact tails, stratified times, the forward process ``q_t``) and ``seeds`` (the per-micro-batch
seed of ``(seed, step, slot)``).

May import: nothing of duo_fast outside ``duo_fast.core``.
"""
