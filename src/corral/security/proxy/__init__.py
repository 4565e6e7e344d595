"""corral's egress proxy: every byte a fenced sandbox sends out goes through here.

``server`` attaches sandboxes (listeners inside their namespaces), ``session``
checks and decides each request, ``forward`` streams it upstream and back,
``upstream`` keeps verified connections alive, ``attachment`` holds one
sandbox's policy, secrets, CA and names, ``services`` what all of them share.
"""

from corral.security.proxy.attachment import Attachment, FenceRecord
from corral.security.proxy.server import ProxyServer
from corral.security.proxy.services import Services

__all__ = ["Attachment", "FenceRecord", "ProxyServer", "Services"]
