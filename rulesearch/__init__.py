"""rulesearch: discover biologically plausible synaptic plasticity rules."""

__version__ = "0.1.0"
