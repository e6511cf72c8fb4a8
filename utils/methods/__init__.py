"""The methods: each is one :class:`utils.methods.base.SynthesisMethod` subclass, named by ``method`` in the config.

Modules are imported only when their method is used.
"""

from __future__ import annotations

import importlib

# config ``method`` -> "module:class"; the method's config section is declared in utils.config.METHOD_SECTIONS
METHODS = {
    "flow_matching": "utils.methods.flow_matching:FlowMatchingModule",
    "ddpm": "utils.methods.ddpm:DDPMModule",
    "spade": "utils.methods.spade:SpadeModule",
    "med_dt_fm": "utils.methods.med_dt_fm:MedDTFMModule",
}


def method_class(name: str):
    """The SynthesisMethod subclass of a config's ``method``."""
    if name not in METHODS:
        raise KeyError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    module, cls = METHODS[name].split(":")
    return getattr(importlib.import_module(module), cls)
