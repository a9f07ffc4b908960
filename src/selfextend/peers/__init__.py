"""Training-free peers of SelfExtend, run through the same transformers hooks: STRING (An et al. 2024,
arXiv 2410.18745) and DCA / ChunkLlama (An et al. 2024, arXiv 2402.17463). See ``formulas`` for each
position map and where it comes from.

    from selfextend import peers
    peers.enable_peer(model, "string")      # or "dca"; the papers' default parameters
    model.generate(...)
    peers.disable_peer(model)
"""

from .formulas import DcaSettings, StringSettings
from .hooks import PEER_NAMES, disable_peer, enable_peer, peer_settings

__all__ = ["PEER_NAMES", "StringSettings", "DcaSettings", "enable_peer", "disable_peer", "peer_settings"]
