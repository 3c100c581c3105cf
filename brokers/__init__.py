"""The fog broker that sits between masters and workers.

:class:`FogBroker` routes tasks from masters to free worker slots and replies
back, without decoding tensors; :func:`serve` runs one in its own process
until SIGINT or SIGTERM. See :mod:`brokers.fog` for the frames each socket
carries.
"""

from brokers.fog import BrokerConfig, FogBroker, serve

__all__ = ["BrokerConfig", "FogBroker", "serve"]
