"""Files generated from the registry and the contract, checked for drift by tests.

``tierdet generate`` writes them all (``--check`` reports drift instead):
Triton configs (``tierdet.build.repository``), Grafana dashboards
(``dashboards``), the Prometheus rules for compose and for Helm (``rules``),
the tables of the README and the docs site (``docs``) and the generated protobuf
code (``proto``).

May import: ``tierdet.registry``, ``tierdet.contract``, ``tierdet.build.repository``
(the configs are rendered there), ``tierdet.serving.settings`` (the settings
table is rendered from the settings model), PyYAML, and grpcio-tools for the
protobuf code.
"""
