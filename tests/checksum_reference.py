"""Independent references for the checkpoint checksums: CRC-32C written out from its definition.

The Castagnoli polynomial, reflected (0x82F63B78), initial value and final XOR 0xFFFFFFFF
(RFC 3720, appendix B.4); checked against the standard check value of b"123456789".
Pure Python: for test-sized data only.
"""

_POLY = 0x82F63B78
_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ _POLY if _crc & 1 else _crc >> 1
    _TABLE.append(_crc)


def crc32c(data) -> int:
    """CRC-32C of ``data`` (any bytes-like object)."""
    crc = 0xFFFFFFFF
    for byte in bytes(data):
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def crc32c_hex(data) -> str:
    """CRC-32C of ``data`` as 8 lowercase hex digits (the manifest's spelling)."""
    return f"{crc32c(data):08x}"


assert crc32c(b"123456789") == 0xE3069283
