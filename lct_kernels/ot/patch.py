"""Route torchcfm's own OT sampler through lct_kernels: patch_torchcfm / unpatch_torchcfm.

torchcfm builds its sampler by name: ``ExactOptimalTransportConditionalFlowMatcher``
(and the Schrödinger-bridge and target matchers) call ``OTPlanSampler(...)`` from
``torchcfm.conditional_flow_matching``'s globals, which imported it from
``torchcfm.optimal_transport``.  ``patch_torchcfm`` rebinds that name, in every
loaded ``torchcfm.*`` module that holds torchcfm's class, to
``lct_kernels.ot.OTPlanSampler`` (same constructor and methods; "exact" with
equal batch sizes on our solvers, everything else delegated to POT as torchcfm
does).  Samplers built before the call, and names a user imported into their
own module (``from torchcfm.optimal_transport import OTPlanSampler``) before it,
keep torchcfm's class; for those, assign ``cfm.ot_sampler = OTPlanSampler("exact")``.
"""

import importlib
import sys

from .sampler import OTPlanSampler

_NAME = "OTPlanSampler"
_MODULES = ("torchcfm.optimal_transport", "torchcfm.conditional_flow_matching")
_replaced = {}  # "module.OTPlanSampler" -> torchcfm's object it held


def _import_torchcfm(fn):
    try:
        return [importlib.import_module(m) for m in _MODULES]
    except ImportError as exc:
        raise ImportError(f"{fn}: torchcfm is not importable ({exc}); install it with "
                          "`pip install --no-deps torchcfm` (only its optimal_transport and "
                          "conditional_flow_matching modules are used)") from exc


def patch_torchcfm():
    """Make every new torchcfm ``OTPlanSampler(...)`` an ``lct_kernels.ot.OTPlanSampler``.

    Returns what it replaced: ``{"<module>.OTPlanSampler": torchcfm's class}`` for
    each torchcfm module whose ``OTPlanSampler`` it rebound (empty if already
    patched, so a second call changes nothing).  Raises ImportError if torchcfm
    is not installed.  ``unpatch_torchcfm()`` undoes it."""
    _import_torchcfm("patch_torchcfm")
    original = _replaced.get(f"{_MODULES[0]}.{_NAME}")
    if original is None:
        original = getattr(sys.modules[_MODULES[0]], _NAME)
    replaced = {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "torchcfm" or name.startswith("torchcfm.")):
            continue
        if getattr(module, _NAME, None) is original and original is not OTPlanSampler:
            key = f"{name}.{_NAME}"
            _replaced[key] = original
            replaced[key] = original
            setattr(module, _NAME, OTPlanSampler)
    return replaced


def unpatch_torchcfm():
    """Restore torchcfm's ``OTPlanSampler`` where ``patch_torchcfm`` replaced it.

    Returns ``{"<module>.OTPlanSampler": torchcfm's class}`` for each name restored
    (empty if nothing was patched).  Samplers built meanwhile stay ours."""
    restored = {}
    for key, original in list(_replaced.items()):
        name = key[: -len(_NAME) - 1]
        module = sys.modules.get(name)
        if module is not None and getattr(module, _NAME, None) is OTPlanSampler:
            setattr(module, _NAME, original)
            restored[key] = original
        del _replaced[key]
    return restored
