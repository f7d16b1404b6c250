"""The task payload."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.protocol.errors import (
    BadSignatureError,
    MalformedBatchError,
    UnknownKeyError,
    UnsignedTaskError,
)
from pipeline.protocol.layout import Op
from pipeline.protocol.names import is_payload_key, payload_key
from pipeline.protocol.wire import (
    Batch,
    Operation,
    Signer,
    SigningKeys,
    decode_task,
    decode_task_text,
    encode_task,
    encode_task_json,
    key_id,
)

KEY = b"k" * 64
SIGNER = Signer(SigningKeys((KEY,)))


def _batch(**kw: object) -> Batch:
    base: dict[str, object] = dict(
        source="a",
        target="b",
        shard="nodes-1",
        gen=2,
        prev=(10, 0),
        pos=(12, 1),
        ops=(
            Operation(Op.PUT, b"\xff\x00k", b"\x80v"),
            Operation(Op.PUT, b"e", b""),
            Operation(Op.DELETE, b"gone"),
        ),
    )
    base.update(kw)
    return Batch(**base)  # type: ignore[arg-type]


def test_round_trip_is_byte_exact_through_json() -> None:
    """Keys and values that are not UTF-8, and empty values, survive JSON exactly."""
    b = _batch(lease=0x7F3A_0000_0001, event_ms=1_764_300_000_123)
    other = _batch(shard="ipcache-0", ops=(Operation(Op.DELETE, b"x"),))
    wire = json.loads(json.dumps(encode_task([b, other], SIGNER, gap_since_ms=1234)))
    task = decode_task(wire, SIGNER)
    assert task.batches == [b, other] and task.gap_since_ms == 1234


@pytest.mark.parametrize("signer", [SIGNER, None], ids=["signed", "unsigned"])
def test_the_json_text_is_the_payload_written_out_compactly(signer: Signer | None) -> None:
    """What a publisher puts in a message (encode_task_json) parses to the payload of
    encode_task, verifies, and is as long as that payload written out compactly (the size
    kvmesh_watcher_task_bytes_published_total counts), though a signed one is not written
    out a second time."""
    shared = [_batch(target=t) for t in ("b", "c")]  # one shared list of operations
    other = _batch(shard="ipcache-0", ops=(Operation(Op.DELETE, b"x"),), done=False)
    text = encode_task_json([*shared, other], signer, gap_since_ms=1234)
    payload = encode_task([*shared, other], signer, gap_since_ms=1234)
    assert "ops" in payload and ("sig" in payload) is (signer is not None)
    assert json.loads(text) == payload
    assert len(text) == len(json.dumps(payload, separators=(",", ":")))
    assert text.isascii() and " " not in text
    task = decode_task(json.loads(text), signer)
    assert task.batches == [*shared, other] and task.gap_since_ms == 1234


@pytest.mark.parametrize(
    "payload",
    [{}, {"sig": "old", "x": 1}, {"v": 3, "s": "\u00e9\ud800"}],
    ids=["empty", "sig", "text"],
)
def test_signed_json_parses_to_the_signed_payload(payload: dict[str, object]) -> None:
    """Whatever the payload (empty, carrying a stale signature, with strings that are not
    ASCII), its signed JSON text is compact, ASCII, and parses to sign()'s object."""
    text = SIGNER.signed_json(payload)
    assert json.loads(text) == SIGNER.sign(payload)
    assert len(text) == len(json.dumps(SIGNER.sign(payload), separators=(",", ":")))
    assert text.isascii()


def test_a_flush_for_many_targets_carries_its_operations_once() -> None:
    """Batches for several targets with the same operations share one list in the task,
    so the payload grows by a short header per target, not by a copy of the changes."""
    targets = [f"cluster-{i}" for i in range(2, 10)]
    batches = [_batch(target=t) for t in targets] + [_batch(shard="ipcache-0")]
    one = len(json.dumps(encode_task(batches[:1], SIGNER)))
    payload = encode_task(batches, SIGNER)
    assert len(payload["ops"]) == 1  # one shared list; the ipcache batch's ops are the same
    assert all(b["ops"] == 0 for b in payload["batches"])
    assert len(json.dumps(payload)) < one + len(batches) * 120
    assert decode_task(json.loads(json.dumps(payload)), SIGNER).batches == batches
    alone = encode_task([_batch(), _batch(ops=(Operation(Op.DELETE, b"x"),))], SIGNER)
    assert "ops" not in alone  # nothing to share: every list inline, as in schema 2


def test_only_equal_operation_lists_are_shared() -> None:
    """Lists are matched by their first and last keys and length first; lists that agree on
    those and differ inside, or only in a value, each keep their own operations."""
    ops = _batch().ops
    middle = (ops[0], Operation(Op.PUT, b"other", b"v"), *ops[2:])
    value = (ops[0], Operation(Op.PUT, ops[1].key, b"changed"), *ops[2:])
    batches = [
        _batch(target=t, ops=o)
        for t, o in (("b", ops), ("c", middle), ("d", value), ("e", _batch().ops))
    ]
    payload = encode_task(batches, SIGNER)
    assert len(payload["ops"]) == 1  # b and e: equal, though not the same objects
    assert [b["ops"] == 0 for b in payload["batches"]] == [True, False, False, True]
    assert decode_task(json.loads(json.dumps(payload)), SIGNER).batches == batches


def test_a_schema_2_task_is_still_read() -> None:
    """Workers read what watchers of the previous schema publish, during an upgrade."""
    payload = {"v": 2, "batches": [_batch().encode(), _batch(target="c").encode()]}
    assert decode_task(SIGNER.sign(payload), SIGNER).batches == [_batch(), _batch(target="c")]
    for field in ("ops", "source"):  # schema 3's task-level fields
        newer = dict(payload, **{field: encode_task([_batch(), _batch(target="c")], None)[field]})
        with pytest.raises(MalformedBatchError, match="unknown fields"):
            decode_task(SIGNER.sign(newer), SIGNER)


def _shared(p: dict) -> dict:  # type: ignore[type-arg]
    """A payload of two batches sharing their operations."""
    p.update(encode_task([_batch(), _batch(target="c")], None))
    return p


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: _shared(p)["batches"][0].update(ops=1), "absent"),
        (lambda p: _shared(p)["batches"][0].update(ops=-1), "absent"),
        (lambda p: _shared(p)["batches"][0].update(ops=True), "must be a list"),
        (lambda p: _shared(p).update(ops={"0": []}), "operation lists"),
        (lambda p: _shared(p).update(ops=[[], [], []]), "operation lists"),
        (lambda p: _shared(p)["ops"][0].append(["x", "AA==", None]), "unknown kind"),
        (lambda p: _shared(p).update(source=""), "source"),
        (lambda p: _shared(p).update(source=7), "source"),
    ],
)
def test_malformed_shared_operations_are_rejected(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    payload: dict = {}  # type: ignore[type-arg]
    mutate(payload)
    with pytest.raises(MalformedBatchError, match=reason):
        decode_task(SIGNER.sign(payload), SIGNER)


@pytest.mark.parametrize(
    ("mutate", "reason"),
    [
        (lambda p: p.update(v=99), "schema version"),
        (lambda p: p.update(batches=[]), "batches"),
        (lambda p: p["batches"][0].update(gen=0), "gen"),
        (lambda p: p["batches"][0].update(prev=[1]), "prev"),
        (lambda p: p["batches"][0].update(pos=[1, 0], prev=[2, 0]), "not after"),
        (lambda p: p["batches"][0]["ops"].append(["x", "AA==", None]), "unknown kind"),
        (lambda p: p["batches"][0]["ops"].append(["p", "not base64!", "AA=="]), "base64"),
        (lambda p: p["batches"][0]["ops"].append(p["batches"][0]["ops"][0]), "twice"),
        (lambda p: p["batches"][0].update(source=""), "source"),
        (lambda p: p["batches"].append(dict(p["batches"][0], source="c")), "share"),
        (lambda p: p["batches"][0].update(lease=-1), "lease"),
        (lambda p: p["batches"][0].update(lease="7"), "lease"),
        (lambda p: p["batches"][0].update(t=-5), "milliseconds"),
        (lambda p: p["batches"][0].update(t=True), "milliseconds"),
    ],
)
def test_malformed_payloads_are_rejected_with_a_reason(mutate, reason: str) -> None:  # type: ignore[no-untyped-def]
    """A payload that does not fit the schema raises MalformedBatchError naming the problem."""
    payload = encode_task([_batch()], None)
    mutate(payload)
    with pytest.raises(MalformedBatchError, match=reason):
        decode_task(SIGNER.sign(payload), SIGNER)


_OP_LISTS = [
    [],
    [["p", "a2V5", "dmFs"], ["d", "Z29uZQ==", None], ["p", "", ""], ["d", "eA==", "ignored"]],
    [["p", "a2V5", "dmFs"], ["p", "a2V5", "b3RoZXI="]],  # a key twice
    ["pAB"],  # a string of three characters unpacks to three
    [{"p": 0, "QUFB": 0, "": 0}],  # so does an object of three members: a put of AAA
    [("p", "QUFB", "")],  # (not JSON: decode_task may be handed a payload from elsewhere)
    [["p", "QUFB"]],
    [["p", "QUFB", "", ""]],
    [["p", "QUFB", None]],
    [["p", None, ""]],
    [["p", 7, ""]],
    [["p", ["QUFB"], ""]],
    [["d", "QUFB", 7]],
    [["x", "QUFB", ""]],
    [[None, "QUFB", ""]],
    [["p", "QUF", ""]],  # padding missing
    [["p", "QU=B", ""]],  # padding inside
    [["p", "QUFB\n", ""]],
    [["p", "QUFBé", ""]],  # not ASCII
    [["p", "QUFB", "not base64!"]],
    [["p", "QUFB", ""], "p"],
    [["d", "QUFB", None], 7],
    [["p", "QUFB", ""], None],
    [["p", b"QUFB", ""]],  # bytes are no JSON value; a2b_base64 would take them
    [["p", "QUFB", bytearray(b"")]],
]


@pytest.mark.parametrize("raw", _OP_LISTS)
def test_operations_decode_alike_on_both_paths(raw: list) -> None:  # type: ignore[type-arg]
    """A worker decodes a list of well-formed operations in one pass (_well_formed_ops),
    and any other list one operation at a time (_checked_ops), which names what is wrong:
    for every list both give the same operations, or the first refuses what the second
    does, with the second's reason."""
    from pipeline.protocol.wire import _checked_ops, _ops

    try:
        expected: object = _checked_ops(raw)
    except MalformedBatchError as exc:
        expected = str(exc)
    try:
        got: object = _ops(raw)
    except MalformedBatchError as exc:
        got = str(exc)
    assert got == expected
    if isinstance(got, tuple):  # == would take a str for an Op and a bytearray for bytes
        assert isinstance(expected, tuple)
        assert [tuple(map(type, o)) for o in got] == [tuple(map(type, o)) for o in expected]
        assert all(type(o) is Operation for o in got)


_B64 = st.binary(max_size=6).map(lambda b: base64.b64encode(b).decode())
_MEMBER = st.one_of(
    _B64,
    st.sampled_from(["p", "d", "x", "", "QUF", "QU=B", "QUFB\n", "é"]),
    st.none(),
    st.integers(),
    st.booleans(),
    st.binary(max_size=4),
    st.lists(_B64, max_size=2),
)


@given(
    st.lists(
        st.one_of(
            st.tuples(st.sampled_from(["p", "d"]), _B64, st.one_of(_B64, st.none())).map(list),
            st.lists(_MEMBER, max_size=4),
            _MEMBER,
            st.dictionaries(_B64, _MEMBER, max_size=3),
        ),
        max_size=5,
    )
)
@settings(max_examples=400, deadline=None)
def test_operations_decode_alike_on_both_paths_whatever_they_hold(raw: list) -> None:  # type: ignore[type-arg]
    test_operations_decode_alike_on_both_paths(raw)


def test_the_signed_text_of_a_task_is_what_it_was() -> None:
    """The bytes a watcher signs and publishes for a task, pinned: a watcher and a worker of
    different versions (a rolling upgrade) must spell and sign the same task alike."""
    ops = (
        Operation(Op.PUT, b"\xff\x00k", b"\x80v"),
        Operation(Op.PUT, b"e", b""),
        Operation(Op.DELETE, b"gone"),
    )
    one = _batch(ops=ops)
    assert encode_task_json([one], SIGNER) == (
        '{"batches":[{"gen":2,"ops":[["p","/wBr","gHY="],["p","ZQ==",""],["d","Z29uZQ==",null]],'
        '"pos":[12,1],"prev":[10,0],"shard":"nodes-1","target":"b"}],"source":"a","v":3,'
        '"sig":{"kid":"923e473a223c0c09",'
        '"hmac":"947937c55090f6893137117902edf334c513b9959e867ae0af8e9304d44847cd"}}'
    )
    shared = [_batch(ops=ops, lease=7, event_ms=1764300000123), _batch(ops=ops, target="c")]
    assert encode_task_json(shared, SIGNER, gap_since_ms=1234) == (
        '{"batches":[{"gen":2,"lease":7,"ops":0,"pos":[12,1],"prev":[10,0],"shard":"nodes-1",'
        '"t":1764300000123,"target":"b"},{"gen":2,"ops":0,"pos":[12,1],"prev":[10,0],'
        '"shard":"nodes-1","target":"c"}],"gap_since":1234,"ops":[[["p","/wBr","gHY="],'
        '["p","ZQ==",""],["d","Z29uZQ==",null]]],"source":"a","v":3,'
        '"sig":{"kid":"923e473a223c0c09",'
        '"hmac":"3905c9b503051440ec3fc0e12126fd16ac5a4c7e906a8255cbd3850f26e32343"}}'
    )


def test_non_object_payload_is_rejected() -> None:
    """A message that is not even an object is rejected."""
    with pytest.raises(MalformedBatchError):
        decode_task(["not", "a", "batch"], SIGNER)


def test_every_change_on_the_way_breaks_the_signature() -> None:
    """Whoever can write to Redis cannot change a signed task: not an op, not a key, not the
    target, not a position, not a field added beside the batches."""
    signed = encode_task([_batch()], SIGNER)
    decode_task(json.loads(json.dumps(signed)), SIGNER)
    changes = [
        lambda p: p["batches"][0]["ops"].append(["p", "a2V5", "dmFs"]),
        lambda p: p["batches"][0]["ops"][0].__setitem__(1, "b3RoZXI="),
        lambda p: p["batches"][0].update(target="c"),
        lambda p: p["batches"][0].update(gen=10**12),
        lambda p: p["batches"][0].update(pos=[13, 0]),
        lambda p: p.update(gap_since=1),
    ]
    for change in changes:
        payload = json.loads(json.dumps(signed))
        change(payload)
        with pytest.raises(BadSignatureError):
            decode_task(payload, SIGNER)


def test_a_payload_text_is_verified_as_it_came() -> None:
    """A payload read from Redis as the watcher wrote it is verified over its bytes as they
    are (no parse and write-out first); a change to any part of it, or to its signature,
    is refused; so is any other spelling of a genuine payload, which no watcher writes."""
    batches = [_batch(), _batch(target="c", shard="ipcache-0")]
    text = encode_task_json(batches, SIGNER, gap_since_ms=1234).encode()
    assert SIGNER.verify_text(text)
    task = decode_task_text(text, SIGNER)
    assert task.batches == batches and task.gap_since_ms == 1234
    # the same payload spelled otherwise (spaces, members in another order) is refused
    spaced = json.dumps(encode_task(batches, SIGNER, gap_since_ms=1234)).encode()
    assert not SIGNER.verify_text(spaced)
    for other in (spaced, text + b" "):
        with pytest.raises(BadSignatureError, match="spelling"):
            decode_task_text(other, SIGNER)
    body, tail = text[: text.rindex(b',"sig":')], text[text.rindex(b',"sig":') :]
    changed = [
        body.replace(b'"target":"c"', b'"target":"d"') + tail,
        body.replace(b'"gap_since":1234', b'"gap_since":1235') + tail,
        body.replace(b'"ops":[[', b'"ops":[["d","eA==",null],[', 1) + tail,
        body + tail.replace(tail[-5:-3], b"00" if tail[-5:-3] != b"00" else b"11"),
    ]
    for bad in changed:
        assert bad != text and not SIGNER.verify_text(bad)
        with pytest.raises(BadSignatureError):
            decode_task_text(bad, SIGNER)
    with pytest.raises(UnknownKeyError):
        decode_task_text(
            encode_task_json(batches, Signer(SigningKeys((b"o" * 64,)))).encode(), SIGNER
        )
    with pytest.raises(UnsignedTaskError):
        decode_task_text(encode_task_json(batches, None).encode(), SIGNER)
    assert decode_task_text(encode_task_json(batches, None).encode(), None).batches == batches


def test_a_payload_text_is_not_parsed_to_be_verified(monkeypatch: pytest.MonkeyPatch) -> None:
    """The text the watcher writes is verified by verify_text alone, whichever key of a
    rotation signed it: the long way (verify, which writes the parsed payload out again) is
    not taken for it. Text that verify_text does not take is not parsed at all: a Redis
    writer's 128 MiB of JSON costs a worker its read and at most one HMAC, no parse."""
    old, new = b"o" * 64, b"n" * 64
    rotating = Signer(SigningKeys((new, old)))
    called: list[object] = []
    monkeypatch.setattr(Signer, "verify", lambda self, payload: called.append(payload))
    for signer in (Signer(SigningKeys((old,))), rotating):
        text = encode_task_json([_batch()], signer).encode()
        assert rotating.verify_text(text)
        assert decode_task_text(text, rotating).batches == [_batch()]
    assert called == []
    parsed: list[object] = []
    monkeypatch.setattr(json, "loads", lambda *a, **k: parsed.append(a))
    for text in (
        json.dumps(encode_task([_batch()], rotating)).encode(),  # another spelling
        b"[" + b"{}," * 1000 + b"{}]",  # unsigned
        encode_task_json([_batch()], Signer(SigningKeys((b"x" * 64,)))).encode(),  # foreign
    ):
        with pytest.raises(MalformedBatchError):
            decode_task_text(text, rotating)
    assert called == [] and parsed == []


def test_a_signed_text_that_is_no_payload_is_still_refused() -> None:
    """Bytes with a valid signature at their end are still parsed and checked: signed text
    that is not JSON, or JSON that is no task, is a malformed task, and text that is not
    JSON at all says so."""
    mac = hmac.new(KEY, b"{not json}", hashlib.sha256).hexdigest()
    signed = b'{not json,"sig":{"kid":"%s","hmac":"%s"}}' % (key_id(KEY).encode(), mac.encode())
    assert SIGNER.verify_text(signed)
    with pytest.raises(MalformedBatchError, match="not JSON"):
        decode_task_text(signed, SIGNER)
    # signed bytes that do not open an object are not taken as a payload's text
    mac = hmac.new(KEY, b"[1,2}", hashlib.sha256).hexdigest()
    assert not SIGNER.verify_text(
        b'[1,2,"sig":{"kid":"%s","hmac":"%s"}}' % (key_id(KEY).encode(), mac.encode())
    )
    with pytest.raises(UnsignedTaskError):
        decode_task_text(b"\xff\x00", SIGNER)
    with pytest.raises(MalformedBatchError, match="not JSON"):
        decode_task_text(b"\xff\x00", None)  # the insecure mode parses what it gets
    request = SIGNER.signed_json({"gen": 1, "reason": "x", "ts": 1}).encode()  # not a task
    assert SIGNER.verify_text(request)
    with pytest.raises(MalformedBatchError):
        decode_task_text(request, SIGNER)


def test_unsigned_and_foreign_tasks_are_refused() -> None:
    """A task without a signature, or signed with a key this worker does not hold, is
    refused, each with its own reason; the insecure mode (no signer) takes unsigned ones."""
    with pytest.raises(UnsignedTaskError):
        decode_task(encode_task([_batch()], None), SIGNER)
    other = Signer(SigningKeys((b"o" * 64,)))
    with pytest.raises(UnknownKeyError):
        decode_task(encode_task([_batch()], other), SIGNER)
    assert decode_task(encode_task([_batch()], None), None).batches == [_batch()]


def test_rotation_signs_with_the_first_key_and_accepts_any() -> None:
    """During a key rotation a worker accepts tasks signed with the old key and the new."""
    old, new = b"o" * 64, b"n" * 64
    rotating = Signer(SigningKeys((new, old)))
    assert decode_task(encode_task([_batch()], Signer(SigningKeys((old,)))), rotating)
    assert decode_task(encode_task([_batch()], rotating), Signer(SigningKeys((new,))))


def test_crafted_payloads_stay_malformed_tasks() -> None:
    """Deep nesting or odd types inside a signed-looking payload are a malformed task, never
    another exception (which would kill nothing, but would hide the reason)."""
    deep: object = []
    for _ in range(5000):
        deep = [deep]
    for payload in (
        {"v": 2, "batches": deep, "sig": {"kid": key_id(KEY), "hmac": "y"}},
        {"v": 2, "batches": [{"gen": 1e300}], "sig": None},
    ):
        with pytest.raises(MalformedBatchError):
            decode_task(payload, SIGNER)


def test_a_worker_reads_only_keys_named_like_payloads() -> None:
    """The name in a task published by reference must be one payload_key() makes: a
    message naming any other Redis key (the leader lease, a queue, the stats) is refused
    before anything is read."""
    name = payload_key("0123456789abcdef" * 2)
    assert is_payload_key(name)
    for other in (
        "kvmesh:leader:cluster-a",
        "kvmesh.cluster-a",
        "unacked",
        name[:-1],
        name + "0",
        name[:-1] + "G",
        name.upper(),
        " " + name[1:],
        None,
        7,
        ["kvmesh:payload:"],
    ):
        assert not is_payload_key(other), other


def test_a_task_of_full_batches_fits_what_a_worker_reads() -> None:
    """sync.max_batch_bytes is bounded so that a task of as many batches as a task holds,
    each of that many bytes of keys and values (the most a batch may have), is no larger
    than a worker reads for one task: a source that fills a shard with values at the limit
    cannot make tasks that every worker refuses."""
    from pipeline.config import MAX_BATCH_BYTES
    from pipeline.protocol.wire import MAX_BATCHES_PER_TASK, op_size
    from workers.tasks import MAX_PAYLOAD_BYTES

    key = b"cilium/cache/identities/v1/cluster-a/id/123456"
    value = b"v" * (MAX_BATCH_BYTES - op_size(key, b""))
    assert op_size(key, value) == MAX_BATCH_BYTES
    full = _batch(
        ops=(Operation(Op.PUT, key, value),),
        gen=(1 << 63) - 1,
        prev=((1 << 63) - 2, 1 << 20),
        pos=((1 << 63) - 1, 1 << 20),
        lease=(1 << 63) - 1,
        event_ms=(1 << 53) - 1,
    )
    one = len(encode_task_json([full], SIGNER, gap_since_ms=(1 << 53) - 1))
    # batches of a task add up (a list of operations two batches share is written once)
    assert MAX_BATCHES_PER_TASK * one <= MAX_PAYLOAD_BYTES
