"""The fields of an attached-header NRRD file and its voxel types, for the readers that check and stream it."""

from typing import Dict, Optional

NRRD_TYPES = {
    "signed char": "i1", "int8": "i1", "int8_t": "i1",
    "uchar": "u1", "unsigned char": "u1", "uint8": "u1", "uint8_t": "u1",
    "short": "i2", "short int": "i2", "signed short": "i2", "signed short int": "i2", "int16": "i2",
    "int16_t": "i2", "ushort": "u2", "unsigned short": "u2", "unsigned short int": "u2", "uint16": "u2",
    "uint16_t": "u2", "int": "i4", "signed int": "i4", "int32": "i4", "int32_t": "i4",
    "uint": "u4", "unsigned int": "u4", "uint32": "u4", "uint32_t": "u4",
    "float": "f4", "double": "f8",
}  # fmt: skip


def read_header(path) -> Optional[Dict[str, str]]:
    """Header fields of an attached-header NRRD file plus '_data_offset', or None if not NRRD."""
    fields: Dict[str, str] = {}
    with open(path, "rb") as f:
        magic = f.readline()
        if not magic.startswith(b"NRRD000"):
            return None
        while True:
            line = f.readline()
            if not line or line in (b"\n", b"\r\n"):
                break
            text = line.decode("latin-1").rstrip("\r\n")
            if text.startswith("#") or ":" not in text:
                continue
            key, _, value = text.partition(":")
            fields[key.strip().lower()] = value.lstrip("=").strip()
        fields["_data_offset"] = str(f.tell())
    return fields
