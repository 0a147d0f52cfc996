"""Byte-level file formats: the native checkpoint file, and sniffing of foreign files.

``native`` is the file layout and its header parser, ``writing`` streams a native file out,
``digests`` hashes one read back and names what is damaged, ``foreign`` sniffs torch zips
and DCP pickles without torch. This package re-exports the names the rest of dist_guardian
uses, so ``formats.X`` reads the same wherever it is defined; callers that patch a name in
tests patch it where it is looked up (``formats.sniff_torch_file`` is looked up here).
"""

from __future__ import annotations

from ..errors import CheckpointFormatError
from .digests import (
    DIGEST_CHUNK,
    file_digest_stream,
    header_damage,
    payload_digests,
    read_and_hash,
    stream_digests,
)
from .foreign import (
    DCP_SAFE_GLOBALS,
    MAX_PICKLE_BYTES,
    MAX_ZIP_DIRECTORY_BYTES,
    PLANNING_CRC_BYTES,
    PLANNING_CRC_SECONDS,
    PLANNING_SCAN_SECONDS,
    SAFE_GLOBALS,
    STEP_KEYS,
    TORCH_SUFFIXES,
    TorchFileReport,
    is_safe_global,
    scan_pickle,
    sniff_torch_file,
    step_from_name,
)
from .native import (
    DTYPE_SIZES,
    FLOAT_DTYPES,
    MAX_DIMS,
    MAX_HEADER_BYTES,
    MAX_TENSORS,
    META_KEY,
    NATIVE_SUFFIX,
    NATIVE_VERSION,
    TREE_KEY,
    VERSION_KEY,
    NativeHeader,
    TensorEntry,
    TensorSpec,
    WrittenFile,
    encode_header,
    parse_header,
    tree_digest,
    tree_key_digests,
)
from .writing import write_all, write_native

__all__ = [
    "CheckpointFormatError",
    "DCP_SAFE_GLOBALS",
    "DIGEST_CHUNK",
    "DTYPE_SIZES",
    "FLOAT_DTYPES",
    "MAX_DIMS",
    "MAX_HEADER_BYTES",
    "MAX_PICKLE_BYTES",
    "MAX_TENSORS",
    "MAX_ZIP_DIRECTORY_BYTES",
    "META_KEY",
    "NATIVE_SUFFIX",
    "NATIVE_VERSION",
    "PLANNING_CRC_BYTES",
    "PLANNING_CRC_SECONDS",
    "PLANNING_SCAN_SECONDS",
    "SAFE_GLOBALS",
    "STEP_KEYS",
    "TORCH_SUFFIXES",
    "TREE_KEY",
    "VERSION_KEY",
    "NativeHeader",
    "TensorEntry",
    "TensorSpec",
    "TorchFileReport",
    "WrittenFile",
    "encode_header",
    "file_digest_stream",
    "header_damage",
    "is_safe_global",
    "parse_header",
    "payload_digests",
    "read_and_hash",
    "scan_pickle",
    "sniff_torch_file",
    "step_from_name",
    "stream_digests",
    "tree_digest",
    "tree_key_digests",
    "write_all",
    "write_native",
]
