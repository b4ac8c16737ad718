"""The error classes an app catches, in one import: :class:`DeviceRuntimeError` is the base of every refusal
of the on-device runtime (the hierarchy: :mod:`shared_model.protocol.errors`)."""

from shared_model.protocol.bundle import BundleError, BundleFormatError, BundleSignatureError, BundleTampered
from shared_model.protocol.errors import DeviceRuntimeError

__all__ = ["BundleError", "BundleFormatError", "BundleSignatureError", "BundleTampered", "DeviceRuntimeError"]
