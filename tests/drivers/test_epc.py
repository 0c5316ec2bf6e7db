"""EPC decoding (GS1 EPC Tag Data Standard) with vectors from the standard and reference implementations."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from drivers.base import DecodeError
from drivers.epc import EpcInfo, decode_epc, decode_epc_bytes, encode_sgtin96


def _ok(epc: str) -> EpcInfo:
    info = decode_epc(epc)
    assert isinstance(info, EpcInfo), info
    return info


def test_sgtin96_worked_example_of_the_standard() -> None:
    # GS1 TDS worked example (shared/vectors/README.md): urn:epc:id:sgtin:0614141.812345.6789, filter 3.
    info = _ok("3074257BF7194E4000001A85")
    assert info.scheme == "sgtin-96"
    assert info.filter == 3
    assert info.company_prefix == "0614141"
    assert info.gtin == "80614141123458"
    assert info.serial == "6789"


def test_sgtin96_partition_6() -> None:
    # Python 'epc' package tests (SGTINTest.test_96_encode): 0x301800004000004000000001 = sgtin:000001.0000001.1.
    info = _ok("301800004000004000000001")
    assert info.gtin == "00000010000014"
    assert info.serial == "1"


def test_sgtin198_vectors() -> None:
    # epc-tds .NET tests: 3639542C82FB0258B266D1AB66EE1CB062C99B46AD9BB872C000
    # = urn:epc:tag:sgtin-198:1.348338.0781321.12345678901234567890.
    info = _ok("3639542C82FB0258B266D1AB66EE1CB062C99B46AD9BB872C000")
    assert info.scheme == "sgtin-198"
    assert info.filter == 1
    assert info.company_prefix == "348338"
    assert info.serial == "12345678901234567890"
    assert info.gtin == "03483387813215"
    # epcpy README: urn:epc:tag:sgtin-198:1.00000950.01093.Serial, GS1 key 00000095010939.
    info = _ok("36300001DB011169E5E5A70EC000000000000000000000000000")
    assert info.gtin == "00000095010939"
    assert info.serial == "Serial"


def test_other_headers_are_raw_only() -> None:
    # E2... is a typical factory TID-like EPC (Impinj/Alien): not an SGTIN.
    info = _ok("e20000172211012518905b7a")
    assert info.epc == "E20000172211012518905B7A"
    assert info.scheme is None
    assert info.gtin is None


def test_malformed_sgtins_are_decode_errors() -> None:
    reserved_partition = bytearray(bytes.fromhex("3074257BF7194E4000001A85"))
    reserved_partition[1] = (reserved_partition[1] & 0b11100011) | (7 << 2)
    for epc in ("30", "zz", "", "3074257B", bytes(reserved_partition).hex()):
        assert isinstance(decode_epc(epc), DecodeError), epc


def test_encode_round_trips() -> None:
    epc = encode_sgtin96("80614141123458", 6789, 7, 3)
    assert epc.hex().upper() == "3074257BF7194E4000001A85"


@given(st.binary(max_size=64))
def test_random_epcs_never_raise(data: bytes) -> None:
    assert isinstance(decode_epc_bytes(data), EpcInfo | DecodeError)
    for header in (0x30, 0x36):
        result = decode_epc_bytes(bytes([header]) + data)
        assert isinstance(result, EpcInfo | DecodeError)


@given(st.text(max_size=80))
def test_random_text_never_raises(text: str) -> None:
    assert isinstance(decode_epc(text), EpcInfo | DecodeError)
