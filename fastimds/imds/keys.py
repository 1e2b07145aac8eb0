"""The keys a server signs with: the attested document's signer and the token issuer.

Rules of this module:
- Built once per server at start and passed to whoever signs (the routing of
  a worker, the admin API's /jwks): no module-level instance.
- With several processes, the server makes (or loads) both before any fork,
  so every worker signs with the same keys. A single process may leave one
  unset: it is made on first use (RSA key generation, ~100 ms, paid by the
  first request that needs it rather than by every start).
"""

from __future__ import annotations

from fastimds.imds.attested import Attestor
from fastimds.imds.identity import TokenIssuer


class Keys:
    __slots__ = ("_attestor", "_issuer")

    def __init__(self, attestor: Attestor | None = None, issuer: TokenIssuer | None = None) -> None:
        self._attestor = attestor
        self._issuer = issuer

    @classmethod
    def made_now(cls, attestor: Attestor | None = None) -> Keys:
        """Both keys made (or `attestor` given) at once: before a fork, so every process shares them."""
        return cls(attestor or Attestor.self_signed(), TokenIssuer())

    @property
    def attestor(self) -> Attestor:
        if self._attestor is None:
            self._attestor = Attestor.self_signed()
        return self._attestor

    @property
    def issuer(self) -> TokenIssuer:
        if self._issuer is None:
            self._issuer = TokenIssuer()
        return self._issuer
