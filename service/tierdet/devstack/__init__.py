"""The whole stack on one machine, for ``tierdet up``, the tests and the benchmarks.

``triton`` runs the ``nvidia-pytriton`` wheel's tritonserver as a child;
``stack`` is the one launcher (Triton with built models, gateway processes,
free ports, waiting until ready); ``up`` is ``tierdet up``: build what is
missing, supervise Triton, serve in-process; ``profiling`` measures latency
per model and batch size through Triton (``tierdet profile``).

May import anything below it: ``tierdet.build``, ``tierdet.frontends``,
``tierdet.serving``, ``tierdet.registry``; numpy, and ``pytriton`` (where its
wheel keeps the tritonserver binary).
"""
