"""Effects: what a request asks the server to do besides answering it.

Rules of this module:
- The decision layer (fastimds.imds.routing) is pure: it never writes,
  publishes or calls out. A request that has an effect gets a reply that
  carries it, and the caller (the HTTP connection) hands the effect on, off
  the parser callback.
- One effect exists: a scheduled-event approval (POST
  /metadata/scheduledevents, spec §8), checked against the caller's snapshot
  before it becomes one.
- An effect's reply is a `Reply` (so every caller of `resolve` keeps one
  type, and the connection pays one attribute test per parsed request to
  find effects: `volatile`, which an effect's reply always is), made per
  request and never remembered.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastimds.imds.render import Reply


@dataclass(frozen=True, slots=True, eq=False, repr=False)
class Approval(Reply):
    """The reply to an approval, and the EventIds it approves (to record on the loop's next turn)."""

    event_ids: frozenset[str] = field(default=frozenset(), kw_only=True)

    @classmethod
    def of(cls, reply: Reply, event_ids: frozenset[str]) -> Approval:
        """`reply` carrying `event_ids`: volatile, so never remembered, and found by that one test."""
        return cls(
            reply.status, reply.head, reply.body, reply.close, reply.etag,
            reject=reply.reject, volatile=True, event_ids=event_ids,
        )  # fmt: skip
