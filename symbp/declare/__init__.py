"""Declaration: what a network is (layers, shapes, parameters), from Python or from TOML.

Nothing here differentiates anything; :mod:`symbp.derivation` does that from the forward
definitions declared here.
"""

from . import (  # noqa: E402,F401 - registering every layer type
    attention,  # noqa: E402,F401 - registered after the others (their order stays)
    canon,
    conv,
    custom,
    layers,
)
