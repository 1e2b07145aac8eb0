"""The signing budget (fastimds.imds.signing): fresh signatures per VM per second, then a 429.

Time is pinned: `routing` reads the clock through its `time` module, which
these tests replace. The flood against a real server is in
tests/e2e/test_tenant_fairness_e2e.py.
"""

from __future__ import annotations

import copy
import types
from typing import Any

import orjson
import pytest

from fastimds.cli.main import build_parser, settings_from_args
from fastimds.config import SIGNATURES_PER_VM_PER_S, ConfigError, Limits
from fastimds.http.throttle import Throttle, ThrottleLimits
from fastimds.imds import routing
from fastimds.imds.attested import Attestor
from fastimds.imds.datafile import describe_vm
from fastimds.imds.identity import ERRORS as IDENTITY_ERRORS
from fastimds.imds.identity import TokenIssuer
from fastimds.imds.keys import Keys
from fastimds.imds.render import ERRORS
from fastimds.imds.signing import SigningBudget, SigningBudgets
from fastimds.imds.snapshot import Snapshot, build_snapshot
from fastimds.imds.store import SnapshotStore
from fastimds.ops.telemetry import LAYOUT
from tests.support.fakes import KEYS, PINNED_UNIX_TIME, make_connection, request, split_responses
from tests.support.identities import IDENTITIES, document_with

TOKEN = "/metadata/identity/oauth2/token?api-version=2018-02-01&resource=https://r{}.example"
ATTESTED = "/metadata/attested/document?api-version=2020-09-01&nonce=n{}"
THROTTLED_IDENTITY_BODY = {
    "error": "throttled",
    "error_description": "Too many requests. Retry after the time in Retry-After",
}


class PinnedClock:
    """Stands in for the `time` module routing reads; `now` moves only when a test moves it."""

    def __init__(self, now: float = PINNED_UNIX_TIME) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> PinnedClock:
    pinned = PinnedClock()
    monkeypatch.setattr(routing, "time", types.SimpleNamespace(time=pinned.time))
    return pinned


def snapshot() -> Snapshot:
    return build_snapshot(describe_vm(document_with(IDENTITIES), "t"), 1)


def fresh_keys() -> Keys:
    """The test keys with empty caches: what a test counts was signed by it (no key is made)."""
    return Keys(Attestor(KEYS.attestor.key, KEYS.attestor.certificate), TokenIssuer(KEYS.issuer.key))


def get(target: str, budget: SigningBudget | None, keys: Keys | None = None, on: Snapshot | None = None) -> Any:
    keys = keys or fresh_keys()
    return routing.resolve(on or snapshot(), b"GET", target.encode(), True, False, keys=keys, budget=budget)


# ---- the bucket ----


def test_a_full_second_at_once_then_one_every_1_over_rate_seconds() -> None:
    budget = SigningBudget(16.0)  # 1/16 s is exact in binary: no rounding in the sums below
    assert [budget.take(100.0) for _ in range(17)] == [True] * 16 + [False]
    assert not budget.take(100.03125)  # half a signature back
    assert budget.take(100.0625)  # one back after 1/16 s
    assert not budget.take(100.0625)
    assert [budget.take(200.0) for _ in range(17)] == [True] * 16 + [False]  # idle: full again, never more


def test_a_clock_stepping_back_refills_nothing() -> None:
    budget = SigningBudget(2.0)
    assert budget.take(100.0) and budget.take(100.0) and not budget.take(100.0)
    assert not budget.take(50.0)
    assert not budget.take(100.1)


def test_a_rate_under_one_still_allows_one_at_once() -> None:
    budget = SigningBudget(0.5)
    assert budget.take(10.0) and not budget.take(10.0)
    assert not budget.take(11.9) and budget.take(12.0)


def test_each_vm_has_its_own_budget_and_the_table_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    budgets = SigningBudgets(1.0)
    assert budgets.for_vm("vm-a").take(1.0) and not budgets.for_vm("vm-a").take(1.0)
    assert budgets.for_vm("vm-b").take(1.0)
    monkeypatch.setattr("fastimds.imds.signing.MAX_BUDGETED_VMS", 2)
    budgets.for_vm("vm-c")
    assert list(budgets.vms) == ["vm-c"]


# ---- tokens ----


def test_fresh_tokens_past_the_budget_get_the_identity_429_with_retry_after(clock: PinnedClock) -> None:
    budget = SigningBudget(20.0)
    keys = fresh_keys()
    vm = snapshot()
    statuses = [get(TOKEN.format(f"{clock.now}-{i}"), budget, keys, vm).status for i in range(25)]
    assert statuses == [200] * 20 + [429] * 5
    refused = get(TOKEN.format(f"{clock.now}-late"), budget, keys, vm)
    assert refused is IDENTITY_ERRORS["signing_budget"] and refused.reject == "signing_budget"
    assert b"Retry-After: 1\r\n" in refused.head
    assert orjson.loads(refused.body) == THROTTLED_IDENTITY_BODY
    clock.now += 0.06
    assert get(TOKEN.format(f"{clock.now}-next"), budget, keys, vm).status == 200  # one back after 1/20 s


def test_cached_tokens_cost_nothing_and_are_served_past_the_budget(clock: PinnedClock) -> None:
    budget = SigningBudget(2.0)
    vm = snapshot()
    keys = fresh_keys()
    first = get(TOKEN.format(f"{clock.now}-cached"), budget, keys, vm)
    assert first.status == 200
    for _ in range(50):
        again = get(TOKEN.format(f"{clock.now}-cached"), budget, keys, vm)
        assert again.status == 200
        assert orjson.loads(again.body)["access_token"] == orjson.loads(first.body)["access_token"]
    assert budget.left == 1.0  # the 50 cached ones took nothing
    assert get(TOKEN.format(f"{clock.now}-other"), budget, keys, vm).status == 200
    assert get(TOKEN.format(f"{clock.now}-third"), budget, keys, vm).status == 429
    assert get(TOKEN.format(f"{clock.now}-cached"), budget, keys, vm).status == 200  # still served


def test_refusals_that_sign_nothing_cost_nothing(clock: PinnedClock) -> None:
    budget = SigningBudget(1.0)
    missing = "/metadata/identity/oauth2/token?api-version=2018-02-01"
    unknown = TOKEN.format(1) + "&client_id=99999999-9999-4999-8999-999999999999"
    assert [get(target, budget).status for target in (missing, unknown)] == [400, 400]
    assert budget.left == 1.0


def test_without_a_budget_nothing_is_refused(clock: PinnedClock) -> None:
    vm = snapshot()
    assert {get(TOKEN.format(f"{clock.now}-free-{i}"), None, on=vm).status for i in range(30)} == {200}


# ---- attested documents ----


def test_fresh_attested_documents_past_the_budget_get_the_instance_429(clock: PinnedClock) -> None:
    budget = SigningBudget(3.0)
    vm = snapshot()
    keys = fresh_keys()
    assert [get(ATTESTED.format(i), budget, keys, vm).status for i in range(5)] == [200] * 3 + [429] * 2
    refused = get(ATTESTED.format(9), budget, keys, vm)
    assert refused is ERRORS["signing_budget"] and b"Retry-After: 1\r\n" in refused.head
    assert refused.body == ERRORS["throttled"].body  # the family's one 429 body
    assert get(ATTESTED.format(0), budget, keys, vm).status == 200  # signed this second: cached, free


# ---- through a connection, and the setting ----


def identity_store() -> SnapshotStore:
    return SnapshotStore(describe_vm(copy.deepcopy(document_with(IDENTITIES)), "t"))


def test_a_connection_spends_its_vms_budget_and_counts_the_429s(clock: PinnedClock) -> None:
    protocol, transport, state = make_connection(Limits(signatures_per_vm_per_s=5.0), store=identity_store())
    stamp = id(protocol)  # resources no other test minted (the issuer's cache is shared)
    protocol.data_received(b"".join(request(TOKEN.format(f"{stamp}-{i}")) for i in range(8)))
    replies = split_responses(transport.output)
    assert [r.status for r in replies] == [200] * 5 + [429] * 3
    assert replies[-1].headers["retry-after"] == "1"
    assert replies[-1].json() == THROTTLED_IDENTITY_BODY
    assert state.counters is not None and state.counters[LAYOUT.reject_slot("signing_budget")] == 3


def test_the_throttles_identity_429_has_the_identity_shape_too() -> None:
    protocol, transport, _ = make_connection(store=identity_store(), throttle=Throttle(ThrottleLimits(identity_rps=1)))
    token = request(TOKEN.format("throttled"))
    protocol.data_received(token + token)
    ok, throttled = split_responses(transport.output)
    assert (ok.status, throttled.status) == (200, 429)
    assert throttled.json() == THROTTLED_IDENTITY_BODY and throttled.headers["retry-after"] == "1"


def test_the_budget_is_a_limit_with_a_flag() -> None:
    assert Limits().signatures_per_vm_per_s == SIGNATURES_PER_VM_PER_S == 20.0
    args = build_parser().parse_args(["serve", "--signatures-per-vm", "2.5"])
    assert settings_from_args(args).limits.signatures_per_vm_per_s == 2.5
    with pytest.raises(ConfigError):
        Limits(signatures_per_vm_per_s=0)


def test_a_budget_429_is_never_kept_for_its_url(clock: PinnedClock) -> None:
    # The 429 depends on the clock (the budget refills): a URL refused once must be signed
    # once the budget allows, not answered 429 from the snapshot's URL cache.
    budget = SigningBudget(1.0)
    keys = fresh_keys()
    vm = snapshot()
    assert get(TOKEN.format(f"{clock.now}-a"), budget, keys, vm).status == 200
    late = TOKEN.format(f"{clock.now}-b")
    assert get(late, budget, keys, vm).status == 429
    clock.now += 2
    assert get(late, budget, keys, vm).status == 200
    assert IDENTITY_ERRORS["signing_budget"].volatile and ERRORS["signing_budget"].volatile
