"""Custom ops. ``bt_xcorr_loss`` dispatches to the C++/CUDA extension when it is built (see csrc/)."""

from ilm_dist.ops._extension import extension_available
from ilm_dist.ops.reference import bt_xcorr_loss_reference
from ilm_dist.ops.xcorr import Impl, bt_xcorr_loss, bt_xcorr_loss_global, check_extension

__all__ = [
    "Impl",
    "bt_xcorr_loss",
    "bt_xcorr_loss_global",
    "bt_xcorr_loss_reference",
    "check_extension",
    "extension_available",
]
