"""sparse-zmq: split deep learning pipelines across edge, fog and cloud.

The library shared by every role of a pipeline:

* :mod:`sparse_zmq.protocol` and :mod:`sparse_zmq.codec`: the wire format;
* :mod:`sparse_zmq.master`: offload tasks to a broker and match replies;
* :mod:`sparse_zmq.stage`: run a partition as a worker of a broker;
* :mod:`sparse_zmq.monitor`: the per-node sidecar that writes the CSVs;
* :mod:`sparse_zmq.launch` and :mod:`sparse_zmq.cli`: start roles and suites.

The fog broker lives in the top-level ``brokers`` package, the applications
(models, split-learning stages, data sources) in ``stages``.
"""

from sparse_zmq.errors import (
    ConfigError,
    DataError,
    ProtocolError,
    RemoteError,
    SparseError,
    TaskTimeout,
)

__all__ = [
    "ConfigError",
    "DataError",
    "ProtocolError",
    "RemoteError",
    "SparseError",
    "TaskTimeout",
    "__version__",
]

__version__ = "0.1.0"
