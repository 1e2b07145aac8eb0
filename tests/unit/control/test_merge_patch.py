"""RFC 7396 (JSON Merge Patch): the RFC's own examples, run against fastimds and against an independent oracle.

The admin API's PATCH /vms/{id} is a merge patch; the fuzz suite
(tests/fuzz/test_fuzz_admin.py) checks every accepted PATCH against the
oracle in tests.support.reference. Here both are held to the RFC itself:
every example of Appendix A and the example of section 3, written as the RFC
prints them (JSON text), so neither implementation can be right only by
agreeing with the other.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fastimds.control.writer import merge_patch
from tests.support.reference import rfc7396_merge_patch

# RFC 7396 Appendix A, in order: (ORIGINAL, PATCH, RESULT), each the RFC's JSON text.
APPENDIX_A = [
    ('{"a":"b"}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"b"}', '{"b":"c"}', '{"a":"b","b":"c"}'),
    ('{"a":"b"}', '{"a":null}', "{}"),
    ('{"a":"b","b":"c"}', '{"a":null}', '{"b":"c"}'),
    ('{"a":["b"]}', '{"a":"c"}', '{"a":"c"}'),
    ('{"a":"c"}', '{"a":["b"]}', '{"a":["b"]}'),
    ('{"a":{"b":"c"}}', '{"a":{"b":"d","c":null}}', '{"a":{"b":"d"}}'),
    ('{"a":[{"b":"c"}]}', '{"a":[1]}', '{"a":[1]}'),
    ('["a","b"]', '["c","d"]', '["c","d"]'),
    ('{"a":"b"}', '["c"]', '["c"]'),
    ('{"a":"foo"}', "null", "null"),
    ('{"a":"foo"}', '"bar"', '"bar"'),
    ('{"e":null}', '{"a":1}', '{"e":null,"a":1}'),
    ("[1,2]", '{"a":"b","c":null}', '{"a":"b"}'),
    ("{}", '{"a":{"bb":{"ccc":null}}}', '{"a":{"bb":{}}}'),
]

# RFC 7396 section 3, the worked example.
SECTION_3 = (
    """{
        "title": "Goodbye!",
        "author" : {
            "givenName" : "John",
            "familyName" : "Doe"
        },
        "tags":[ "example", "sample" ],
        "content": "This will be unchanged"
    }""",
    """{
        "title": "Hello!",
        "phoneNumber": "+01-123-456-7890",
        "author": {
            "familyName": null
        },
        "tags": [ "example" ]
    }""",
    """{
        "title": "Hello!",
        "author" : {
            "givenName" : "John"
        },
        "tags": [ "example" ],
        "content": "This will be unchanged",
        "phoneNumber": "+01-123-456-7890"
    }""",
)

IMPLEMENTATIONS = {"fastimds": merge_patch, "oracle": rfc7396_merge_patch}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize(
    ("original", "patch", "result"),
    [*APPENDIX_A, SECTION_3],
    ids=[*(f"appendix-a-{number}" for number in range(1, len(APPENDIX_A) + 1)), "section-3"],
)
def test_every_example_of_the_rfc(implementation: str, original: str, patch: str, result: str) -> None:
    target, changes = json.loads(original), json.loads(patch)
    assert IMPLEMENTATIONS[implementation](target, changes) == json.loads(result)
    # Neither argument is changed: the admin API patches the document a snapshot still serves.
    assert (target, changes) == (json.loads(original), json.loads(patch))


def test_the_table_is_the_whole_appendix() -> None:
    assert len(APPENDIX_A) == 15  # Appendix A has fifteen examples


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=3),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.sampled_from("abcd"), children, max_size=4),
    max_leaves=16,
)


@settings(max_examples=300, derandomize=True, deadline=None)
@given(JSON_VALUES, JSON_VALUES)
def test_fastimds_and_the_oracle_agree_on_any_document_and_patch(target: Any, patch: Any) -> None:
    before = copy.deepcopy((target, patch))
    assert merge_patch(target, patch) == rfc7396_merge_patch(target, patch)
    assert (target, patch) == before
