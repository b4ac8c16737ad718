"""The on-device runtime's one error hierarchy: everything the bundle, store and recommender refuse derives from
:class:`DeviceRuntimeError`, so an app can catch one type (and tell the kinds apart when it needs to)::

    DeviceRuntimeError
    |-- BundleError          (shared_model.protocol.bundle: signature, tampered file, format)
    |-- StoreError           (client_sdk.store: wrong key or tampered, corrupt, in use, unsupported version)
    `-- RuntimeInputError    (client_sdk.runtime: also a ValueError; unknown item, out-of-order event,
                              incompatible store, bad timestamp, k or option)

Each is raised before anything changes: the bundle in use, the store and the history stay as they were.
"""

from __future__ import annotations


class DeviceRuntimeError(Exception):
    """Base of every error the on-device runtime (bundle, store, recommender) raises on purpose."""
