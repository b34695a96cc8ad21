"""Declaration: what a network is (layers, shapes, parameters), from Python or from TOML.

Nothing here differentiates anything; :mod:`symbp.derivation` does that from the forward
definitions declared here.
"""

from . import (  # noqa: E402,F401 - registering every layer type
    attention,
    canon,
    conv,
    conv_transpose,
    custom,
    embedding,
    graph,
    layers,
    recurrent,
)
