"""Record ids: one label per record a request was answered for, only from the client it was
issued to, and nothing a client can send makes the check fail with an exception."""

import hashlib

from flywheel.serving.tabular.records import RecordIds

KEY = b"k" * 32


def test_each_minted_id_is_issued_and_no_suffix_beyond_the_request_is():
    ids = RecordIds(KEY)
    minted = ids.mint("req123", 3)
    assert all(ids.issued(r) for r in minted)
    base = minted[0].rpartition("-")[0]
    # one prediction used to buy any number of labels: req-0 ... req-10003 all passed
    assert not any(ids.issued(f"{base}-{n}") for n in (3, 4, 10_003))
    assert not ids.issued(base.replace(".3", ".9") + "-5")  # a larger count breaks the tag


def test_an_id_is_issued_only_for_the_client_that_asked():
    ids = RecordIds(KEY)
    [mine] = ids.mint("req1", 1, client="web")
    assert ids.issued(mine, "web")
    assert not ids.issued(mine, "batch") and not ids.issued(mine, "")


def test_whatever_a_client_sends_is_refused_never_raised():
    ids = RecordIds(KEY)
    [good] = ids.mint("req1", 1)
    for forged in ["", "-", "x-0", good.replace("-0", "-٣"), good[:-3] + "é.1-0", "é" * 40 + ".1-0",
                   good.replace(".1-", ".¹-"), "req1" + "z" * 16 + ".1-0", good + "-0"]:
        assert not ids.issued(forged), forged


def test_ids_issued_before_the_count_was_signed_stay_valid_up_to_max_records():
    ids = RecordIds(KEY, legacy_max=20)
    tag = hashlib.blake2b(b"oldreq", key=KEY, digest_size=8).hexdigest()
    assert ids.issued(f"oldreq{tag}-0") and ids.issued(f"oldreq{tag}-19")
    assert not ids.issued(f"oldreq{tag}-20")
    assert not ids.issued(f"oldreq{tag}-0", client="web")  # never for a declared client
