"""Shared logic of the adapters for the official repositories (``adapters/<repo>/`` in the source tree).

Everything here works without the official code: the pix2pix/CycleGAN model plug-in, the SPADE
trainer wrapper and the CartoonGAN tools receive the host's classes as arguments.
"""
from .checkpoints import (describe_flags, guess_pix2pix_flags, load_matching, mismatch, read_state_dict,
                          strip_spectral_norm)
from .errors import AdapterError
from .isolation import isolated_imports
from .session import SlimSession, student_from_teacher

__all__ = ["AdapterError", "SlimSession", "describe_flags", "guess_pix2pix_flags", "isolated_imports", "load_matching",
           "mismatch", "read_state_dict", "strip_spectral_norm", "student_from_teacher"]
