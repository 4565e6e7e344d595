"""textkit: small text helpers (the corral demo's sample project)."""

__version__ = "0.1.0"
