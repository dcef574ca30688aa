"""Facts about models: the one place each is written.

- ``specs``: the model registry (input size, preprocessing, published AP, weights URL);
- ``labels``: what each output slot means (COCO category ids, the shapes set);
- ``trained``: the models tierdet trains itself, their AP read from their weights' sidecars;
- ``cards``: model cards, your own detectors described in YAML (validated here);
- ``tensors``: the names of the graph's tensors and of the provenance parameters;
- ``accuracy``: evaluation records (what ``tierdet eval`` writes and the gateway reads);
- ``profile``: latency profiles (what ``tierdet profile`` writes and the router reads).

May import: the standard library, pydantic and PyYAML (model cards), and
``tierdet.contract``. Importing it must stay cheap: the gateway, the client
tools and the build all start here.
"""
